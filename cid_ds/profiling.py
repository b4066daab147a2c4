"""`logging.profile_steps`: torch.profiler over a few training steps, to see where a step's time goes.

The first logging window (start-up, first batches, cudnn/compile warm-up) is skipped; then one step warms
the profiler up and ``profile_steps`` steps are recorded. Each rank writes ``<output_dir>/profile/rank<R>.json``
(a Chrome trace: open it in Perfetto or chrome://tracing) and ``rank<R>_ops.txt``, the ops sorted by their
own time on the device (GPU) or the CPU; rank 0 also prints the top of that table.

``DispatchCount`` counts what a block of code asks of the device rather than timing it (bench and tests).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile, schedule
from torch.utils._python_dispatch import TorchDispatchMode

TOP_OPS_PRINTED = 25


def start_profiler(steps: int, skip: int, output_dir: str, rank: int, on_gpu: bool) -> Optional[profile]:
    """A started profiler to ``.step()`` after every training step (None when ``steps`` is 0); it writes its
    results itself once the recorded steps are done."""
    if steps <= 0:
        return None
    folder = os.path.join(output_dir, "profile")
    sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"

    def write(prof: profile) -> None:
        os.makedirs(folder, exist_ok=True)
        prof.export_chrome_trace(os.path.join(folder, f"rank{rank}.json"))
        averages = prof.key_averages()
        with open(os.path.join(folder, f"rank{rank}_ops.txt"), "w") as f:
            f.write(averages.table(sort_by=sort_by, row_limit=-1))
        if rank == 0:
            print(f"[cid_ds] profile of {steps} steps (ops by {sort_by}; all of them in {folder}):\n"
                  f"{averages.table(sort_by=sort_by, row_limit=TOP_OPS_PRINTED)}", flush=True)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    prof = profile(activities=activities, schedule=schedule(wait=skip, warmup=1, active=steps, repeat=1),
                   on_trace_ready=write, record_shapes=True)
    prof.start()
    return prof


class DispatchCount(TorchDispatchMode):
    """Within ``with DispatchCount() as count:``, ``count.ops`` is the number of aten ops that compute (views
    excluded) and ``count.syncs`` the number that make the host wait for the device: a value read back
    (``.item()``, ``bool(t)``) or an output whose shape depends on values (``nonzero``, boolean indexing). On a
    GPU each op is at least one kernel launch from Python and each sync stops the host running ahead; a step
    whose per-GPU work is small is bound by these, not by its FLOPs. The counts are the same on CPU. A tensor made
    from host data (``torch.tensor(x, device=...)``) counts as a sync too: on a GPU it is a blocking copy."""

    def __enter__(self) -> "DispatchCount":
        self.ops = self.syncs = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops += 1
        if _waits_for_the_device(func, args):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def _waits_for_the_device(func, args) -> bool:
    if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default):
        return True
    if func is torch.ops.aten.index.Tensor:  # tagged dynamic, but only a boolean mask is
        return any(i is not None and i.dtype == torch.bool for i in args[1])
    return torch.Tag.dynamic_output_shape in func.tags
