"""What starting one model actor costs: the price every ``label()`` run pays once per actor.

    python benchmarks/actor_start_bench.py [--repeats 3]

On a local Ray (2 CPUs, as CI), starts actors one after another and reads, inside each, the CPU
seconds its process has used and the wall time from ``.remote()`` to ready:

* ``bare``: an empty actor (Ray's own worker start; the baseline of this run);
* ``imports``: an empty actor that imports what a LabelActor imports (torch, diffusers, ours);
* ``LabelActor``: the real ``pipeline.job.actors.LabelActor`` on tiny-random (RANDOM weights, 64 px),
  then one batch of 3 photos through it.

Prints each row's medians and its ratio to ``bare``. On a GPU the model's weights add their load
time to the LabelActor row; tiny-random has almost none, so the row is the import and start cost.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.pipeline_helpers' photos
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Bare:
    def cpu(self) -> float:
        return time.process_time()


class Imports(Bare):
    def __init__(self):
        import pipeline.job.actors  # noqa: F401
        import diffseg_core.extract  # noqa: F401
        import diffseg_core.segmentor  # noqa: F401


def _label_actor_class():
    from pipeline.job.actors import LabelActor

    class TimedLabelActor(LabelActor):
        def cpu(self) -> float:
            return time.process_time()

        def one_batch(self, batch) -> int:
            return len(self(batch)["image_id"])

    return TimedLabelActor


def measure(ray, cls, repeats: int, *args, batch=None, **kwargs) -> tuple[float, float, float | None]:
    """Median (wall s to ready, actor CPU s at ready, actor CPU s after ``batch``, None without one)
    over ``repeats``."""
    walls, ready_cpu, after_cpu = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        actor = ray.remote(num_cpus=1)(cls).remote(*args, **kwargs)
        ready_cpu.append(ray.get(actor.cpu.remote()))
        walls.append(time.perf_counter() - start)
        if batch is not None:
            ray.get(actor.one_batch.remote(batch))
            after_cpu.append(ray.get(actor.cpu.remote()))
        ray.kill(actor)
        time.sleep(0.5)  # let the process go before the next start
    return statistics.median(walls), statistics.median(ready_cpu), statistics.median(after_cpu) if after_cpu else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray

    from tests.pipeline_helpers import actor_batch

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actor_kwargs = dict(device="cpu", dtype=None, image_size=64, timestep=300, revision=None,
                            diffseg_kwargs={"num_points": 4}, threads=1)
        rows = {
            "bare": measure(ray, Bare, args.repeats),
            "imports": measure(ray, Imports, args.repeats),
            "LabelActor": measure(ray, _label_actor_class(), args.repeats, "tiny-random",
                                  batch=actor_batch([(300, 451), (400, 600), (512, 512)], 64), **actor_kwargs),
        }
    finally:
        ray.shutdown()
    base_wall, base_cpu, _ = rows["bare"]
    print(f"{'actor':12s} {'wall to ready':>14s} {'CPU at ready':>13s} {'CPU after 1 batch':>18s}  ratio to bare (CPU)")
    for name, (wall, cpu, after) in rows.items():
        batch = f"{after:17.2f}s" if after is not None else f"{'(no batch)':>18s}"
        print(f"{name:12s} {wall:13.2f}s {cpu:12.2f}s {batch}  x{cpu / base_cpu:.1f}")


if __name__ == "__main__":
    main()
