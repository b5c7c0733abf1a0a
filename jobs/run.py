"""The in-cluster entrypoint: ``python -m jobs.run SPEC_FILE_OR_JSON``.

This is what a submitted job runs (the submitter passes the resolved spec as JSON, since
its spec file is not on the cluster). It also works by hand on a head node with a spec
file. It validates the spec, expands ``${VAR}`` in storage_options from the job's
environment, calls ``pipeline.label`` (which joins the cluster: inside a Ray job,
``RAY_ADDRESS`` is set; Ray kept quiet, a progress line every 30 s or ``$DIFFSEG_PROGRESS_EVERY_S``
instead: pipeline/console.py) and prints the summary, readable and as one line of JSON.

Exit codes: 0 done, 1 finished but incomplete, 2 refused (bad spec, or the pipeline's
one-sentence systemic error; the job then ends FAILED with that sentence in its logs),
130 / 143 stopped by SIGINT / SIGTERM (the manifest says "interrupted"; resubmit to resume).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Sequence

from jobs.spec import JobSpec, SpecError, expand_env_refs, load_spec, parse_spec

SUMMARY_PREFIX = "diffseg job summary: "  # then the summary as one line of JSON (easy to grep from job logs)


def read_spec_argument(arg: str) -> JobSpec:
    """A path to a spec file, or the spec itself as JSON/YAML text (what ``diffseg submit`` sends)."""
    if arg.lstrip().startswith("{"):
        return parse_spec(arg, source="<job spec>")
    return load_spec(arg)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if len(argv) != 1:
        print("usage: python -m jobs.run SPEC_FILE_OR_JSON", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.console import command_console, plain_every_s
    from pipeline.errors import LabelError
    from pipeline.job.run import label

    try:
        spec = read_spec_argument(argv[0])
        every_s = plain_every_s()  # $DIFFSEG_PROGRESS_EVERY_S, e.g. from the spec's runtime_env
        options = dict(spec.options)
        if options.get("storage_options"):
            options["storage_options"] = expand_env_refs(options["storage_options"], os.environ)
    except ValueError as exc:  # a SpecError, or a bad $DIFFSEG_PROGRESS_EVERY_S
        print(f"diffseg job: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if spec.runtime_env:
        # `diffseg submit` applies runtime_env through Ray and never sends it here.
        print("note: the spec's runtime_env is ignored when run by hand; this node's environment is used",
              flush=True)
    print(f"diffseg job {spec.name}: labelling {spec.input} -> {spec.output}", flush=True)
    from pipeline.job.interrupt import RunInterrupted
    from pipeline.job.stderr_filter import filtered_stderr

    try:
        # Ray's known false alarm stays out of the job's logs; Ray's progress blocks too: a line every
        # every_s seconds instead (the job's logs are no terminal)
        with filtered_stderr(), command_console(verbose=False, every_s=every_s):
            summary = label(spec.input, spec.output, **options)
    except LabelError as exc:
        print(f"diffseg job: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except RunInterrupted as exc:  # `diffseg stop` / `ray job stop` send SIGTERM
        kept = f"; {exc.committed} of {exc.total} shards are committed and kept" if exc.total is not None else ""
        print(f"diffseg job: stopped by {exc.signal_name}{kept}; submit the same spec again to resume",
              file=sys.stderr, flush=True)
        return exc.exit_code
    from pipeline.cli import format_summary

    print(format_summary(summary), flush=True)
    print(SUMMARY_PREFIX + json.dumps(summary, default=str), flush=True)
    return 0 if summary.get("complete") else 1


if __name__ == "__main__":
    sys.exit(main())
