"""DeepSpeed 0.19's per-parameter-tensor work in a step, done with torch's multi-tensor ops instead.

On a GPU a student's step is bound by the host launching ops (bench/RESULTS.md: 14% MFU for ViT-B/16, the
cid_ds step 2.7x open_clip's plain one). Under torch autocast the engine adds, per parameter tensor, a norm and
a multiply for clipping (no ZeRO), a copy back from each all-reduce bucket, and in ZeRO-1/2 an fp64 cast and a
norm per gradient of the partition plus two value reads for a gradient norm that ``step`` already checked.
``make_step_host_light`` replaces these methods on the engine and its ZeRO optimizer with ``torch._foreach_*``
versions that compute the same numbers (the same formulas, in the same order: tests/test_shipped_precision.py checks
equal weights after steps at one and two ranks). Counted with ``cid_ds.profiling.DispatchCount`` in
``bench/engine_dispatch.py``.

With a ``cid_ds.step_guard.StepGuard`` the global gradient norm, where the engine computes it for clipping, adds its
verdict to the guard's device flag, and ZeRO-1/2's step no longer reads the norm back to decide on the host.

These are DeepSpeed's private methods, so they are fenced: the trainer applies them only with ``perf.host_light_step``
(on by default) and only on the DeepSpeed version they were written against (requirements.txt pins it). On any other
version the engine keeps DeepSpeed's stock step, with a warning, rather than guess at its internals: an upgrade costs
speed, never a run.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist

from cid_ds.step_guard import StepGuard

DEEPSPEED_VERSION = "0.19.8"  # whose engine and stage_1_and_2 methods are replaced here


def make_step_host_light(engine, guard: Optional[StepGuard] = None) -> None:
    """Replace the engine's per-tensor step work (ZeRO 0, 1 and 2; ZeRO-3 is left as it is). ``guard``: the
    trainer's non-finite step verdict, which the gradient norm joins. On another DeepSpeed version the stock step
    stays, with a warning."""
    import deepspeed
    if deepspeed.__version__ != DEEPSPEED_VERSION:
        warnings.warn(f"perf.host_light_step: cid_ds.deepspeed_ops replaces private methods of DeepSpeed "
                      f"{DEEPSPEED_VERSION} and this is {deepspeed.__version__}: DeepSpeed's stock step runs instead "
                      "(the same numbers, more host work per step; a non-finite gradient norm under a finite loss is "
                      "then left to DeepSpeed). Install the version requirements.txt pins for the faster step",
                      stacklevel=2)
        return
    stage = engine.zero_optimization_stage()
    if stage == 0:
        _skip_allreduce_at_one_rank(engine)
        engine.allreduce_and_copy = _engine_allreduce_and_copy(engine)
        engine.clip_fp32_gradients = _clip_fp32_gradients(engine, guard)
        if guard is not None and engine.gradient_clipping() == 0:
            engine._take_model_step = _take_model_step_with_norm_checked(engine, guard)
    elif stage in (1, 2):
        optimizer = engine.optimizer
        optimizer.allreduce_and_copy = _zero_allreduce_and_copy(optimizer, optimizer.allreduce_and_copy)
        optimizer.get_grad_norm_direct = _zero_grad_norm(optimizer)
        optimizer.unscale_and_clip_grads = _zero_unscale_and_clip(optimizer, guard)
        if guard is not None and guard.decided_on_device:
            optimizer.step = _zero_step_without_host_norm_check(optimizer.step)


def _skip_allreduce_at_one_rank(engine) -> None:
    """Without ZeRO, DeepSpeed all-reduces the gradients after every backward even at one rank, where there is
    nothing to average: it copies each gradient into a flat buffer, reduces it with itself and copies it back
    (11 ms of the demo's 154 ms step on 2 CPU cores). ZeRO's own reduction also keeps its books, so it stays."""
    if engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False


def _engine_allreduce_and_copy(engine):
    """engine.allreduce_and_copy: the bucket's gradients copied back from the reduced flat tensor in one op."""
    def allreduce_and_copy(small_bucket, dp_group, dp_world_size=None):
        reduced = engine.allreduce_bucket(small_bucket, dp_group, dp_world_size)
        torch._foreach_copy_(small_bucket, list(engine.unflatten(reduced, small_bucket)))
    return allreduce_and_copy


def _global_grad_norm(engine) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The gradients and their global norm as deepspeed.runtime.utils.clip_grad_norm_ computes it without model
    parallelism: one multi-tensor norm, averaged over the data-parallel ranks."""
    from deepspeed.utils import groups
    grads = [p.grad.data for p in engine.module.parameters() if p.grad is not None]
    if not grads:  # the same on every rank
        return grads, torch.zeros((), device=engine.device)
    norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads], 2.0)
    total = torch.stack(norms).pow(2.0).sum().float().pow(0.5)
    group = groups._get_data_parallel_group()
    total = total * 1.0 / float(dist.get_world_size(group=group))
    dist.all_reduce(total, group=group)
    return grads, total


def _clip_fp32_gradients(engine, guard: Optional[StepGuard]):
    """engine.clip_fp32_gradients: the global norm (``_global_grad_norm``) and one multiply."""
    def clip_fp32_gradients():
        grads, total = _global_grad_norm(engine)
        if guard is not None:
            guard.check_grad_norm(total)
        coefficient = torch.full_like(total, float(engine.gradient_clipping())) / (total + 1e-6)
        torch._foreach_mul_(grads, torch.clamp(coefficient, max=1.0))
    return clip_fp32_gradients


def _take_model_step_with_norm_checked(engine, guard: StepGuard):
    """engine._take_model_step without clipping, which then computes no gradient norm: the guard gets one."""
    stock = engine._take_model_step

    def take_model_step(lr_kwargs):
        guard.check_grad_norm(_global_grad_norm(engine)[1])
        return stock(lr_kwargs)
    return take_model_step


def _zero_allreduce_and_copy(optimizer, stock):
    """stage_1_and_2's allreduce_and_copy, with the copy back in one op where that is all it does: not on a
    device whose overlapping reduction stream needs each buffer recorded, and not into grad partition buffers."""
    from deepspeed.accelerator import get_accelerator

    def allreduce_and_copy(small_bucket, communication_data_type, rank=None, log=None, divide=True,
                           process_group=None, output_bucket=None):
        overlapped_stream = optimizer.overlap_comm and not get_accelerator().resolves_data_dependency()
        if overlapped_stream or (output_bucket is not None and any(o is not None for o in output_bucket)):
            return stock(small_bucket, communication_data_type, rank, log, divide, process_group, output_bucket)
        process_group = optimizer.dp_process_group if process_group is None else process_group
        if optimizer.overlap_comm:
            optimizer._clear_previous_reduced_grads()
        reduced = optimizer.allreduce_bucket(small_bucket, communication_data_type, rank=rank, log=log,
                                             divide=divide, process_group=process_group)
        if rank is None or rank == dist.get_rank(group=process_group):
            torch._foreach_copy_(small_bucket, list(optimizer.unflatten(reduced, small_bucket)))
    return allreduce_and_copy


def _zero_grad_norm(optimizer):
    """stage_1_and_2's get_grad_norm_direct for the L2 norm without model or pipeline parallelism: each
    gradient's norm in fp64 from one multi-tensor norm, instead of a cast and a norm per gradient."""
    from deepspeed.runtime.zero.utils import get_norm_dtype
    stock = optimizer.get_grad_norm_direct

    def get_grad_norm_direct(gradients, params, norm_type=2):
        if float(norm_type) != 2.0 or optimizer.model_parallel_rank != 0 or \
                any(getattr(p, "ds_pipe_replicated", False) for p in params):
            return stock(gradients, params, norm_type)
        grads = [g.detach() for g in gradients if not getattr(g, "_zero_padding", False)]
        if grads:
            norms = torch._foreach_norm(grads, 2.0, dtype=get_norm_dtype())
            total = torch.stack(norms).pow(2.0).sum().float()
        else:
            total = torch.zeros((), dtype=torch.float32, device=optimizer.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=optimizer.dp_process_group)
        optimizer._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
        total = total.pow(0.5)
        # DeepSpeed's mask_nan_or_inf_with_val_inplace, without its torch.tensor(-1.0, device=...): a blocking copy
        return total.masked_fill_(~torch.isfinite(total), -1.0)
    return get_grad_norm_direct


def _zero_unscale_and_clip(optimizer, guard: Optional[StepGuard]):
    """stage_1_and_2's unscale_and_clip_grads without its second read of the norm: ``step`` calls it only
    after it has checked that norm (on the host, or through the guard, which it joins here), so the check is
    not repeated. A norm DeepSpeed marked invalid (-1) leaves the gradients unclipped: the guard skips them."""
    def unscale_and_clip_grads(grad_groups_flat, total_norm):
        if guard is not None and total_norm is not None:
            guard.check_grad_norm(total_norm)
        if optimizer.clip_grad == 0.0 and optimizer.loss_scale == 1.0:
            return
        combined_scale = optimizer.loss_scale
        if optimizer.clip_grad > 0.0:
            clip = ((total_norm / optimizer.loss_scale) + 1e-6) / optimizer.clip_grad
            combined_scale = torch.clamp(clip, min=1.0) * optimizer.loss_scale
        flat = [g.data for group in grad_groups_flat for g in (group if isinstance(group, list) else [group])]
        torch._foreach_mul_(flat, 1.0 / combined_scale)
    return unscale_and_clip_grads


def _zero_step_without_host_norm_check(stock_step):
    """stage_1_and_2's step without its read of the gradient norm (``is_invalid_grad_norm``, a device sync per
    step): with a guard the fused AdamW skips a non-finite step on the device instead. The module's function is
    replaced for the call only, so other optimizers in the process keep it."""
    from deepspeed.runtime.zero import stage_1_and_2
    host_check = stage_1_and_2.is_invalid_grad_norm

    def step(closure=None):
        stage_1_and_2.is_invalid_grad_norm = lambda norm: False
        try:
            return stock_step(closure)
        finally:
            stage_1_and_2.is_invalid_grad_norm = host_check
    return step
