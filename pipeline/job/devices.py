"""GPUs or CPUs for the model actors: chosen on purpose, said out loud, never a silent CPU run.

``--device gpu`` needs GPUs: when the cluster has none now but its autoscaler can
start GPU nodes, the run asks for one and waits (at most ``--gpu-wait`` seconds,
saying so); when it cannot, the run stops at once with one sentence. ``--device cpu``
runs CPU actors even beside GPUs. ``--device auto`` (the default) uses GPUs when the
cluster has them or its autoscaler can add them, and otherwise says it runs on CPU.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from pipeline.errors import LabelError
from pipeline.ray_connect import RayConnectError, resolve_address

__all__ = ["DEVICES", "DevicePlan", "device_option_problem", "plan_devices", "plan_devices_before_ray",
           "autoscaler_max_gpus"]

logger = logging.getLogger(__name__)

DEVICES = ("auto", "gpu", "cpu")
_POLL_S = 2.0


@dataclass(frozen=True)
class DevicePlan:
    use_gpu: bool
    gpus_per_actor: float  # 0 for CPU actors
    gpus: float | None  # GPUs in the cluster when the run started; None: decided before Ray, not counted


def device_option_problem(device: str, gpus_per_actor: float | None, gpu_wait_s: float) -> str | None:
    """Why these device options contradict each other, or None (one sentence, before anything starts)."""
    if device not in DEVICES:
        return f"--device must be one of {', '.join(DEVICES)}, not {device!r}."
    if gpus_per_actor is not None and (isinstance(gpus_per_actor, bool) or not gpus_per_actor >= 0):
        return f"--gpus-per-actor must be a number >= 0, not {gpus_per_actor!r}."
    if device == "cpu" and gpus_per_actor:
        return f"--device cpu and --gpus-per-actor {gpus_per_actor:g} contradict each other; drop one."
    if device == "gpu" and gpus_per_actor == 0:
        return "--device gpu and --gpus-per-actor 0 contradict each other; drop one."
    if isinstance(gpu_wait_s, bool) or not isinstance(gpu_wait_s, (int, float)) or not gpu_wait_s >= 0:
        return f"--gpu-wait must be a number of seconds >= 0, not {gpu_wait_s!r}."
    return None


def autoscaler_max_gpus() -> float:
    """GPUs the cluster's autoscaler may run at most (0 without an autoscaler config, as on a local Ray).

    Read from the cluster config the autoscaler publishes in the GCS (what Ray Data's
    own autoscaling reads); best effort: any failure reads as "no GPUs to come".
    """
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - private API: absent or changed means "unknown"
        return 0.0
    return float(limits.get("GPU", 0) or 0)


def plan_devices(ray: Any, device: str, gpus_per_actor: float | None, gpu_wait_s: float) -> DevicePlan:
    """Decide GPU or CPU actors on the connected cluster; wait for GPUs or raise LabelError."""
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if device == "cpu" or (device == "auto" and gpus_per_actor == 0):
        return DevicePlan(False, 0.0, gpus)
    per_actor = float(gpus_per_actor) if gpus_per_actor else 1.0
    if gpus >= per_actor:
        return DevicePlan(True, per_actor, gpus)
    coming = autoscaler_max_gpus()
    asked = ("--device gpu" if device == "gpu" else f"--gpus-per-actor {per_actor:g}" if gpus_per_actor
             else "--device auto")
    if coming < per_actor:
        if device == "auto" and not gpus_per_actor:
            logger.info("labelling on CPU: the Ray cluster has no GPU (pass --device gpu to require one)")
            return DevicePlan(False, 0.0, gpus)
        have = f"{gpus:g} GPU" if gpus else "no GPU"
        raise LabelError(
            f"{asked} needs {per_actor:g} GPU per model actor, but the Ray cluster has {have} and no autoscaler "
            "that can add GPU nodes: join a cluster with GPUs (--ray-address), or pass --device cpu to label on CPUs."
        )
    return DevicePlan(True, per_actor, _wait_for_gpus(ray, per_actor, gpu_wait_s, coming, asked))


def plan_devices_before_ray(ray_address: str | None, device: str, gpus_per_actor: float | None,
                            gpu_wait_s: float) -> DevicePlan | None:
    """What ``plan_devices`` decides, where that is known without starting Ray; None where only the
    cluster can say (``--device auto`` on a cluster to join, or GPUs Ray's own count cannot read here).

    Known: from a Ray this process already runs (asked, at no cost), from the options alone, or, for
    ``--device auto`` on a local Ray, from this machine's GPUs counted as a local Ray counts them (its
    autoscaler adds none). Used by a rerun to settle its dtype, hence its manifest check, before Ray
    starts; a plan that needs GPUs is judged against the cluster only once Ray runs (pipeline/job/run.py).
    """
    import ray

    if ray.is_initialized():
        return plan_devices(ray, device, gpus_per_actor, gpu_wait_s)
    if device == "cpu" or gpus_per_actor == 0:
        return DevicePlan(False, 0.0, None)
    if device == "gpu" or gpus_per_actor:
        return DevicePlan(True, float(gpus_per_actor) if gpus_per_actor else 1.0, None)
    try:
        if resolve_address(ray_address).joins:
            return None
    except RayConnectError:
        return None  # ray.init says so, in its own sentence
    gpus = local_ray_gpus()
    if gpus is None:
        return None
    return DevicePlan(True, 1.0, gpus) if gpus >= 1.0 else DevicePlan(False, 0.0, gpus)


def local_ray_gpus() -> float | None:
    """The GPUs a local Ray started here would have (its own resource count: CUDA_VISIBLE_DEVICES and
    RAY_OVERRIDE_RESOURCES included), without starting it; None when that cannot be read (private API)."""
    try:
        from ray._private.resource_and_label_spec import ResourceAndLabelSpec

        return float(ResourceAndLabelSpec().resolve(is_head=True).num_gpus or 0)
    except Exception:  # noqa: BLE001 - private API: absent or changed means "ask the started Ray"
        return None


def _wait_for_gpus(ray: Any, per_actor: float, wait_s: float, coming: float, asked: str) -> float:
    from ray.autoscaler.sdk import request_resources

    logger.info("waiting up to %g s for the Ray autoscaler to start a GPU node (it may add up to %g GPUs)",
                wait_s, coming)
    request_resources(bundles=[{"GPU": per_actor}])
    deadline = time.monotonic() + wait_s
    try:
        while True:
            gpus = float(ray.cluster_resources().get("GPU", 0))
            if gpus >= per_actor:
                logger.info("%g GPU(s) joined the cluster", gpus)
                return gpus
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabelError(
                    f"{asked}: no GPU joined the Ray cluster within {wait_s:g} s although its autoscaler can add "
                    "GPU nodes; check the autoscaler (`ray status`), wait longer with --gpu-wait, or pass --device cpu."
                )
            time.sleep(min(_POLL_S, left))
    finally:
        request_resources(bundles=[])  # Ray Data asks for what its actors need from here on
