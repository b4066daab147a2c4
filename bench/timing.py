"""What the benches time with: the device sync around a timed call, cases timed in rotation (median), and the
machine a number was measured on, with the process's memory as the kernel counts it."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch


def on_gpu() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    """Wait for the GPU's queued work (a no-op without CUDA), so that a clock read sees it done."""
    if on_gpu():
        torch.cuda.synchronize()


def clocked(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> Callable[[], float]:
    """``fn`` as a case that returns the seconds (by ``clock``) of one call, the device's work included."""
    def case() -> float:
        sync()
        start = clock()
        fn()
        sync()
        return clock() - start
    return case


def interleaved(cases: dict[str, Callable[[], float]], reps: int) -> dict[str, float]:
    """Median seconds of each case, run in rotation (machine noise hits them alike) after one untimed call each;
    a case returns the seconds it measured itself (``clocked``)."""
    for case in cases.values():
        case()
    times = {name: [] for name in cases}
    for _ in range(reps):
        for name, case in cases.items():
            times[name].append(case())
    return {name: statistics.median(values) for name, values in times.items()}


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    gpu = torch.cuda.get_device_name() if on_gpu() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {gpu}; "
            f"torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}")


def proc_status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM: the peak since the last reset_peak_rss), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> None:
    """Set VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def median_runs(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per system, the median over its runs of each number a run measured."""
    return {name: {key: statistics.median(run[key] for run in rows) for key in rows[0]} for name, rows in runs.items()}
