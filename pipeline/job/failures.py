"""Where a run's failures become LabelError (one sentence): ``label_errors`` around the run, the
sentence for a storage fault of the output, and the check that every shard of the run was committed.
"""
from __future__ import annotations

import errno
from contextlib import contextmanager
from typing import Iterator

from pipeline.data.retry import RetryPolicy, describe, is_transient, storage_refusal
from pipeline.errors import LabelError
from pipeline.job.commit import CommitError, Committer
from pipeline.job.interrupt import RunInterrupted
from pipeline.job.lease import LeaseHeldError

OUTPUT_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)})

__all__ = ["label_errors", "storage_sentence", "check_all_committed", "OUTPUT_FULL_ERRNOS"]


@contextmanager
def label_errors(output: str) -> Iterator[None]:
    """Turn what stops a run into LabelError: another run's lease, a commit the output refused, and a
    storage fault of the output's bookkeeping that outlived the retries. Anything else (a bug) and
    RunInterrupted pass through as they are."""
    try:
        yield
    except (LabelError, RunInterrupted):
        raise
    except (LeaseHeldError, CommitError) as exc:
        raise LabelError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the output's bookkeeping could not be read or written
        if isinstance(exc, OSError) or is_transient(exc):
            raise LabelError(storage_sentence(output, exc)) from None
        raise


def storage_sentence(output: str, exc: BaseException) -> str:
    """One sentence for a storage fault of the output's bookkeeping that outlived the retries."""
    refusal = storage_refusal(exc)
    if refusal:
        return (f"Cannot write the output {output!r}: {refusal} ({describe(exc)}); free space or fix its "
                "permissions, then rerun the same command to resume.")
    if is_transient(exc):
        return (f"The output {output!r} stayed unreachable ({describe(exc)}); rerun the same command when it "
                "is reachable: committed shards are kept.")
    return f"Cannot use the output {output!r}: {describe(exc)}."


def check_all_committed(committer: Committer, policy: RetryPolicy) -> None:
    """Raise LabelError when a shard of this run stayed uncommitted (storage unreachable, rows missing)."""
    if committer.failed:
        first_id, why = sorted(committer.failed.items())[0]
        raise LabelError(
            f"{len(committer.failed)} shard(s) were left uncommitted because storage stayed unreachable after "
            f"retrying for {policy.deadline_s:g} s (first: shard {first_id}: {why}); rerun the same command "
            "when it is reachable to finish them."
        )
    if committer.incomplete():
        raise LabelError(
            f"{len(committer.incomplete())} shard(s) did not receive all their rows and were not committed "
            f"(first: {sorted(committer.incomplete().items())[:3]}); rerun the same command to finish them."
        )
