"""``diffseg``: the job commands (submit, status, logs, stop, list) on top of the pipeline's CLI.

Imports point one way (jobs -> pipeline), so the job commands cannot live in
``pipeline/cli.py``; this is the installed ``diffseg`` script instead. Any command that
is not a job command goes, with its arguments unchanged, to ``pipeline.cli.main``.

Exit codes of the job commands: 0 ok (or the job SUCCEEDED), 1 the job FAILED or was
STOPPED, 2 refused (bad spec, cannot reach or authenticate to the cluster, a live job
already writes the output), 130 interrupted while following (the job keeps running).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any, Callable, Sequence

JOB_COMMANDS = ("submit", "status", "logs", "stop", "list")
_ADDRESS_HELP = "job server, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)"


def add_job_commands(sub: Any) -> None:
    """Add the job subcommands to an ``add_subparsers()`` object."""
    p = sub.add_parser("submit", help="submit a job spec (YAML) to a Ray cluster",
                       description="Validate SPEC and submit it with Ray's job API. Resubmitting a spec whose "
                       "job failed or was stopped resumes it.")
    p.add_argument("spec", help="job spec file (YAML), e.g. jobs/local-folder.yaml")
    p.add_argument("--address", help=_ADDRESS_HELP)
    p.add_argument("--wait", action="store_true", help="stream the job's logs until it ends; exit code follows it")
    p.add_argument("--dry-run", action="store_true", help="print the resolved job (secrets masked), submit nothing")
    p.add_argument("--parts", type=int, default=None, metavar="N",
                   help="submit N jobs that write one output, part 1/N to N/N (one driver each: for clusters "
                   "larger than one driver feeds); --wait then waits for all of them")
    p = sub.add_parser("status", help="status of a submitted job")
    p.add_argument("job_id")
    p.add_argument("--address", help=_ADDRESS_HELP)
    p = sub.add_parser("logs", help="logs of a submitted job")
    p.add_argument("job_id")
    p.add_argument("--follow", "-f", action="store_true", help="keep streaming until the job ends")
    p.add_argument("--address", help=_ADDRESS_HELP)
    p = sub.add_parser("stop", help="stop a running job (resubmit its spec to resume)")
    p.add_argument("job_id")
    p.add_argument("--wait", action="store_true", help="wait until the job has stopped")
    p.add_argument("--address", help=_ADDRESS_HELP)
    p = sub.add_parser("list", help="diffseg jobs on the cluster")
    p.add_argument("--all", action="store_true", help="every job on the cluster, not only diffseg's")
    p.add_argument("--address", help=_ADDRESS_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The pipeline's parser with the job commands added, so ``diffseg --help`` lists them all."""
    from pipeline import cli as pipeline_cli

    return pipeline_cli.build_parser(extra=add_job_commands)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # the reader went away (`diffseg submit SPEC --dry-run | head`): stop quietly, as other
        # command-line tools do, instead of a traceback when Python flushes stdout at exit
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    if first not in JOB_COMMANDS and not (not argv or argv[0] in ("-h", "--help")):
        from pipeline.cli import main as pipeline_main

        return pipeline_main(argv, extra=add_job_commands)  # a usage error then lists every command
    args = build_parser().parse_args(argv)
    if args.command not in JOB_COMMANDS:  # pragma: no cover - argparse handled help/usage already
        from pipeline.cli import main as pipeline_main

        return pipeline_main(argv)
    from jobs.connect import ClusterError
    from jobs.spec import SpecError
    from jobs.submit import SubmitRefused

    try:
        return COMMANDS[args.command](args)
    except (SpecError, ClusterError, SubmitRefused) as exc:
        print(f"diffseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        job = getattr(args, "job_id", None) or getattr(args, "submitted_id", None)
        if job:
            print(f"\ninterrupted; job {job} keeps running (`diffseg stop {job}` stops it)", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------- commands


def _submit(args: argparse.Namespace) -> int:
    from jobs.connect import connect
    from jobs.spec import load_spec
    from jobs.submit import submit

    spec = load_spec(args.spec)
    if args.parts is not None:
        return _submit_parts(args, spec)
    resolved = spec.printable()  # also expands ${VAR}s: an unset one is refused before any cluster call
    if args.dry_run:
        print(json.dumps(resolved, indent=2, default=str))
        return 0
    cluster = connect(args.address)
    done = submit(cluster, spec)
    args.submitted_id = done.submission_id
    if done.previous:
        last_id, last_status = done.previous[-1]
        note = " (resumes its output)" if last_status in ("FAILED", "STOPPED") else ""
        print(f"earlier attempt: {last_id} {last_status}{note}", file=sys.stderr)
    print(done.submission_id)
    sys.stdout.flush()
    if not args.wait:
        print(f"follow it: diffseg logs {done.submission_id} --follow", file=sys.stderr)
        return 0
    return _follow(cluster, done.submission_id)


def _submit_parts(args: argparse.Namespace, spec: Any) -> int:
    """``submit --parts N``: one job per part (each resumable alone by submitting again)."""
    from jobs.connect import connect
    from jobs.spec import SpecError
    from jobs.submit import submit

    if not 2 <= args.parts <= 9999:
        raise SpecError(f"--parts takes a number of jobs from 2 to 9999, not {args.parts}.")
    if spec.options.get("part"):
        raise SpecError(f"{spec.source} already sets io.part: {spec.options['part']}; submit it without --parts, "
                        "or drop io.part.")
    parts = [spec.with_part(f"{i}/{args.parts}") for i in range(1, args.parts + 1)]
    resolved = [p.printable() for p in parts]  # every ${VAR} checked before the first submission
    if args.dry_run:
        print(json.dumps(resolved, indent=2, default=str))
        return 0
    cluster = connect(args.address)
    ids = []
    for part in parts:
        done = submit(cluster, part)
        ids.append(done.submission_id)
        print(done.submission_id)
        sys.stdout.flush()
    args.submitted_id = ids[0]
    if not args.wait:
        print(f"follow one: diffseg logs {ids[0]} --follow; all of them: diffseg list", file=sys.stderr)
        return 0
    statuses = {}
    for job_id in ids:  # the parts run at once: waiting on each in turn waits as long as on all
        statuses[job_id] = wait_for_end(cluster, job_id)
        print(f"{job_id}: {statuses[job_id]}", file=sys.stderr)
    return 0 if all(s == "SUCCEEDED" for s in statuses.values()) else 1


def _status(args: argparse.Namespace) -> int:
    from jobs.connect import connect

    cluster = connect(args.address)
    info = cluster.call(f"get the status of job {args.job_id}", "get_job_info", args.job_id)
    status = str(info.status.value)
    line = f"{args.job_id}: {status}"
    if info.message:
        line += f" - {' '.join(str(info.message).split())}"
    print(line)
    return 0


def _logs(args: argparse.Namespace) -> int:
    from jobs.connect import connect

    cluster = connect(args.address)
    if args.follow:
        return _follow(cluster, args.job_id)
    sys.stdout.write(cluster.call(f"get the logs of job {args.job_id}", "get_job_logs", args.job_id))
    return 0


def _stop(args: argparse.Namespace) -> int:
    from jobs.connect import connect

    cluster = connect(args.address)
    stopped = cluster.call(f"stop job {args.job_id}", "stop_job", args.job_id)
    if not stopped:
        status = cluster.call(f"get the status of job {args.job_id}", "get_job_status", args.job_id)
        print(f"{args.job_id}: already {status.value}, nothing to stop")
        return 0
    print(f"{args.job_id}: stop requested")
    if args.wait:
        status = wait_for_end(cluster, args.job_id)
        print(f"{args.job_id}: {status}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from jobs.connect import connect
    from jobs.submit import META_OUTPUT, META_SPEC

    cluster = connect(args.address)
    jobs = cluster.call("list the cluster's jobs", "list_jobs")
    rows = []
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        meta = job.metadata or {}
        if not args.all and META_SPEC not in meta:
            continue
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        rows.append((job.submission_id or job.job_id or "-", str(job.status.value), started,
                     meta.get(META_OUTPUT, "-")))
    if not rows:
        print("no diffseg jobs" if not args.all else "no jobs")
        return 0
    widths = [max(len(r[i]) for r in rows + [("ID", "STATUS", "STARTED", "OUTPUT")]) for i in range(4)]
    for row in [("ID", "STATUS", "STARTED", "OUTPUT"), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "submit": _submit, "status": _status, "logs": _logs, "stop": _stop, "list": _list,
}


# ---------------------------------------------------------------------- following


def exit_code(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1


def wait_for_end(cluster: Any, job_id: str, poll_s: float = 1.0) -> str:
    """Poll until the job is in a terminal state; returns the status name."""
    while True:
        status = cluster.call(f"get the status of job {job_id}", "get_job_status", job_id)
        if status.is_terminal():
            return str(status.value)
        time.sleep(poll_s)


def _follow(cluster: Any, job_id: str) -> int:
    """Stream logs until the job ends (the server closes the stream then); exit code follows the job."""

    async def stream() -> None:
        async for chunk in cluster.client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(stream())
    except RuntimeError as exc:
        # The stream can drop (a proxy, a restart); the status below still says how it ended.
        print(f"(log stream ended early: {' '.join(str(exc).split())[:200]})", file=sys.stderr)
    status = wait_for_end(cluster, job_id)
    info = cluster.call(f"get the status of job {job_id}", "get_job_info", job_id)
    message = f" - {' '.join(str(info.message).split())}" if info.message else ""
    print(f"{job_id}: {status}{message}", file=sys.stderr)
    return exit_code(status)


if __name__ == "__main__":
    sys.exit(main())
