"""Experiment YAML -> typed config.

Every key is checked before any work starts: an unknown key, a value of the wrong type, a number that
cannot work (``RANGES``) or a path that does not exist is a ``ConfigError`` naming the key and the YAML
file. ``key=value`` overrides from the command line use the same dotted names (``optim.lr=1e-3``) and
the same checks, and an error in one names the override. A relative path (``PATH_KEYS``), in the YAML or
an override, is relative to the current directory of the command that loads the config. The DeepSpeed JSON
is checked for keys DeepSpeed does not read (a misspelt section it would silently ignore).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import glob
import importlib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import braceexpand
import yaml

from cid_ds.data.damage import DEFAULT_MAX_DAMAGED_FRACTION
from cid_ds.io import read_json


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    student: str = ""                         # open_clip name, ds_configs/models/<name>, or local-dir:PATH
    student_pretrained: Optional[str] = None  # open_clip tag or checkpoint file
    teacher: Optional[str] = None             # only needed for online teacher / extraction
    teacher_pretrained: Optional[str] = None
    teacher_random_ok: bool = False           # a teacher without trained weights is meant (tests, benchmarks)


@dataclass
class DataConfig:
    train_shards: str = ""                # brace pattern or glob of webdataset tars
    features: Optional[str] = None        # teacher feature cache dir (data_tools.extract); None = no teacher
    missing_features: str = "error"       # error | skip: a sample whose key has no cached features
    batch_size: int = 64                  # per rank
    workers: int = 1
    # random: the student's own random crops, teacher embeddings of the eval view (open_clip's way);
    # center: the eval view for both; replay: a view stored by data_tools.extract --views, the same
    # pixels for both (stored view epoch % N of each sample, N = replay_views or all stored)
    views: str = "random"
    replay_views: int = 0
    shuffle_buffer: int = 1000
    backend: str = "auto"                 # dali | wds | auto: dali on GPU for packed shards with no side joins, else wds
    # damaged shards are read up to the damage and counted; more than this fraction of the run's shards,
    # over every rank (at least one is accepted), stops the run: the rule is in cid_ds.data.damage
    max_damaged_fraction: float = DEFAULT_MAX_DAMAGED_FRACTION


@dataclass
class LossConfig:
    clip: float = 1.0       # student image-text contrastive
    instance: float = 0.0   # student image vs teacher text, student text vs teacher image
    cluster: float = 0.0    # student image classified into its teacher k-means cluster
    # The CLIP-KD family (Yang et al., CVPR 2024; cid_ds.losses.kd). Its published mix: clip 1, crd 1, fd 2000, icl 1.
    fd: float = 0.0         # feature distillation: MSE of normalised student (projected) and teacher embeddings
    crd: float = 0.0        # KL between teacher and student image<->text similarity distributions
    icl: float = 0.0        # interactive contrastive: the instance term with its own learnable scale
    mfd: float = 0.0        # masked feature distillation: FD of the student's view with kd.mask_ratio of patches dropped
    gd: float = 0.0         # gradient distillation: MSE of the contrastive loss's gradients w.r.t. the embeddings
    afd: float = 0.0        # augmented feature distillation: contrastive loss on fused student+teacher features


# Terms that compare the student with the teacher: they need teacher embeddings in the batch.
TEACHER_TERMS = ("instance", "fd", "crd", "icl", "mfd", "gd", "afd")


@dataclass
class KDConfig:
    teacher: str = "cached"                     # cached (data.features) | online (model.teacher every step)
    teacher_logit_scale: Optional[float] = None  # crd/gd teacher logits; None: the teacher's own
    crd_temperature: float = 1.0
    mask_ratio: float = 0.5                     # mfd: fraction of image patches the student does not see
    # A cache of several teachers (data_tools.extract with --teacher repeated): mean = one target, the
    # weighted mean of their normalised embeddings (equal widths); per_teacher = every teacher term once
    # per teacher, against a student head of its own, weighted. teacher_weights: one per teacher, [] = equal.
    ensemble: str = "mean"
    teacher_weights: list[float] = field(default_factory=list)


@dataclass
class ClusterConfig:
    dir: Optional[str] = None     # data_tools.cluster output: centroids.npy + per-shard assignments
    soft: bool = False            # KL to the teacher's softmax over the centroids instead of a hard label
    positives: int = 1            # > 1: MLCD's multi-label loss over each sample's l nearest centroids (cluster --topk >= l)
    text_weight: float = 0.0      # > 0: the student's text embedding is classified into its image's cluster too,
                                  # its rows weighing this much against the image rows in the term's mean
    warmup_steps: int = 0         # the term's weight rises linearly from 0 over these steps
    margin: str = "arcface"       # arcface | cosface | none (hard labels)
    margin_value: float = 0.3
    scale: float = 32.0
    soft_temperature: float = 1.0
    sample_rate: float = 1.0      # fraction of each rank's classes scored per step, a fixed number (positives kept)
    learnable: bool = True        # False: the rows stay the k-means centroids
    lr_mult: float = 1.0          # classifier lr = optim.lr * lr_mult (its own optimizer)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    steps: int = 1000
    warmup_steps: int = 100
    grad_clip: float = 1.0


@dataclass
class PerfConfig:
    # Speed only: each setting gives the same losses within float rounding (tests/test_fast_paths.py);
    # bench/fast_paths.py measures each one.
    adamw: str = "fused"              # fused | foreach | for_loop: torch AdamW's implementation (fused: one kernel)
    compile: bool = False             # torch.compile the student: minutes of compiling, then faster steps
    cuda_graphs: bool = False         # compile in torch.compile's reduce-overhead mode: on a GPU the student's forward
                                      # and backward replay as CUDA graphs (README: what they leave out); not ZeRO-3
    grad_checkpointing: bool = False  # recompute each transformer block in backward: less memory, more compute
    channels_last: bool = False       # NHWC images (convolutions follow them): for conv students, not ViTs
    host_light_step: bool = True      # DeepSpeed's per-tensor step work as multi-tensor ops (cid_ds/deepspeed_ops.py):
                                      # only on the pinned DeepSpeed; on another version the stock step, with a warning


@dataclass
class LoggingConfig:
    every: int = 10                     # steps between scalar reads (each read syncs the device)
    tensorboard_dir: Optional[str] = None  # default: <output_dir>/tensorboard
    profile_steps: int = 0              # > 0: torch.profiler over this many steps after the first window (cid_ds/profiling.py)


@dataclass
class CheckpointConfig:
    every: int = 500
    keep: int = 2
    resume: str = "auto"                # auto | none (RESUME_KEYWORDS) | path to a checkpoint dir
    stop_check_every: int = 10          # steps between the ranks' check for SIGTERM/SIGUSR1 (one all-reduce)
    max_nonfinite_in_a_row: int = 10    # a NaN/inf loss or gradient norm skips its step; this many in a row stop
                                        # the job (read at the stop checks and logging windows)


RESUME_KEYWORDS = ("auto", "none")


@dataclass
class EvalConfig:
    sets: list[str] = field(default_factory=list)  # clip_benchmark wds/ layout folders
    batch_size: int = 256
    at_end: bool = True


@dataclass
class Config:
    name: str = "experiment"
    seed: int = 0
    output_dir: str = "runs/experiment"
    deepspeed_config: str = "ds_configs/zero2.json"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The allowed values of string keys. Where the module that uses a key defines them, it is named here
# ("module:CONSTANT", imported when a config is checked) rather than the list copied.
CHOICES = {
    "data.missing_features": "cid_ds.data.batch:MISSING_FEATURES",
    "data.backend": "cid_ds.data.loader:BACKENDS",
    "data.views": ("random", "center", "replay"),
    "kd.ensemble": ("mean", "per_teacher"),
    "cluster.margin": "cid_ds.parallel.partial_fc:MARGINS",
    "kd.teacher": ("cached", "online"),
    "perf.adamw": "cid_ds.engine:ADAMW_IMPLEMENTATIONS",
}


def allowed_values(dotted: str) -> Optional[tuple]:
    """The values ``CHOICES`` allows for a key (None: any)."""
    choices = CHOICES.get(dotted)
    if isinstance(choices, str):
        module, name = choices.split(":")
        choices = tuple(getattr(importlib.import_module(module), name))
    return choices

# What a number must be to work: (the rule as said in an error, its test). A list is checked item by item.
POSITIVE = ("> 0", lambda v: v > 0)
NON_NEGATIVE = (">= 0", lambda v: v >= 0)
OPEN_FRACTION = ("in (0, 1)", lambda v: 0 < v < 1)
FRACTION = ("in (0, 1]", lambda v: 0 < v <= 1)
BETA = ("in [0, 1)", lambda v: 0 <= v < 1)
CLOSED_FRACTION = ("in [0, 1]", lambda v: 0 <= v <= 1)
RANGES = {
    "seed": NON_NEGATIVE,
    "data.batch_size": POSITIVE,
    "data.workers": NON_NEGATIVE,
    "data.replay_views": NON_NEGATIVE,  # 0: every stored view
    "data.shuffle_buffer": NON_NEGATIVE,
    "data.max_damaged_fraction": CLOSED_FRACTION,
    **{f"loss.{term.name}": NON_NEGATIVE for term in dataclasses.fields(LossConfig)},
    "kd.teacher_logit_scale": POSITIVE,
    "kd.crd_temperature": POSITIVE,
    "kd.mask_ratio": OPEN_FRACTION,
    "kd.teacher_weights": NON_NEGATIVE,
    "cluster.margin_value": NON_NEGATIVE,
    "cluster.scale": POSITIVE,
    "cluster.soft_temperature": POSITIVE,
    "cluster.sample_rate": FRACTION,
    "cluster.lr_mult": NON_NEGATIVE,
    "cluster.positives": POSITIVE,
    "cluster.text_weight": NON_NEGATIVE,
    "cluster.warmup_steps": NON_NEGATIVE,
    "optim.lr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.betas": BETA,
    "optim.eps": POSITIVE,
    "optim.steps": POSITIVE,
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.grad_clip": NON_NEGATIVE,  # 0: no clipping
    "logging.every": POSITIVE,
    "logging.profile_steps": NON_NEGATIVE,  # 0: off
    "checkpoint.every": POSITIVE,
    "checkpoint.keep": POSITIVE,
    "checkpoint.stop_check_every": POSITIVE,
    "checkpoint.max_nonfinite_in_a_row": POSITIVE,
    "eval.batch_size": POSITIVE,
}


def _path(value: str, cwd: str) -> str:
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(cwd, value))


def _model_path(spec: str, cwd: str) -> str:
    """``local-dir:REL`` gets its folder resolved; other specs (open_clip and ``hf-hub:`` names, the names of
    ds_configs/models folders) are not paths."""
    prefix = "local-dir:"
    return prefix + _path(spec[len(prefix):], cwd) if spec.startswith(prefix) else spec


def _weights_path(value: str, cwd: str) -> str:
    """A weights file is resolved; an open_clip pretrained tag is not a path (``create_model`` takes a value
    that is a file as a file)."""
    return _path(value, cwd) if os.path.isfile(os.path.join(cwd, value)) else value


def _resume_path(value: str, cwd: str) -> str:
    return value if value in RESUME_KEYWORDS else _path(value, cwd)


# The keys that name files or folders, and how a relative value of each is made absolute: against the current
# directory of the command that loads the config, once, in load_config, so that a later change of directory
# (a launcher's, a container's) cannot move them.
PATH_KEYS = {
    "output_dir": _path,
    "deepspeed_config": _path,
    "model.student": _model_path,
    "model.student_pretrained": _weights_path,
    "model.teacher": _model_path,
    "model.teacher_pretrained": _weights_path,
    "data.train_shards": _path,  # a brace pattern or glob, joined to the directory as a whole
    "data.features": _path,
    "cluster.dir": _path,
    "logging.tensorboard_dir": _path,
    "checkpoint.resume": _resume_path,
    "eval.sets": _path,  # each item
}


def _resolve_paths(cfg: Config, cwd: str) -> None:
    """Make the relative paths of ``PATH_KEYS`` absolute against ``cwd``; unset and empty values stay."""
    for dotted, resolve in PATH_KEYS.items():
        *sections, key = dotted.split(".")
        owner = functools.reduce(getattr, sections, cfg)
        value = getattr(owner, key)
        if isinstance(value, list):
            setattr(owner, key, [resolve(item, cwd) for item in value])
        elif value:
            setattr(owner, key, resolve(value, cwd))


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, coerced value). ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return True, None
        return _type_ok(value, args[0])
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            return False, value
        out = []
        for v in value:
            ok, cv = _type_ok(v, item_tp)
            if not ok:
                return False, value
            out.append(cv)
        return True, out
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        try:  # YAML 1.1 reads '1e-3' (no dot) as a string
            return True, float(value)
        except (TypeError, ValueError):
            return False, value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config type {tp}")


def _fill(obj: Any, values: dict, prefix: str, source: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{dotted}' (known: {', '.join(sorted(names))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: key '{dotted}' must be a mapping, got {type(value).__name__}")
            _fill(getattr(obj, key), value, dotted + ".", source)
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ConfigError(
                f"{source}: key '{dotted}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        allowed = allowed_values(dotted)
        if allowed is not None and coerced not in allowed:
            raise ConfigError(f"{source}: key '{dotted}' must be one of {allowed}, got {coerced!r}")
        _check_range(dotted, coerced, source)
        setattr(obj, key, coerced)


def _check_range(dotted: str, value: Any, source: str) -> None:
    if dotted not in RANGES or value is None:
        return
    rule, holds = RANGES[dotted]
    if not all(holds(v) for v in (value if isinstance(value, list) else [value])):
        raise ConfigError(f"{source}: key '{dotted}' must be {rule}, got {value!r}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else tp.__name__


def _override_tree(item: str) -> dict:
    """``a.b=value`` as ``{"a": {"b": value}}``, the value parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value")
    dotted, raw = item.split("=", 1)
    try:
        tree = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': the value is not valid YAML: {e}") from None
    for part in reversed(dotted.strip().split(".")):
        tree = {part: tree}
    return tree


def expand_shards(pattern: str) -> list[str]:
    """Brace patterns ('{00000..00041}.tar') and globs, in sorted order, duplicates removed."""
    paths: list[str] = []
    for part in braceexpand.braceexpand(pattern):
        matches = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        paths.extend(matches)
    return list(dict.fromkeys(paths))


@functools.lru_cache(maxsize=None)
def deepspeed_top_level_keys() -> frozenset[str]:
    """Every top-level key the installed DeepSpeed's config parser looks up, recorded while it parses a
    minimal config (so the list follows DeepSpeed's version, not a copy of its documentation)."""
    from deepspeed.runtime.config import DeepSpeedConfig
    looked_up: set[str] = set()

    class Keys(set):  # `key in config.keys()`
        def __contains__(self, key: object) -> bool:
            looked_up.add(key)
            return super().__contains__(key)

    class Recording(dict):
        def get(self, key, default=None):
            looked_up.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            looked_up.add(key)
            return super().__getitem__(key)

        def __contains__(self, key: object) -> bool:
            looked_up.add(key)
            return super().__contains__(key)

        def keys(self) -> Keys:
            return Keys(super().keys())

    DeepSpeedConfig(Recording(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1))
    return frozenset(looked_up)


def check_deepspeed_json(path: str) -> None:
    """A DeepSpeed JSON with only keys DeepSpeed reads at its top level: it ignores a misspelt section."""
    try:
        ds = read_json(path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: a DeepSpeed JSON is an object of sections, got {type(ds).__name__}")
    known = deepspeed_top_level_keys()
    for key in ds:
        if key not in known:
            nearest = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{nearest[0]}'?)" if nearest else ""
            raise ConfigError(f"{path}: unknown DeepSpeed key '{key}'{hint}")


def must_exist(key: str, path: Optional[str], source: str, kind: str = "file") -> None:
    """A ConfigError naming ``key`` unless ``path`` (None: not set) is an existing file or folder."""
    if path is None:
        return
    exists = os.path.isdir(path) if kind == "dir" else os.path.isfile(path)
    if not exists:
        cwd = os.getcwd()
        hint = f" (relative paths resolve against the current directory, {cwd})" \
            if os.path.commonpath([cwd, os.path.abspath(path)]) == cwd else ""
        raise ConfigError(f"{source}: key '{key}': {kind} not found: {path}{hint}")


def _check_paths(cfg: Config, source: str) -> None:
    """The files the config names exist and its keys agree with each other. What the artifacts hold (a
    cache's manifest, a teacher's weights) is checked against them by cid_ds.sources.check_sources."""
    must_exist("deepspeed_config", cfg.deepspeed_config, source)
    check_deepspeed_json(cfg.deepspeed_config)
    if not cfg.data.train_shards:
        raise ConfigError(f"{source}: key 'data.train_shards' is required")
    shards = expand_shards(cfg.data.train_shards)
    missing = [p for p in shards if not os.path.isfile(p)]
    if not shards or missing:
        raise ConfigError(f"{source}: key 'data.train_shards': no such shard: {missing[0] if missing else cfg.data.train_shards}")
    for i, path in enumerate(cfg.eval.sets):
        must_exist(f"eval.sets[{i}]", path, source, "dir")
    if not cfg.model.student:
        raise ConfigError(f"{source}: key 'model.student' is required")
    if cfg.kd.teacher == "online":
        if not cfg.model.teacher:
            raise ConfigError(f"{source}: key 'kd.teacher' is online but 'model.teacher' is not set")
        if cfg.data.features is not None:
            raise ConfigError(f"{source}: key 'kd.teacher' is online: drop 'data.features' (the cache would be unused)")
    if cfg.loss.instance > 0 and cfg.loss.icl > 0:
        raise ConfigError(f"{source}: keys 'loss.instance' and 'loss.icl' are the same term (icl has its own "
                          "learnable scale): set one of them")
    if cfg.data.views == "replay" and cfg.kd.teacher == "online":
        raise ConfigError(f"{source}: key 'data.views' is replay, which replays views stored in a feature cache; an "
                          "online teacher already sees the student's own crops: use data.views random")
    if cfg.data.replay_views and cfg.data.views != "replay":
        raise ConfigError(f"{source}: key 'data.replay_views' is set but data.views is {cfg.data.views}, not replay")
    if cfg.kd.teacher_weights and sum(cfg.kd.teacher_weights) <= 0:
        raise ConfigError(f"{source}: key 'kd.teacher_weights' must have a positive sum, got {cfg.kd.teacher_weights}")
    if cfg.loss.cluster > 0:
        if cfg.cluster.dir is None:
            raise ConfigError(f"{source}: key 'loss.cluster' > 0 needs 'cluster.dir' (python -m data_tools.cluster)")
        if cfg.cluster.soft and cfg.cluster.positives > 1:
            raise ConfigError(f"{source}: key 'cluster.positives' > 1 is the hard-label multi-label loss; "
                              "cluster.soft already scores every centroid: set one of them")
    if cfg.checkpoint.resume not in RESUME_KEYWORDS:
        must_exist("checkpoint.resume", cfg.checkpoint.resume, source, "dir")


def load_config(path: str, overrides: list[str] = (), check_paths: bool = True) -> Config:
    """Load an experiment YAML, apply ``key=value`` overrides (values parsed as YAML), make its relative paths
    absolute against the current directory (``PATH_KEYS``), validate."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    cfg = Config()
    _fill(cfg, tree, "", path)
    for item in overrides:  # a second pass each, so that an error names the override, not the file
        _fill(cfg, _override_tree(item), "", f"override '{item}'")
    _resolve_paths(cfg, os.getcwd())
    if check_paths:
        _check_paths(cfg, config_source(path, overrides))
    return cfg


def config_source(path: str, overrides: list[str] = ()) -> str:
    """How errors name a config: its file and the overrides applied."""
    return f"{path} with overrides {' '.join(overrides)}" if overrides else path
