"""The DeepSpeed engine's parts: its JSON (the YAML owns batch, clipping, optimizer and schedule), the
optimizer and its schedule, the engine as the trainer steps it, the compute dtype, and distributed start-up."""
from __future__ import annotations

import contextlib
import math
import os
import socket
from typing import Any, Callable, Optional

import torch

from cid_ds.config import Config, ConfigError
from cid_ds.deepspeed_ops import make_step_host_light
from cid_ds.io import read_json
from cid_ds.step_guard import StepGuard

DS_KEYS_OWNED_BY_YAML = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                         "gradient_clipping", "optimizer", "scheduler")


def deepspeed_config(cfg: Config, on_gpu: bool) -> dict:
    """The DeepSpeed JSON named by the YAML, with the batch and clipping the YAML owns filled in.

    The JSON says *how* to train (ZeRO stage, precision, communication); the YAML says *what* (batch,
    optimizer, schedule), so each fact lives in one file: a JSON that sets a YAML-owned key is an error.
    """
    path = cfg.deepspeed_config
    ds = read_json(path)
    for key in DS_KEYS_OWNED_BY_YAML:
        if key in ds:
            raise ConfigError(f"{path}: key '{key}' is set by the experiment YAML, remove it from the DeepSpeed JSON")
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = cfg.optim.grad_clip
    # DeepSpeed's throughput timer (its own samples/s prints) synchronizes the device at every forward and step
    # by default; the trainer measures its own samples/s per logging window
    ds.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)
    autocast = ds.get("torch_autocast", {})
    fp16 = ds.get("fp16", {}).get("enabled") or (autocast.get("enabled") and _names_fp16(autocast.get("dtype")))
    if cfg.loss.cluster > 0 and fp16 and on_gpu:
        raise ConfigError(f"{path}: fp16 loss scaling would also scale the centroid classifier's gradients, "
                          "which live outside the engine: use bf16 with the cluster term")
    if cfg.perf.cuda_graphs and ds.get("zero_optimization", {}).get("stage", 0) == 3:
        raise ConfigError(f"{path}: perf.cuda_graphs replays the student's kernels on the same parameter memory, "
                          "and ZeRO-3 gathers and frees the parameters every step: use a ZeRO stage of 0 to 2")
    if not on_gpu:  # bf16/fp16 matmuls on CPU are slower than fp32 and DeepSpeed's CPU path is fp32-tested
        for precision in ("bf16", "fp16", "torch_autocast"):
            ds.setdefault(precision, {})["enabled"] = False
    return ds


def _names_fp16(dtype: Optional[str]) -> bool:
    """Whether a JSON dtype string is fp16, by DeepSpeed's own parser (a string it cannot read is left to it)."""
    from deepspeed.runtime.config import DtypeEnum
    try:
        return DtypeEnum(dtype) is DtypeEnum.fp16
    except ValueError:
        return False


def compute_dtype(engine) -> torch.dtype:
    """What the student computes in: torch autocast's dtype (the weights stay fp32), or the dtype DeepSpeed
    cast the weights to (its bf16/fp16 modes). Inputs and an online teacher are sent in it."""
    if engine.torch_autocast_enabled():
        return engine.torch_autocast_dtype()
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, embeddings of rank < 2 and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


ADAMW_IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """torch's AdamW over ``param_groups``, in the implementation ``perf.adamw`` names. torch's own default
    is the per-tensor for-loop on CPU; inside ZeRO the optimizer sees a few flat tensors, where only
    ``fused`` (one kernel instead of one op per Adam term) saves time."""
    return torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                             eps=cfg.optim.eps, **ADAMW_IMPLEMENTATIONS[cfg.perf.adamw])


def build_engine(student: torch.nn.Module, cfg: Config, on_gpu: bool,
                 lr_factor: Optional[Callable[[int], float]] = None) -> tuple[Any, StepGuard]:
    """The student's DeepSpeed engine as the trainer steps it: ``build_optimizer``'s AdamW (on ``lr_factor``'s
    schedule, when given), the non-finite guard (cid_ds.step_guard; it wants the optimizer after
    ``deepspeed.initialize`` has placed its parameters), the step made host-light with the guard joined where
    ``perf.host_light_step`` says (cid_ds.deepspeed_ops), and the student compiled as ``perf`` says. Returns the
    engine and its guard. Benches and tests build engines here too, so they measure and check what trains."""
    import deepspeed
    optimizer = build_optimizer(student, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor) if lr_factor is not None else None
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=deepspeed_config(cfg, on_gpu))
    guard = StepGuard(optimizer, engine.device)
    if cfg.perf.host_light_step:
        make_step_host_light(engine, guard)
    compile_student(engine, cfg)
    return engine, guard


def compile_student(engine, cfg: Config) -> None:
    """``perf.compile``: the student compiled in place (nn.Module.compile: parameter names and checkpoints stay as
    they are). ``perf.cuda_graphs``: in torch.compile's reduce-overhead mode, whose CUDA graphs replay the student's
    forward and backward, possible because no shape in a step depends on data and nothing in it waits for the
    device; on CPU it compiles as ``perf.compile`` does."""
    if cfg.perf.compile or cfg.perf.cuda_graphs:
        engine.compile(compile_kwargs={"mode": "reduce-overhead"} if cfg.perf.cuda_graphs else {})


def cosine_with_warmup(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def init_distributed(dist_backend: Optional[str] = None) -> None:
    """``deepspeed.init_distributed``, letting a plain ``python -m cid_ds.train`` run as a 1-rank job (the
    launcher sets these variables itself), and on CPU without leaving DeepSpeed's shared memory behind. The
    rendezvous listens on MASTER_ADDR only (cid_ds.rendezvous), not on every interface as torch's env:// does."""
    import deepspeed

    from cid_ds.rendezvous import bound_init_method
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend=dist_backend, init_method=bound_init_method())
    unlink_cpu_allreduce_buffer()


def unlink_cpu_allreduce_buffer() -> None:
    """DeepSpeed's CPU all-reduce op, when all ranks share a machine, creates a 66 MB /dev/shm file per rank,
    maps every rank's, and never unlinks them: each run left them in RAM until reboot (one set per
    MASTER_PORT). Once every rank is past initialisation (the barrier), every file is mapped, so
    removing this rank's name changes nothing while the ranks run and frees the memory when they exit."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() != "cpu":
        return
    dist.barrier()
    name = "_".join(["deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), str(dist.get_rank())])
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join("/dev/shm", name))
