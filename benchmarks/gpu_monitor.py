"""GPU utilisation while a block of code runs: NVML's "a kernel was running" percentage, sampled.

    with GpuMonitor(device) as mon:
        work()
    mon.result()   # {"gpu_util_mean_pct": ..., "gpu_util_samples": n, "gpu_util_source": "pynvml"} or {}

pynvml (the nvidia-ml-py package) when importable, else ``nvidia-smi`` polled, else
nothing (CPU runs, or a GPU machine without either). NVML's figure is the share of
each ~1/6 s window in which any kernel ran: 100% does not mean the SMs were full,
but well under 100% means the GPU waited for the host.
"""
from __future__ import annotations

import shutil
import subprocess
import threading
import time

import torch


class GpuMonitor:
    def __init__(self, device: torch.device, interval_s: float = 0.05):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.samples: list[float] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read = self._reader() if self.device.type == "cuda" else None

    def _reader(self):
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.source = "pynvml"
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # noqa: BLE001 - not installed, or no NVML: try the command line
            pass
        if shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"

            def read() -> float:
                out = subprocess.run(
                    ["nvidia-smi", "-i", str(index), "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5,
                )
                return float(out.stdout.strip().splitlines()[0])

            return read
        return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append(self._read())
            except Exception:  # noqa: BLE001 - a failed sample is skipped
                pass

    def __enter__(self) -> "GpuMonitor":
        if self._read is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> dict:
        if not self.samples:
            return {}
        return {"gpu_util_mean_pct": sum(self.samples) / len(self.samples), "gpu_util_samples": len(self.samples),
                "gpu_util_source": self.source}


def timed_run(fn, device: torch.device, min_seconds: float, min_calls: int) -> tuple[list[float], dict]:
    """Call ``fn`` until both ``min_calls`` calls and ``min_seconds`` have passed; seconds per call
    (synchronised) and the GPU utilisation over the whole run."""
    times: list[float] = []
    with GpuMonitor(device) as monitor:
        start = time.perf_counter()
        while len(times) < min_calls or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    return times, monitor.result()
