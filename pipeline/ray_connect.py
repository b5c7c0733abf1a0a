"""Start a local Ray, or join a cluster on purpose, and never hang on a dead one.

A plain ``ray.init()`` joins whatever cluster it finds: the one named in Ray's
``ray_current_cluster`` file (left behind by a crashed or finished ``ray start``),
or any ``gcs_server`` process on the machine, and waits without end when that
cluster is gone. Every command of ours that starts Ray goes through
:func:`init_ray` instead, which decides the address first (:func:`resolve_address`):

* ``--ray-address`` given: ``local`` starts a local Ray; ``auto`` joins the cluster
  Ray's own lookup finds; ``HOST:PORT`` or ``ray://HOST:PORT`` joins that one.
* otherwise ``RAY_ADDRESS`` when it holds a cluster (GCS) address, which is what Ray
  sets for a submitted job's entrypoint; a job-server address (``http://HEAD:8265``,
  what ``diffseg submit`` uses) is not one, so the run starts a local Ray and says so;
* otherwise a local Ray.

A cluster address is probed with a TCP connect bounded in seconds before Ray is
asked to join it, so an unreachable one is one sentence, not minutes of Ray's
"Failed to connect to GCS" warnings.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Mapping

from pipeline.console import ray_logging_level
from pipeline.errors import LabelError

CONNECT_TIMEOUT_S = 5.0
_JOB_SERVER_PREFIXES = ("http://", "https://")


class RayConnectError(LabelError):
    """Ray could not be started or joined: one sentence for the user (exit 2)."""


@dataclass(frozen=True)
class RayAddress:
    """What ``ray.init`` gets (``"local"``, ``HOST:PORT`` or ``ray://...``) and why."""

    address: str
    note: str | None = None  # said once on stderr (e.g. a job-server RAY_ADDRESS was left alone)

    @property
    def joins(self) -> bool:
        return self.address != "local"


def resolve_address(ray_address: str | None, environ: Mapping[str, str] | None = None) -> RayAddress:
    """The address a command starts Ray with (see the module docstring for the order)."""
    environ = os.environ if environ is None else environ
    if ray_address is not None:
        given = ray_address.strip()
        if not given:
            raise RayConnectError("--ray-address is empty: leave it out to start a local Ray, or pass "
                                  "HOST:PORT (the head's GCS port, 6379 by default) or auto.")
        if given.startswith(_JOB_SERVER_PREFIXES):
            raise RayConnectError(
                f"--ray-address {given} is a job-server address (for `diffseg submit`), not a cluster address: "
                "pass the head's GCS address HOST:6379, or auto on a node of the cluster.")
        if given == "auto":
            return RayAddress(_find_running_cluster())
        return RayAddress(given)
    env = (environ.get("RAY_ADDRESS") or "").strip()
    if env.startswith(_JOB_SERVER_PREFIXES):
        return RayAddress("local", note=(
            f"RAY_ADDRESS={env} is a job-server address (for `diffseg submit`); this run starts its own "
            "local Ray (pass --ray-address HOST:6379 to label on a cluster)."))
    if env == "auto":
        return RayAddress(_find_running_cluster())
    if env and env != "local":
        return RayAddress(env)
    return RayAddress("local")


def _find_running_cluster() -> str:
    """``auto``: the cluster Ray's own lookup finds (RAY_ADDRESS, the last ``ray start``, a GCS process)."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        return canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as exc:
        raise RayConnectError(
            f"--ray-address auto found no running Ray cluster on this machine ({_one_line(exc)}); start one with "
            "`ray start --head`, pass its address HOST:PORT, or leave --ray-address out to start a local Ray."
        ) from None


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise RayConnectError unless a TCP connect to the cluster address succeeds within ``timeout_s``."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__).lower()
        raise RayConnectError(
            f"Cannot reach the Ray cluster at {address} ({reason} within {timeout_s:g} s): start it with "
            "`ray start --head` or correct --ray-address (or RAY_ADDRESS); leave both unset to start a local Ray."
        ) from None


def _host_port(address: str) -> tuple[str, int]:
    bare = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = bare.rpartition(":")
    if not sep or not port.isdigit():
        raise RayConnectError(f"The Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379), local or auto.")
    return host.strip("[]") or "127.0.0.1", int(port)


def init_ray(ray_address: str | None, **init_kwargs: Any) -> tuple[Any, bool]:
    """``ray.init`` at the resolved address; returns (ray, whether this call started or joined Ray).

    A Ray already initialised in this process is reused (returns False: not ours to shut down).
    ``init_kwargs`` go to ``ray.init`` (``num_cpus`` etc. apply to a local Ray only).
    """
    import ray

    if ray.is_initialized():
        return ray, False
    where = resolve_address(ray_address)
    if where.note:
        print(where.note, file=sys.stderr)
    if where.joins:
        check_reachable(where.address)
        for key in ("num_cpus", "num_gpus", "object_store_memory", "resources"):
            init_kwargs.pop(key, None)  # Ray refuses these when joining a cluster
    level = ray_logging_level()  # a quiet command: no INFO lines from the driver's Ray (pipeline/console.py)
    if level is not None:
        init_kwargs.setdefault("logging_level", level)
    # A local Ray turns token authentication on by default and warns, every run, that it did
    # (opting out is the only other choice it offers): keep the security, drop the note.
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    auth_log.addFilter(_drop_token_auth_note)
    try:
        for attempt in (1, 2):
            try:
                ray.init(address=where.address, **init_kwargs)
                break
            except Exception as exc:  # noqa: BLE001 - Ray raises bare Exceptions ("node timed out during startup")
                # A local node gets a fixed 30 s to register, which a busy machine can miss once:
                # clean up what the attempt started and try once more.
                if attempt == 2 or where.joins or "timed out during startup" not in str(exc):
                    raise RayConnectError(_ray_start_sentence(where, exc)) from None
                ray.shutdown()
    finally:
        auth_log.removeFilter(_drop_token_auth_note)
    return ray, True


def shutdown_ray(ray: Any, own_ray: bool) -> None:
    """Stop a local Ray that ``init_ray`` started (its actors and tasks with it); leave a joined one alone."""
    if ray is not None and own_ray:
        ray.shutdown()


def _ray_start_sentence(where: RayAddress, exc: BaseException) -> str:
    text = _one_line(exc)
    if "timed out during startup" in text:
        return ("Ray's node timed out during startup (its processes did not register in 30 s: the machine is "
                "overloaded or short of memory); try again when it is less busy, or start Ray once yourself "
                "(`ray start --head`) and pass --ray-address auto.")
    target = f"the Ray cluster at {where.address}" if where.joins else "a local Ray"
    return f"Cannot start or join {target}: {text} (is it running? try `ray status`)."


def _drop_token_auth_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) < 400 else text[:400] + "..."
