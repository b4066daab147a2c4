"""Training throughput: cid_ds against open_clip's own trainer on the same student, teacher, shards, global
batch, precision and steps, and a before/after line for each fast path of the cid_ds step.

    python bench/vs_open_clip.py [--work runs/bench_vs_open_clip] [--steps 60] [--rounds 3]
    python bench/vs_open_clip.py --student ViT-B-16        # on a GPU machine: the >= 40% MFU target
    python bench/vs_open_clip.py --systems "cid_ds CID" --no-fast-paths --rounds 1 [--cid-backend wds]
                                 [--profile-steps 5]       # one system (short GPU leases); where its time goes

Without CUDA: the demo student and teacher (ds_configs/models/demo-*), fp32, batch 128, one loader worker
per system, the demo data. With CUDA: bf16 (open_clip --precision amp_bf16; cid_ds torch autocast bf16
from the YAMLs' ds_configs/zero0.json), cid_ds decoding with DALI on the GPU (data.backend=dali), a ViT-B/32 student
and a ViT-L/14 teacher with random weights, batch 256 per GPU, 8 loader workers / DALI threads.

Both systems read the same distill-ready shards (data_tools.pack output: open_clip uses their jpg + txt;
cid_ds also their token ids, teacher embeddings and cluster ids), made here once from the demo data by the
real stages (extract with the teacher, k-means, pack). The teacher is saved as a local-dir: folder (random
weights, seed 0) so that open_clip's --distill-model and the feature cache use the same weights. In
rotation, --rounds times, each run a fresh process through its real entry point:

  open_clip                python -m open_clip_train.main (CLIP loss)
  open_clip --distill      + --distill-model: the teacher's forward in every step (DistillClipLoss)
  cid_ds instance          deepspeed launch/train.py demo_distill.yaml: CLIP + instance distillation
  cid_ds CID               demo_cid.yaml: + cluster discrimination
  cid_ds CID for-loop AdamW  perf.adamw=for_loop, torch's CPU default (before perf.adamw=fused)
  cid_ds CID perf.compile    perf.compile=true (its compiling falls in the dropped first window)
  cid_ds CID perf.cuda_graphs  perf.cuda_graphs=true (on a GPU: the student's CUDA graphs replayed)
  cid_ds CID zero2.json      deepspeed_config=ds_configs/zero2.json (before the demo YAMLs' zero0.json)

Samples/s is the steady state: each run logs every --log-every steps and its first window (start-up,
first batches) is dropped; the median over rounds is reported with the data-wait fraction. FLOPs per
sample are counted with torch.utils.flop_counter on one training step of each system (attention through
the math kernel and nn.MultiheadAttention's slow path, so that every matmul is seen) and compared with
the matrix-multiply peak measured in the same run (fp32 on CPU, bf16 on GPU).

Then, in this process on the same student and a real batch, interleaved, median of --reps: AdamW
implementations inside the engine step, the engine step at ZeRO stage 2 and 0, backward + step with and
without the one-rank gradient all-reduce, torch.compile, gradient checkpointing, the SDPA kernel,
channels-last (the ViT student and a small ResNet), stored token ids against tokenising, the loader's CPU
time per batch, the per-step non-finite verdict and the logging window.

open_clip's trainer needs webdataset 0.2.x (ours is 1.x), so it runs in a virtualenv made here
(--open-clip-env, default ~/.cache/cid_ds/open_clip_train_env, reused): webdataset 0.2.86 (the newest
open_clip_torch[training] allows) and pandas, nothing else; a .pth file appends this environment's
site-packages after its own, so torch and open_clip are ours. --open-clip-python uses an interpreter you
made instead (a GPU node without PyPI). Results: printed, and WORK/results.json.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import logging
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from typing import Callable, Iterator, Optional

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from cid_ds.config import Config, expand_shards, load_config  # noqa: E402
from cid_ds.io import atomic_path, read_json, write_json  # noqa: E402
from cid_ds.models import DistillStudent, create_model, model_config, resolve_spec  # noqa: E402

OPEN_CLIP_ENV = os.path.join(os.path.expanduser("~"), ".cache", "cid_ds", "open_clip_train_env")
# open_clip_torch[training] asks for webdataset>=0.2.5,<=0.2.86; open_clip_train.data imports pandas.
OPEN_CLIP_PACKAGES = ("webdataset==0.2.86", "pandas")
SHARDS = 8
CLUSTERS = 64
EXPERIMENTS = {"instance": "ds_configs/experiments/demo_distill.yaml", "CID": "ds_configs/experiments/demo_cid.yaml"}
SYSTEMS = ("open_clip", "open_clip --distill", "cid_ds instance", "cid_ds CID", "cid_ds CID for-loop AdamW",
           "cid_ds CID perf.compile", "cid_ds CID perf.cuda_graphs", "cid_ds CID zero2.json")


# ---------------------------------------------------------------------------------------------- machine

def on_gpu() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    gpu = torch.cuda.get_device_name() if on_gpu() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {gpu}; "
            f"torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}")


def gemm_peak() -> float:
    """FLOP/s of the best square matmul (fp32 on CPU, bf16 on GPU), each size run for about a second."""
    device, dtype = ("cuda", torch.bfloat16) if on_gpu() else ("cpu", torch.float32)
    best = 0.0
    for n in ((4096, 8192, 16384) if on_gpu() else (1024, 2048, 3072)):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        a @ b
        sync()
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < 1.0:
            a @ b
            sync()
            reps += 1
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
    return best


# ---------------------------------------------------------------------------------------------- data

def save_random_model(spec: str, folder: str) -> str:
    """An open_clip local-dir: folder with ``spec``'s config and a random initialisation (seed 0), made once."""
    weights = os.path.join(folder, "open_clip_model.safetensors")
    if not os.path.isfile(weights):
        import open_clip
        from safetensors.torch import save_file
        resolved = resolve_spec(spec)
        local = os.path.join(resolved[len("local-dir:"):], "open_clip_config.json")
        preprocess = read_json(local).get("preprocess_cfg", {}) if resolved.startswith("local-dir:") else {}
        write_json(os.path.join(folder, "open_clip_config.json"),
                   {"model_cfg": model_config(spec), "preprocess_cfg": preprocess})
        torch.manual_seed(0)
        state = open_clip.create_model(resolved).state_dict()
        with atomic_path(weights) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    return folder


def prepare(root: str, teacher: str, student: str, samples: int, workers: int) -> dict[str, str]:
    """Demo shards -> teacher folder -> feature cache -> k-means -> distill-ready shards; each stage skips
    what is done."""
    from data_tools.cluster import cluster
    from data_tools.extract import extract
    from data_tools.make_demo_data import generate
    from data_tools.pack import pack
    data, feats, clusters = (os.path.join(root, d) for d in ("data", "feats", "clusters"))
    packed = os.path.join(root, f"packed-{student}".replace("/", "_"))  # the tokens are the student's
    generate(data, train_samples=samples, shards=SHARDS, seed=0, eval_scale=0.1, progress=False)
    teacher_dir = save_random_model(teacher, os.path.join(root, "teacher"))
    shards = expand_shards(os.path.join(data, "train", "*.tar"))
    extract(shards, f"local-dir:{teacher_dir}", None, feats, workers=workers, device="cuda" if on_gpu() else "cpu")
    cluster(feats, CLUSTERS, clusters, seed=0)
    pack(shards, feats, student, packed, clusters_dir=clusters, samples_per_shard=math.ceil(samples / SHARDS),
         progress=False)
    return {"teacher": teacher_dir, "clusters": clusters, "packed": packed,
            "shards": os.path.join(packed, f"{{00000..{SHARDS - 1:05d}}}.tar")}


# ---------------------------------------------------------------------------------------------- open_clip env

def open_clip_python(env: str) -> str:
    """The interpreter of open_clip's trainer environment (made on first use, see the module docstring)."""
    python = os.path.join(env, "bin", "python")
    ready = os.path.join(env, "cid_ds_ready")
    if not os.path.isfile(ready):
        subprocess.run([sys.executable, "-m", "venv", "--clear", env], check=True)
        site = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                       text=True).strip()
        # Written before pip runs, so pip sees numpy, pyyaml, ... as installed and adds only what is missing.
        with open(os.path.join(site, "zz_cid_ds_parent.pth"), "w") as f:
            f.write(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *OPEN_CLIP_PACKAGES],
                       check=True)
        open(ready, "w").close()
    return python


def check_open_clip_python(python: str) -> str:
    """webdataset 0.2.x of its own, torch and open_clip_train from this environment, or an error."""
    probe = ("import webdataset, torch, open_clip_train.main; "
             "print(webdataset.__version__, torch.__version__, torch.__file__)")
    wds_version, torch_version, torch_file = subprocess.check_output([python, "-c", probe], text=True).split()
    if not wds_version.startswith("0.2.") or torch_version != torch.__version__:
        raise SystemExit(f"{python}: webdataset {wds_version}, torch {torch_version} ({torch_file}); open_clip's "
                         f"trainer needs webdataset 0.2.x and the benchmark this torch ({torch.__version__})")
    return f"webdataset {wds_version}, torch {torch_version} from {os.path.dirname(os.path.dirname(torch_file))}"


# ---------------------------------------------------------------------------------------------- trainer runs

def open_clip_command(python: str, args, paths: dict, cfg: Config, run_dir: str, distill: bool) -> list[str]:
    command = [
        python, "-m", "open_clip_train.main", "--train-data", paths["shards"], "--dataset-type", "webdataset",
        "--dataset-resampled", "--train-num-samples", str(args.steps * args.batch), "--epochs", "1",
        "--batch-size", str(args.batch), "--workers", str(args.workers), "--model", resolve_spec(args.student),
        "--precision", "amp_bf16" if on_gpu() else "fp32", "--lr", str(cfg.optim.lr),
        "--wd", str(cfg.optim.weight_decay), "--beta1", str(cfg.optim.betas[0]), "--beta2", str(cfg.optim.betas[1]),
        "--eps", str(cfg.optim.eps), "--warmup", str(args.steps // 10), "--grad-clip-norm", str(cfg.optim.grad_clip),
        "--log-every-n-steps", str(args.log_every), "--logs", os.path.dirname(run_dir),
        "--name", os.path.basename(run_dir), "--report-to", "", "--seed", "0"]
    if distill:  # a local-dir: model ignores --distill-pretrained, but open_clip distils only when it is set
        command += ["--distill-model", f"local-dir:{paths['teacher']}", "--distill-pretrained", "local-dir"]
    return command


def cid_ds_command(args, paths: dict, run_dir: str, experiment: str, extra: list[str]) -> list[str]:
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    deepspeed = deepspeed if os.path.isfile(deepspeed) else shutil.which("deepspeed") or deepspeed
    return [deepspeed, "--num_gpus", "1", "--master_port", str(29500 + os.getpid() % 1000), "launch/train.py",
            "--config", EXPERIMENTS[experiment], f"output_dir={run_dir}", f"model.student={args.student}",
            f"data.train_shards={paths['packed']}/*.tar", f"data.batch_size={args.batch}",
            f"data.workers={args.workers}", f"data.backend={args.cid_backend}",
            f"cluster.dir={paths['clusters']}", f"optim.steps={args.steps}", f"optim.warmup_steps={args.steps // 10}",
            f"logging.every={args.log_every}", f"checkpoint.every={args.steps}", "checkpoint.resume=none",
            "eval.sets=[]", "eval.at_end=false", *extra]


def run_logged(command: list[str], log: str) -> float:
    """Run ``command`` from the repository root with its output in ``log``; wall seconds."""
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{' '.join(command)} failed ({code}), log {log}:\n{tail}")
    return time.perf_counter() - start


OPEN_CLIP_LINE = re.compile(r"\[\s*(\d+)/\d+ \(\d+%\)\] Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)")


def open_clip_windows(log: str, batch: int) -> list[tuple[int, float, float]]:
    """(steps, seconds, data-wait seconds) of each logging window of an open_clip run. Its first log line
    is step 0 alone; each later one averages the steps since the previous line. (Its logger writes each
    line to stdout and stderr: a repeated line adds no steps and is skipped.)"""
    windows, done = [], 0
    with open(log) as f:
        for samples, data_time, batch_time in OPEN_CLIP_LINE.findall(f.read()):
            steps = int(samples) // batch - done
            if steps > 0:
                done += steps
                windows.append((steps, steps * float(batch_time), steps * float(data_time)))
    return windows[1:]  # step 0 alone: the next window is the first full one, as cid_ds's first


def cid_ds_windows(run_dir: str, batch: int) -> list[tuple[int, float, float]]:
    """The same from a cid_ds run's TensorBoard (perf/samples_per_s and perf/data_wait_fraction per window)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    rates, waits = (events.Scalars(f"perf/{name}") for name in ("samples_per_s", "data_wait_fraction"))
    windows, done = [], 0
    for rate, wait in zip(rates, waits):
        steps, done = rate.step - done, rate.step
        seconds = steps * batch / rate.value
        windows.append((steps, seconds, seconds * wait.value))
    return windows


def steady_state(windows: list[tuple[int, float, float]], batch: int, log: str) -> dict[str, float]:
    """samples/s and data-wait fraction over all windows but the first (start-up, first batches)."""
    steps, seconds, wait = (sum(w[i] for w in windows[1:]) for i in range(3))
    if steps == 0:
        raise SystemExit(f"{log}: fewer than two logging windows (raise --steps or lower --log-every?)")
    return {"samples_per_s": steps * batch / seconds, "data_wait": wait / seconds, "steps": steps}


def run_system(name: str, args, paths: dict, cfg: Config, python: Optional[str], run_dir: str) -> dict[str, float]:
    shutil.rmtree(run_dir, ignore_errors=True)  # open_clip refuses (exit 0) and TensorBoard mixes an old run
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    log = run_dir + ".log"
    if name.startswith("open_clip"):
        wall = run_logged(open_clip_command(python, args, paths, cfg, run_dir, "--distill" in name), log)
        windows = open_clip_windows(log, args.batch)
    else:
        extra = {"for-loop AdamW": ["perf.adamw=for_loop"], "perf.compile": ["perf.compile=true"],
                 "perf.cuda_graphs": ["perf.cuda_graphs=true"],
                 "zero2.json": ["deepspeed_config=ds_configs/zero2.json"]}
        extra = [*next((v for k, v in extra.items() if name.endswith(k)), []),
                 f"logging.profile_steps={args.profile_steps}"]
        wall = run_logged(cid_ds_command(args, paths, run_dir, name.split()[1], extra), log)
        if args.profile_steps:
            print(f"[bench] {name}: profile of {args.profile_steps} steps in {run_dir}/profile (top ops in {log})",
                  flush=True)
        windows = cid_ds_windows(run_dir, args.batch)
    # Both trainers save a checkpoint at the end: gigabytes per round on a GPU.
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    return steady_state(windows, args.batch, log) | {"wall_s": wall}


# ---------------------------------------------------------------------------------------------- in process

def interleaved(cases: dict[str, Callable[[], float]], reps: int) -> dict[str, float]:
    """Median seconds of each case, run in rotation after one untimed call each; a case returns the
    seconds it measured itself."""
    for case in cases.values():
        case()
    times = {name: [] for name in cases}
    for _ in range(reps):
        for name, case in cases.items():
            times[name].append(case())
    return {name: statistics.median(values) for name, values in times.items()}


def clocked(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> Callable[[], float]:
    def case() -> float:
        sync()
        start = clock()
        fn()
        sync()
        return clock() - start
    return case


@contextlib.contextmanager
def every_matmul_visible() -> Iterator[None]:
    """FlopCounterMode knows neither the CPU flash-attention op nor nn.MultiheadAttention's fused inference
    path: count attention through the math kernel (bmm) and the slow MHA path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def flops(step: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with every_matmul_visible(), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def load_experiment(name: str, args, paths: dict) -> Config:
    return load_config(os.path.join(REPO, EXPERIMENTS[name]), [
        f"model.student={args.student}", f"data.train_shards={paths['packed']}/*.tar", f"data.batch_size={args.batch}",
        f"cluster.dir={paths['clusters']}", "eval.sets=[]"])


class Workbench:
    """The student, a real batch of the packed shards and the pieces of one cid_ds step, on the bench's device
    and dtype (fp32 on CPU; on GPU bf16 weights, where the trainer computes in bf16 under autocast)."""

    def __init__(self, args, paths: dict):
        from cid_ds.data.packed import PackedShards, packed_manifest_path
        from cid_ds.data.batch import LoaderSpec
        from cid_ds.data.wds_loader import build_train_loader
        self.args, self.paths = args, paths
        self.device = torch.device("cuda" if on_gpu() else "cpu")
        self.dtype = torch.bfloat16 if on_gpu() else torch.float32
        self.cfg = {name: load_experiment(name, args, paths) for name in EXPERIMENTS}
        self.shards = expand_shards(f"{paths['packed']}/*.tar")
        self.teacher_dim = PackedShards(packed_manifest_path(self.shards)).embed_dim
        _, self.preprocess, _, self.tokenizer = create_model(args.student)
        batch = next(iter(build_train_loader(LoaderSpec(self.shards, self.preprocess, self.tokenizer,
                                                        batch_size=args.batch))))
        self.batch = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        self.batch["image"] = self.batch["image"].to(self.dtype)

    def student(self, clip: Optional[torch.nn.Module] = None, dtype: Optional[torch.dtype] = None) -> DistillStudent:
        torch.manual_seed(0)
        clip = clip if clip is not None else create_model(self.args.student)[0]
        return DistillStudent(clip, self.teacher_dim).to(self.device, dtype or self.dtype)

    def losses(self, model, experiment: str = "instance", cluster_term=None, image: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        """The experiment's weighted loss of ``model`` (a student or its engine) on the batch."""
        from cid_ds.objective import compute_losses, loss_weights
        cfg = self.cfg[experiment]
        weights = loss_weights(cfg)
        out = model(self.batch["image"] if image is None else image, self.batch["tokens"])
        losses, _ = compute_losses(cfg, out, self.batch, cluster_term, 0)
        return sum(weights[k] * v for k, v in losses.items())

    def step(self, student: torch.nn.Module, experiment: str = "instance", cluster_term=None,
             image: Optional[torch.Tensor] = None) -> Callable[[], None]:
        """Forward, the experiment's losses, backward: the cid_ds step without the engine."""
        def run() -> None:
            student.zero_grad(set_to_none=True)
            self.losses(student, experiment, cluster_term, image).backward()
        return run

    def engine(self, adamw: str = "fused", deepspeed_json: Optional[str] = None, one_rank_allreduce: bool = False):
        """A DeepSpeed engine as the trainer builds it (the YAML's JSON or ``deepspeed_json``, 1 rank) with
        ``perf.adamw``; ``one_rank_allreduce``: as DeepSpeed leaves it (the before of skipping it)."""
        import deepspeed
        from cid_ds.deepspeed_ops import make_step_host_light
        from cid_ds.engine import build_optimizer, deepspeed_config
        cfg = copy.deepcopy(self.cfg["instance"])
        cfg.perf.adamw = adamw
        cfg.deepspeed_config = os.path.join(REPO, deepspeed_json) if deepspeed_json else cfg.deepspeed_config
        ds = deepspeed_config(cfg, on_gpu())
        student = self.student(dtype=torch.float32)  # the engine applies the JSON's precision, as in the trainer
        engine, *_ = deepspeed.initialize(model=student, optimizer=build_optimizer(student, cfg), config=ds)
        if not one_rank_allreduce:
            make_step_host_light(engine)
        return engine

    def cluster_term(self):
        from cid_ds.losses.cluster import ClusterDiscrimination
        from cid_ds.engine import cosine_with_warmup
        cfg = self.cfg["CID"]
        return ClusterDiscrimination(cfg.cluster, cfg.optim.lr, tuple(cfg.optim.betas), cfg.optim.eps,
                                     cosine_with_warmup(1, 2), cfg.seed, self.device)


def flops_per_sample(bench: Workbench, teacher_dir: str) -> dict[str, float]:
    """Model FLOPs of one training step of each system, per sample."""
    import open_clip
    from open_clip.loss import ClipLoss, DistillClipLoss
    image, tokens = bench.batch["image"], bench.batch["tokens"]
    clip = open_clip.create_model(resolve_spec(bench.args.student), output_dict=True).to(bench.device, bench.dtype)
    teacher = open_clip.create_model(f"local-dir:{teacher_dir}", output_dict=True).to(bench.device, bench.dtype).eval()

    def open_clip_step(distill: bool) -> Callable[[], None]:
        def run() -> None:
            out = clip(image, tokens)
            if distill:
                with torch.no_grad():
                    out |= {f"dist_{k}": v for k, v in teacher(image, tokens).items()}
            loss = (DistillClipLoss() if distill else ClipLoss())(**out, output_dict=True)
            sum(loss.values()).backward()
        return run

    counted = {"open_clip": flops(open_clip_step(False)), "open_clip --distill": flops(open_clip_step(True)),
               "cid_ds instance": flops(bench.step(bench.student())),
               "cid_ds CID": flops(bench.step(bench.student(), "CID", bench.cluster_term()))}
    for variant in (name for name in SYSTEMS if name.startswith("cid_ds CID ")):  # the CID step, run otherwise
        counted[variant] = counted["cid_ds CID"]
    return {name: value / bench.args.batch for name, value in counted.items()}


def proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_step_bytes(step: Callable[[], None]) -> int:
    """Memory a step adds at its peak: the CUDA allocator's peak, or on CPU the process's peak RSS (VmHWM,
    reset through /proc/self/clear_refs) over its RSS before, after handing free heap back to the OS."""
    gc.collect()
    if on_gpu():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return proc_status("VmHWM") - base


def conv_student(bench: Workbench) -> tuple[DistillStudent, torch.Tensor]:
    """A ResNet student (open_clip's ModifiedResNet: RN50 on GPU, a 4-stage width-32 one at 64 px on CPU) and
    an image batch for it."""
    from open_clip.model import CLIP
    if on_gpu():
        clip, size = create_model("RN50")[0], 224
    else:
        text = model_config(bench.args.student)["text_cfg"]
        clip, size = CLIP(128, {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32}, text), 64
    image = torch.randn(bench.args.batch, 3, size, size, device=bench.device, dtype=bench.dtype)
    return bench.student(clip), image


def fast_paths(bench: Workbench) -> dict[str, dict[str, float]]:
    """Before/after seconds (and bytes) of each fast path, each pair interleaved."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    reps, results = bench.args.reps, {}

    engines = {impl: bench.engine(impl) for impl in ("for_loop", "foreach", "fused")}
    results["adamw"] = interleaved({impl: lambda e=e: engine_step_seconds(e, bench)
                                    for impl, e in engines.items()}, reps)
    engine_with = {name: bench.engine(deepspeed_json=f"ds_configs/{name}") for name in ("zero2.json", "zero0.json")}
    results["zero_stage"] = interleaved({name: lambda e=e: engine_step_seconds(e, bench)
                                         for name, e in engine_with.items()}, reps)
    allreduce = {"allreduce": bench.engine(one_rank_allreduce=True), "skipped": engines["fused"]}
    results["one_rank_allreduce"] = interleaved({name: lambda e=e: engine_step_seconds(e, bench, with_backward=True)
                                                 for name, e in allreduce.items()}, reps)

    eager, compiled = bench.student(), bench.student()
    compiled.compile()
    first = clocked(bench.step(compiled))()
    results["compile"] = interleaved({"eager": clocked(bench.step(eager)),
                                      "compiled": clocked(bench.step(compiled))}, reps) | {"first_call": first}

    checkpointed = bench.student()
    checkpointed.clip.set_grad_checkpointing(True)
    results["grad_checkpointing"] = interleaved({"off": clocked(bench.step(eager)),
                                                 "on": clocked(bench.step(checkpointed))}, reps)
    results["grad_checkpointing_bytes"] = {
        k: statistics.median(peak_step_bytes(bench.step(m)) for _ in range(3))
        for k, m in (("off", eager), ("on", checkpointed))}

    def math_attention() -> None:
        with sdpa_kernel(SDPBackend.MATH):
            bench.step(eager)()
    results["sdpa"] = interleaved({"math": clocked(math_attention), "default": clocked(bench.step(eager))}, reps)

    vit_nhwc = bench.student().to(memory_format=torch.channels_last)
    image_nhwc = bench.batch["image"].to(memory_format=torch.channels_last)
    results["channels_last_vit"] = interleaved({"off": clocked(bench.step(eager)),
                                                "on": clocked(bench.step(vit_nhwc, image=image_nhwc))}, reps)
    resnet, image = conv_student(bench)
    resnet_nhwc = copy.deepcopy(resnet).to(memory_format=torch.channels_last)
    results["channels_last_resnet"] = interleaved({
        "off": clocked(bench.step(resnet, image=image)),
        "on": clocked(bench.step(resnet_nhwc, image=image.to(memory_format=torch.channels_last)))}, reps)

    results["tokens"] = stored_ids_vs_tokenising(bench)
    results["loader"] = loader_cpu_seconds(bench)
    results["step_guard"] = step_guard_seconds(bench)
    results["log_window"] = log_window_seconds(bench, engines["fused"])
    return results


def engine_step_seconds(engine, bench: Workbench, with_backward: bool = False) -> float:
    """Forward untimed; engine.step(), and engine.backward if ``with_backward``, timed."""
    loss = bench.losses(engine)
    sync()
    start = time.perf_counter()
    engine.backward(loss)
    if not with_backward:
        sync()
        start = time.perf_counter()
    engine.step()
    sync()
    return time.perf_counter() - start


def stored_ids_vs_tokenising(bench: Workbench) -> dict[str, float]:
    """A batch's token ids from the packed bytes vs tokenising its captions (the loader's two paths);
    tests/test_pack.py checks that they are the same ids."""
    import itertools
    from cid_ds.data.packed import decode_array
    from cid_ds.data.samples import caption_of, read_samples
    samples = list(itertools.islice(read_samples(bench.shards), bench.args.batch))
    captions = [caption_of(s) for s in samples]
    length = bench.batch["tokens"].shape[1]

    def stored() -> torch.Tensor:
        ids = [decode_array(s["tokens"], "tokens", length, s["__key__"]) for s in samples]
        return torch.from_numpy(np.stack(ids).astype(np.int64))
    assert torch.equal(stored(), bench.tokenizer(captions))
    return interleaved({"tokenised": clocked(lambda: bench.tokenizer(captions)), "stored": clocked(stored)},
                       bench.args.reps)


def loader_cpu_seconds(bench: Workbench) -> dict[str, dict[str, float]]:
    """CPU seconds per batch of the webdataset loader (in this process: on a CPU its workers take their cores
    from the step), and before/after for its two fast paths: reading a batch of samples from a shard with
    webdataset's tarfile reader and with ours, and the images' transforms per image (open_clip's preprocess)
    and as uint8 pixels normalised once per batch."""
    import itertools

    import torch
    import webdataset as wds

    from cid_ds.data.preprocess import split_normalize
    from cid_ds.data.tars import tar_samples
    from cid_ds.data.samples import decode_image
    from cid_ds.data.batch import LoaderSpec
    from cid_ds.data.wds_loader import build_train_loader
    batches = iter(build_train_loader(LoaderSpec(bench.shards, bench.preprocess, bench.tokenizer, bench.args.batch,
                                                 shuffle_buffer=bench.cfg["CID"].data.shuffle_buffer)))

    def first(samples) -> list[dict]:
        return list(itertools.islice(samples, bench.args.batch))
    images = [decode_image(sample) for sample in first(tar_samples(bench.shards[0]))]
    pixels, normalize = split_normalize(bench.preprocess)
    augment = random.Random(0)
    cases = {"batch": lambda: next(batches),
             "tar webdataset": lambda: first(wds.tarfile_to_samples()([{"url": bench.shards[0]}])),
             "tar ours": lambda: first(tar_samples(bench.shards[0])),
             "per image": lambda: torch.stack([bench.preprocess(image) for image in images]),
             "per batch": lambda: normalize(torch.stack([pixels(image, augment) for image in images]))}
    return interleaved({name: clocked(case, time.process_time) for name, case in cases.items()}, bench.args.reps)


def idle_guard(device: torch.device):
    """A StepGuard whose optimizer is not stepped (the bench times the guard's own work)."""
    from cid_ds.step_guard import StepGuard
    return StepGuard(torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True), device)


def step_guard_seconds(bench: Workbench) -> dict[str, float]:
    """The trainer's per-step non-finite verdict (cid_ds.step_guard): one all-reduce, no read."""
    loss = bench.losses(bench.student()).detach()
    guard = idle_guard(loss.device)

    def call() -> None:
        guard.check_loss(loss)
        guard.end_step({"total": loss})
    return interleaved({"call": clocked(call)}, 10 * bench.args.reps)


def log_window_seconds(bench: Workbench, engine) -> dict[str, float]:
    """One logging window of the trainer: all-reduce of the losses, samples/s gather, TensorBoard write, print."""
    import io
    from torch.utils.tensorboard import SummaryWriter
    from cid_ds.objective import compute_losses
    cfg = bench.cfg["instance"]
    out = engine(bench.batch["image"], bench.batch["tokens"])
    losses, metrics = compute_losses(cfg, out, bench.batch, None, 0)
    total = sum(losses.values())
    writer = SummaryWriter(os.path.join(bench.args.work, "log_window_tensorboard"))
    guard = idle_guard(total.device)

    def call() -> None:
        from cid_ds.train import log_window
        window = {"t0": time.perf_counter() - 1, "data_wait": 0.0, "steps": 1, "skipped": 0}
        guard.end_step(losses | {"total": total})
        with contextlib.redirect_stdout(io.StringIO()):
            log_window(writer, engine, guard, metrics, out, window, 1, bench.device, cfg, 1, 0)
    return interleaved({"call": clocked(call)}, bench.args.reps)


# ---------------------------------------------------------------------------------------------- report

def report(results: dict) -> list[str]:
    """The lines printed at the end (and kept in results.json)."""
    peak, runs, per_sample = results["gemm_peak"], results["runs"], results["flops_per_sample"]
    batch, cpu = results["setup"]["batch"], not results["setup"]["gpu"]
    median = {name: {k: statistics.median(r[k] for r in rows) for k in ("samples_per_s", "data_wait")}
              for name, rows in runs.items()}
    lines = [f"machine: {results['machine']}",
             f"GEMM peak ({'fp32' if cpu else 'bf16'}): {peak / 1e9:.1f} GFLOP/s "
             f"(start {results['gemm_peak_start'] / 1e9:.1f}, end {results['gemm_peak_end'] / 1e9:.1f})",
             f"setup: {json.dumps(results['setup'])}", "",
             f"{'system':28s} {'samples/s':>10s} {'runs':>24s} {'data wait':>9s} {'GFLOP/sample':>12s} "
             f"{'GFLOP/s':>8s} {'of peak':>7s}"]
    for name, m in median.items():
        rate = per_sample[name] * m["samples_per_s"]
        each = " ".join(f"{r['samples_per_s']:.0f}" for r in runs[name])
        lines.append(f"{name:28s} {m['samples_per_s']:10.1f} {each:>24s} {m['data_wait']:9.1%} "
                     f"{per_sample[name] / 1e9:12.3f} {rate / 1e9:8.1f} {rate / peak:7.1%}")

    def ratio(a: str, b: str) -> Optional[float]:
        return median[a]["samples_per_s"] / median[b]["samples_per_s"] if a in median and b in median else None
    lines.append("")
    distill, plain = ratio("cid_ds CID", "open_clip --distill"), ratio("cid_ds CID", "open_clip")
    if distill is not None:
        lines.append(f"cid_ds CID / open_clip --distill: {distill:.2f}x" + (
            f" (target >= 2.0x on the CPU: {'met' if distill >= 2 else 'NOT met'})" if cpu else ""))
    if plain is not None:
        lines.append(f"cid_ds CID / open_clip:           {plain:.2f}x")
    for fast_path in ("perf.compile", "perf.cuda_graphs"):
        for base in ("open_clip --distill", "open_clip"):
            compiled = ratio(f"cid_ds CID {fast_path}", base)
            if compiled is not None:
                lines.append(f"cid_ds CID {fast_path} / {base}: {compiled:.2f}x")
    if "cid_ds CID" in median:
        mfu = per_sample["cid_ds CID"] * median["cid_ds CID"]["samples_per_s"] / peak
        mfu_target = 0.15 if cpu else 0.40
        lines.append(f"cid_ds CID step: {mfu:.1%} of the GEMM peak (target >= {mfu_target:.0%}: "
                     f"{'met' if mfu >= mfu_target else 'NOT met'})")
        if not cpu:
            wait = median["cid_ds CID"]["data_wait"]
            lines.append(f"cid_ds CID data wait: {wait:.1%} of step time "
                         f"(target < 5%: {'met' if wait < 0.05 else 'NOT met'})")
    if "fast" not in results:
        return lines
    fp = results["fast"]
    cid = median["cid_ds CID"]["samples_per_s"]
    compiled = median["cid_ds CID perf.compile"]["samples_per_s"]
    ms = {k: {case: v * 1e3 for case, v in d.items()} for k, d in fp.items() if not k.endswith("_bytes")}
    mib = {case: v / 2**20 for case, v in fp["grad_checkpointing_bytes"].items()}
    before_loop, zero2 = (median[f"cid_ds CID {name}"]["samples_per_s"] for name in ("for-loop AdamW", "zero2.json"))
    saved = (ms["compile"]["eager"] - ms["compile"]["compiled"]) / 1e3
    payback = (f"pays back after {ms['compile']['first_call'] / 1e3 / saved:.0f} steps" if saved > 0
               else "never pays back")
    lines += ["", f"fast paths, before -> after (median of {results['setup']['reps']}, interleaved; batch {batch}):",
              f"  AdamW in the engine step (perf.adamw): for_loop {ms['adamw']['for_loop']:.1f} ms -> fused "
              f"{ms['adamw']['fused']:.1f} ms (foreach {ms['adamw']['foreach']:.1f} ms); whole trainer, cid_ds CID: "
              f"{before_loop:.1f} -> {cid:.1f} samples/s ({cid / before_loop:.2f}x)",
              f"  torch.compile (perf.compile): forward+backward {ms['compile']['eager']:.1f} -> "
              f"{ms['compile']['compiled']:.1f} ms; first call (compiling) {ms['compile']['first_call'] / 1e3:.0f} s, "
              f"{payback}; whole trainer, cid_ds CID: {cid:.1f} -> {compiled:.1f} samples/s ({compiled / cid:.2f}x)",
              f"  gradient checkpointing (perf.grad_checkpointing): forward+backward "
              f"{ms['grad_checkpointing']['off']:.1f} -> {ms['grad_checkpointing']['on']:.1f} ms, "
              f"step memory {mib['off']:.0f} -> {mib['on']:.0f} MiB",
              f"  attention kernel: math {ms['sdpa']['math']:.1f} -> default SDPA {ms['sdpa']['default']:.1f} ms "
              "(nn.MultiheadAttention calls F.scaled_dot_product_attention in training)",
              f"  channels-last (perf.channels_last), ViT student: {ms['channels_last_vit']['off']:.1f} -> "
              f"{ms['channels_last_vit']['on']:.1f} ms; ResNet student: {ms['channels_last_resnet']['off']:.1f} -> "
              f"{ms['channels_last_resnet']['on']:.1f} ms",
              f"  token ids per batch: tokenising captions {ms['tokens']['tokenised']:.2f} -> stored ids "
              f"{ms['tokens']['stored']:.2f} ms (in the loader workers)",
              f"  loader CPU per batch: reading the samples, webdataset's tarfile {ms['loader']['tar webdataset']:.1f} "
              f"-> our tar reader {ms['loader']['tar ours']:.1f} ms; the images' transforms, per image "
              f"{ms['loader']['per image']:.1f} -> uint8 + one normalise per batch {ms['loader']['per batch']:.1f} ms; "
              f"the whole loader now {ms['loader']['batch']:.0f} ms per batch, a worker's core taken from the step",
              f"  per-step non-finite verdict (cid_ds.step_guard, no read): {ms['step_guard']['call']:.3f} ms; logging window "
              f"{ms['log_window']['call']:.1f} ms, read every logging.every steps",
              f"  ZeRO at one rank (the demo YAMLs' deepspeed_config): engine step, zero2.json "
              f"{ms['zero_stage']['zero2.json']:.1f} ms -> zero0.json {ms['zero_stage']['zero0.json']:.1f} ms "
              f"(ZeRO's flat fp32 copies and fp64 gradient norm); whole trainer, cid_ds CID: {zero2:.1f} -> "
              f"{cid:.1f} samples/s ({cid / zero2:.2f}x)",
              f"  one rank without ZeRO: engine backward + step with DeepSpeed's all-reduce of the gradients "
              f"{ms['one_rank_allreduce']['allreduce']:.1f} ms -> skipped {ms['one_rank_allreduce']['skipped']:.1f} ms"]
    return lines


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    gpu = on_gpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.path.join("runs", "bench_vs_open_clip", "gpu" if gpu else "cpu"))
    parser.add_argument("--student", default="ViT-B-32" if gpu else "demo-student")
    parser.add_argument("--teacher", default="ViT-L-14" if gpu else "demo-teacher")
    parser.add_argument("--batch", type=int, default=256 if gpu else 128, help="per GPU / CPU process")
    parser.add_argument("--workers", type=int, default=8 if gpu else 1, help="loader workers (DALI threads)")
    parser.add_argument("--steps", type=int, default=100 if gpu else 60)
    parser.add_argument("--log-every", type=int, default=20 if gpu else 10)
    parser.add_argument("--rounds", type=int, default=3, help="rotations over the systems")
    parser.add_argument("--reps", type=int, default=10, help="repetitions of each in-process measurement")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of: {', '.join(SYSTEMS)}")
    parser.add_argument("--cid-backend", default="dali" if gpu else "wds", choices=("dali", "wds"),
                        help="cid_ds's data.backend")
    parser.add_argument("--no-fast-paths", dest="fast_paths", action="store_false",
                        help="skip the in-process before/after measurements (they need every system)")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="cid_ds runs: torch.profiler over this many steps (logging.profile_steps); the "
                             "profiled steps are slower, so read their samples/s as such")
    parser.add_argument("--open-clip-env", default=OPEN_CLIP_ENV)
    parser.add_argument("--open-clip-python", default=None, help="an interpreter with webdataset 0.2.x instead")
    args = parser.parse_args(argv)
    args.systems = [name.strip() for name in args.systems.split(",")]
    unknown = [name for name in args.systems if name not in SYSTEMS]
    if unknown:
        parser.error(f"--systems: unknown {unknown}; known: {', '.join(SYSTEMS)}")
    if args.fast_paths and set(args.systems) != set(SYSTEMS):
        parser.error("the fast-path lines compare runs of every system: with --systems, add --no-fast-paths")
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns at every random-init student built here
    args.work = os.path.abspath(args.work)
    samples = math.ceil(args.steps * args.batch * 1.05 / SHARDS) * SHARDS  # one epoch covers every run
    prep = os.path.join(args.work, f"{args.teacher}-{samples}".replace("/", "_"))
    paths = prepare(prep, args.teacher, args.student, samples, args.workers)
    python = None
    if any(name.startswith("open_clip") for name in args.systems):
        python = args.open_clip_python or open_clip_python(args.open_clip_env)
        print(f"[bench] open_clip trainer: {python} ({check_open_clip_python(python)})", flush=True)

    from cid_ds.engine import init_distributed
    init_distributed()  # the in-process engines and the cluster term are 1-rank jobs
    results = {"machine": machine(), "gemm_peak_start": gemm_peak(),
               "setup": {"student": args.student, "teacher": args.teacher, "batch": args.batch,
                         "workers": args.workers, "steps": args.steps, "log_every": args.log_every,
                         "rounds": args.rounds, "reps": args.reps, "samples": samples, "gpu": on_gpu(),
                         "precision": "bf16" if on_gpu() else "fp32", "cid_backend": args.cid_backend}}
    cfg = load_experiment("instance", args, paths)
    runs = {name: [] for name in args.systems}
    for r in range(args.rounds):
        for i, name in enumerate(args.systems):
            run_dir = os.path.join(args.work, "runs", f"round{r}-{i}-{name.replace(' ', '_')}")
            runs[name].append(run_system(name, args, paths, cfg, python, run_dir))
            print(f"[bench] round {r + 1}/{args.rounds} {name}: {runs[name][-1]['samples_per_s']:.1f} samples/s, "
                  f"data wait {runs[name][-1]['data_wait']:.1%}", flush=True)
    bench = Workbench(args, paths)
    results |= {"runs": runs, "flops_per_sample": flops_per_sample(bench, paths["teacher"])}
    if args.fast_paths:
        results["fast"] = fast_paths(bench)
    results["gemm_peak_end"] = gemm_peak()
    results["gemm_peak"] = max(results["gemm_peak_start"], results["gemm_peak_end"])
    results["report"] = report(results)
    print("\n" + "\n".join(results["report"]), flush=True)
    write_json(os.path.join(args.work, "results.json"), results)
    return results


if __name__ == "__main__":
    main()
