"""Training throughput: cid_ds against open_clip's own trainer on the same student, teacher, shards, global
batch, precision and steps, then the step's fast paths before and after (bench/fast_paths.py).

    python bench/trainer_throughput.py [--work runs/bench_vs_open_clip] [--steps 60] [--rounds 3]
    python bench/trainer_throughput.py --student ViT-B-16        # on a GPU machine: the >= 40% MFU target
    python bench/trainer_throughput.py --systems "cid_ds CID" --no-fast-paths --rounds 1 [--cid-backend wds]
                                       [--profile-steps 5]       # one system (short GPU leases); where its time goes

The workload is bench/workbench.py's. Without CUDA: fp32, one loader worker per system, the demo data. With CUDA:
bf16 (open_clip --precision amp_bf16; cid_ds torch autocast bf16 from the YAMLs' ds_configs/zero0.json), cid_ds
decoding with DALI on the GPU (data.backend=dali), 8 loader workers / DALI threads.

Both systems read the same distill-ready shards (data_tools.pack output: open_clip uses their jpg + txt;
cid_ds also their token ids, teacher embeddings and cluster ids), made here once from the demo data by the
real stages (extract with the teacher, k-means, pack). In rotation, --rounds times, each run a fresh process
through its real entry point:

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

open_clip's trainer needs webdataset 0.2.x (ours is 1.x), so it runs in a virtualenv made here
(--open-clip-env, default ~/.cache/cid_ds/open_clip_train_env, reused): webdataset 0.2.86 (the newest
open_clip_torch[training] allows) and pandas, nothing else; a .pth file appends this environment's
site-packages after its own, so torch and open_clip are ours. --open-clip-python uses an interpreter you
made instead (a GPU node without PyPI). Results: printed, and WORK/results.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from typing import Callable, Iterator, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench.* from a script

from bench import fast_paths  # noqa: E402
from bench.timing import machine, median_runs, on_gpu, sync  # noqa: E402
from bench.workbench import (EXPERIMENTS, REPO, Workbench, add_workload_args, load_experiment, prepare,  # noqa: E402
                             samples_for)
from cid_ds.config import Config  # noqa: E402
from cid_ds.io import write_json  # noqa: E402
from cid_ds.models import resolve_spec  # noqa: E402

OPEN_CLIP_ENV = os.path.join(os.path.expanduser("~"), ".cache", "cid_ds", "open_clip_train_env")
# open_clip_torch[training] asks for webdataset>=0.2.5,<=0.2.86; open_clip_train.data imports pandas.
OPEN_CLIP_PACKAGES = ("webdataset==0.2.86", "pandas")

SYSTEMS = ("open_clip", "open_clip --distill", "cid_ds plain", "cid_ds instance", "cid_ds CID", "cid_ds CID for-loop AdamW",
           "cid_ds CID perf.compile", "cid_ds CID perf.cuda_graphs", "cid_ds CID zero2.json")


# ---------------------------------------------------------------------------------------------- machine

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


# ---------------------------------------------------------------------------------------------- FLOPs

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
               "cid_ds plain": flops(bench.step(bench.student(), "plain")),
               "cid_ds instance": flops(bench.step(bench.student())),
               "cid_ds CID": flops(bench.step(bench.student(), "CID", bench.cluster_term()))}
    for variant in (name for name in SYSTEMS if name.startswith("cid_ds CID ")):  # the CID step, run otherwise
        counted[variant] = counted["cid_ds CID"]
    return {name: value / bench.args.batch for name, value in counted.items()}


# ---------------------------------------------------------------------------------------------- report

def report(results: dict) -> list[str]:
    """The lines printed at the end (and kept in results.json)."""
    peak, runs, per_sample = results["gemm_peak"], results["runs"], results["flops_per_sample"]
    batch, cpu = results["setup"]["batch"], not results["setup"]["gpu"]
    median = median_runs(runs)
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
    own_plain = ratio("cid_ds CID", "cid_ds plain")
    if own_plain is not None:
        lines.append(f"cid_ds CID / cid_ds plain (the teacher terms' cost): {own_plain:.2f}x"
                     + (f" (target >= 0.90x: {'met' if own_plain >= 0.9 else 'NOT met'})" if cpu else ""))
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
    if "fast" in results:
        lines += ["", *fast_paths.report(results["fast"], results["setup"]["reps"], batch, median)]
    return lines


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    gpu = on_gpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser)
    parser.add_argument("--log-every", type=int, default=20 if gpu else 10)
    parser.add_argument("--rounds", type=int, default=3, help="rotations over the systems")
    fast_paths.add_args(parser)
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
    paths = prepare(args)
    python = None
    if any(name.startswith("open_clip") for name in args.systems):
        python = args.open_clip_python or open_clip_python(args.open_clip_env)
        print(f"[bench] open_clip trainer: {python} ({check_open_clip_python(python)})", flush=True)

    from cid_ds.engine import init_distributed
    init_distributed()  # the in-process engines and the cluster term are 1-rank jobs
    results = {"machine": machine(), "gemm_peak_start": gemm_peak(),
               "setup": {"student": args.student, "teacher": args.teacher, "batch": args.batch,
                         "workers": args.workers, "steps": args.steps, "log_every": args.log_every,
                         "rounds": args.rounds, "reps": args.reps, "samples": samples_for(args), "gpu": on_gpu(),
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
        results["fast"] = fast_paths.measure(bench)
    results["gemm_peak_end"] = gemm_peak()
    results["gemm_peak"] = max(results["gemm_peak_start"], results["gemm_peak_end"])
    results["report"] = report(results)
    print("\n" + "\n".join(results["report"]), flush=True)
    write_json(os.path.join(args.work, "results.json"), results)
    return results


if __name__ == "__main__":
    main()
