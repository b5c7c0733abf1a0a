"""Submitting a spec: one submission id per attempt, at most one live job per output.

Submission ids are ``diffseg-<name>-<hash10>-<attempt>``: the name and the content hash
tie a job to its spec, the attempt number lets a failed or stopped job be submitted
again (Ray never reuses an id). A resubmitted job resumes where the last one stopped:
``pipeline.label`` skips the shards the output already has.

Before submitting we refuse when a live (pending or running) job of this spec, or any
live diffseg job writing the same output, exists; the N parts of a ``--part i/N`` output
(one job each) may run at once, two jobs of one part may not. Two people submitting at the same
instant can both pass that check; for the same spec Ray's unique ids still stop the
second (same attempt number), for different specs on one output they do not.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from jobs.connect import Cluster
from jobs.spec import JobSpec, entrypoint_command

META_SPEC = "diffseg_spec"
META_HASH = "diffseg_spec_hash"
META_OUTPUT = "diffseg_output"
META_SOURCE = "diffseg_spec_file"
META_PART = "diffseg_part"  # "i/N", or absent for a job that writes the whole output


class SubmitRefused(RuntimeError):
    """The spec is fine but must not run now (a live job already writes its output)."""


@dataclass
class Submitted:
    submission_id: str
    attempt: int
    previous: list[tuple[str, str]]  # (submission id, status) of earlier attempts of this spec


def normalize_output(url: str) -> str:
    """One spelling per output location, so two specs writing the same place are seen as one."""
    url = url.strip()
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme.lower()}://{re.sub('/+', '/', rest).rstrip('/')}"
    return os.path.normpath(url)


def _status(job: Any) -> str:
    return str(getattr(job.status, "value", job.status))


def _is_live(job: Any) -> bool:
    return not job.status.is_terminal()


def submit(cluster: Cluster, spec: JobSpec, environ: Mapping[str, str] | None = None) -> Submitted:
    """Submit ``spec`` as a new attempt; raises SubmitRefused or ClusterError."""
    runtime_env = spec.ray_runtime_env(environ)  # may raise SpecError (a ${VAR} not set): before any call
    jobs = cluster.call("list the cluster's jobs", "list_jobs")
    prefix = spec.submission_prefix + "-"
    mine = [j for j in jobs if (j.submission_id or "").startswith(prefix)]
    output = normalize_output(spec.output)
    part = spec.options.get("part") or ""
    for job in jobs:
        if not _is_live(job):
            continue
        if (job.submission_id or "").startswith(prefix):
            raise SubmitRefused(f"Job {job.submission_id} of this spec is still {_status(job)}; follow it with "
                                f"`diffseg logs {job.submission_id} --follow` or stop it with "
                                f"`diffseg stop {job.submission_id}`.")
        theirs = (job.metadata or {}).get(META_PART) or ""
        if (job.metadata or {}).get(META_OUTPUT) == output and not _other_parts(part, theirs):
            if part and theirs == part:
                raise SubmitRefused(f"Job {job.submission_id} ({_status(job)}) already writes part {part} of "
                                    f"{spec.output}; two jobs must not write one part at once.")
            raise SubmitRefused(f"Job {job.submission_id} ({_status(job)}) already writes to {spec.output}; two jobs "
                                "must not write one output at once, unless they are its parts i/N of one N (--part).")
    attempts = [int(j.submission_id[len(prefix):]) for j in mine if j.submission_id[len(prefix):].isdigit()]
    attempt = max(attempts, default=0) + 1
    submission_id = f"{prefix}{attempt}"
    metadata = {META_SPEC: spec.name, META_HASH: spec.content_hash, META_OUTPUT: output, META_SOURCE: spec.source}
    if part:
        metadata[META_PART] = part
    cluster.call(
        f"submit {spec.source}", "submit_job",
        entrypoint=entrypoint_command(spec),
        submission_id=submission_id,
        runtime_env=runtime_env,
        metadata=metadata,
        **spec.driver,
    )
    previous = sorted(((j.submission_id, _status(j)) for j in mine),
                      key=lambda t: int(t[0][len(prefix):]) if t[0][len(prefix):].isdigit() else 0)
    return Submitted(submission_id, attempt, previous)


def _other_parts(a: str, b: str) -> bool:
    """Two jobs on one output may run at once when they are different parts i/N of the same N."""
    from pipeline.data.parts import Part

    mine, theirs = Part.parse(a or None), Part.parse(b or None)
    return mine.partitioned and theirs.partitioned and mine.count == theirs.count and mine.index != theirs.index


__all__ = ["Submitted", "SubmitRefused", "submit", "normalize_output"]
