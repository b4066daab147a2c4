"""Non-finite steps, decided on the device: a step whose loss (on any rank) or gradient norm is not finite leaves
the student's weights and optimizer state, and the centroid classifier's rows, as they were.

The verdict is a device flag, 1.0 for a step to skip. The fused AdamW reads it as ``found_inf``, as torch's
GradScaler hands it over: the kernel leaves parameters and moments alone and takes its step count back. The
engine's gradient norm adds its verdict (cid_ds.deepspeed_ops, where it computes the norm for clipping), and the
classifier's row update obeys the same flag. The host reads nothing per step; it reads the counts, exactly, at the
windows where it reads anything (logging, stop checks). A skipped step still counts as a step of the schedule.

Where the optimizer cannot skip on the device, ``decided_on_device`` is False and its ``step`` reads the verdict back
first and does nothing on a skip (one sync per call): torch's foreach and for-loop AdamW take no ``found_inf``, and a
fused AdamW whose parameters are elsewhere (a CPU-offloaded optimizer) would copy the flag from the GPU without
waiting for it (torch's non-blocking copy) and could read it before it is written.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class StepGuard:
    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        """``optimizer``: the torch optimizer itself, inside whatever DeepSpeed wraps it in, after
        ``deepspeed.initialize`` (which moves its parameters where they are stepped)."""
        device = torch.device(device)
        self.optimizer = optimizer
        self.decided_on_device = bool(optimizer.defaults.get("fused")) and all(
            p.device == device for group in optimizer.param_groups for p in group["params"])
        if not self.decided_on_device:
            optimizer.step = self._unless_skipped(optimizer.step)
        self.skip = torch.zeros((), device=device)
        self._skipped, self._run, self._longest = (torch.zeros((), device=device) for _ in range(3))
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._steps = 0  # in the window, on the host: the applied ones are these less the skipped ones

    def backward_and_step(self, engine, total: torch.Tensor, losses: Optional[dict[str, torch.Tensor]] = None
                          ) -> None:
        """``engine``'s backward and step on the loss ``total`` under this step's verdict, then the step counted,
        with ``total`` and the terms ``losses`` added to the window's sums."""
        self.check_loss(total)
        engine.backward(total)
        engine.step()
        self.end_step((losses or {}) | {"total": total})

    def check_loss(self, total: torch.Tensor) -> None:
        """Start the step's verdict: skip when the loss is not finite on some rank."""
        finite = torch.isfinite(total.detach()).float()
        dist.all_reduce(finite, dist.ReduceOp.MIN)
        self._set(1 - finite)

    def check_grad_norm(self, norm: torch.Tensor) -> None:
        """Add the global gradient norm's verdict (DeepSpeed's ZeRO writes a non-finite norm as -1)."""
        self._set(torch.maximum(self.skip, (~torch.isfinite(norm) | (norm < 0)).float()))

    def _set(self, skip: torch.Tensor) -> None:
        self.skip = skip
        if self.decided_on_device:
            self.optimizer.found_inf = skip

    def _unless_skipped(self, step):
        def step_unless_skipped(*args, **kwargs):
            if self.skip.item():  # the verdict read back: an optimizer that cannot skip on the device
                return None
            return step(*args, **kwargs)
        return step_unless_skipped

    def end_step(self, losses: dict[str, torch.Tensor]) -> None:
        """Count the step, and add its losses to the window's sums unless it was skipped."""
        skipped = self.skip > 0
        for name, value in losses.items():
            kept = torch.where(skipped, 0.0, value.detach().float())
            self._loss_sums[name] = self._loss_sums[name] + kept if name in self._loss_sums else kept
        self._steps += 1
        self._skipped += self.skip
        self._run = (self._run + 1) * self.skip
        self._longest = torch.maximum(self._longest, self._run)

    def longest_run(self) -> int:
        """The most steps skipped in a row since the last call (a run still going counts on)."""
        longest = int(self._longest.item())
        self._longest = self._run.clone()
        return longest

    def take_window(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """This rank's losses averaged over the window's applied steps (NaN where none was), the number of steps
        skipped and applied, all device tensors; the window starts again from zero."""
        applied = self._steps - self._skipped
        window = {name: total / applied for name, total in self._loss_sums.items()}, self._skipped, applied
        self._loss_sums, self._skipped, self._steps = {}, torch.zeros_like(self.skip), 0
        return window
