"""How long `diffseg label` takes to refuse a run it cannot do, against Ray's start-up (what it cost before).

Each refusal is a fresh `diffseg label` process, timed from start to exit (median of
``--repeats``): a made-up model path, a bad option, the default hub model with
``HF_HUB_OFFLINE=1`` and no cached copy, the hub unreachable (``HF_ENDPOINT`` pointing at a
closed port on 127.0.0.1, no ``HF_HUB_OFFLINE``). The baseline, in the same run: a fresh
process that starts a local Ray and stops it (every refusal used to wait for it first).

    python benchmarks/refusal_bench.py
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def timed(command: list[str], env: dict, repeats: int) -> tuple[float, str]:
    times, last = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        times.append(time.perf_counter() - start)
        last = (done.stderr.strip().splitlines() or [""])[-1]
    return statistics.median(times), last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from pipeline_helpers import make_photo_folder

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as work:
        make_photo_folder(Path(work) / "in")
        base = [sys.executable, "-m", "pipeline", "label", f"{work}/in", f"{work}/out"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": f"{work}/hf"}
        offline = {**env, "HF_HUB_OFFLINE": "1"}
        online = {k: v for k, v in env.items() if k != "HF_HUB_OFFLINE"}
        online["HF_ENDPOINT"] = f"http://127.0.0.1:{closed}"
        cases = [
            ("made-up model path", base + ["--model", f"{work}/no-such-model"], offline),
            ("bad option (--num-points 1)", base + ["--num-points", "1"], offline),
            ("hub default, HF_HUB_OFFLINE=1", base, offline),
            ("hub default, hub unreachable", base, online),
        ]
        ray_start, _ = timed([sys.executable, "-c", "import ray; ray.init(include_dashboard=False); ray.shutdown()"],
                             env, args.repeats)
        print(f"baseline: start and stop a local Ray {ray_start:5.1f} s (median of {args.repeats})")
        for name, command, case_env in cases:
            seconds, line = timed(command, case_env, args.repeats)
            print(f"{name:32s} {seconds:5.1f} s  ({ray_start / seconds:4.1f}x faster than Ray's start-up)  {line[:110]}")
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
