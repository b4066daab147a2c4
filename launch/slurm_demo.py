"""The demo's CID student as a two-node SLURM job with a preemption in the middle (``make slurm-demo``).

    python -m launch.slurm_demo [--demo runs/demo] [--out runs/slurm_demo] [--at-step 100]

On this machine: a real SLURM of two nodes (launch/local_slurm.py, loopback only) runs ``sbatch
launch/slurm.sbatch ds_configs/experiments/demo_cid.yaml`` on the demo's prepared data (``make demo`` first). At
``--at-step`` it sends what a preemption sends, ``scancel --signal=TERM``: both nodes' ranks save one checkpoint
and the job requeues itself; SLURM holds a requeued job for a while before it starts again (10 s on this cluster,
two minutes by default). The job resumes from the checkpoint and finishes; the demo prints where it stopped and resumed.
Needs root and Debian's slurm-wlm + munge (``apt-get install slurm-wlm munge``).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from cid_ds.io import read_json
from launch.local_slurm import local_slurm, missing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="runs/demo", help="the demo's folder (make demo)")
    parser.add_argument("--out", default="runs/slurm_demo")
    parser.add_argument("--at-step", type=int, default=100, help="the step after which the job is preempted")
    args = parser.parse_args()
    why_not = missing()
    if why_not:
        raise SystemExit(f"slurm-demo: {why_not}")
    demo, out = os.path.abspath(args.demo), os.path.abspath(args.out)
    if not os.path.isdir(os.path.join(demo, "packed")):
        raise SystemExit(f"slurm-demo: no prepared demo data in {demo}/packed: run `make demo` first")
    os.makedirs(out, exist_ok=True)
    run_dir = os.path.join(out, "cid")
    if os.path.exists(os.path.join(run_dir, "results.json")):
        raise SystemExit(f"slurm-demo: {run_dir} has finished already: remove {out} to run the demo again")
    config = os.path.join(REPO, "ds_configs", "experiments", "demo_cid.yaml")
    overrides = [f"output_dir={run_dir}", f"data.train_shards={demo}/packed/*.tar", f"cluster.dir={demo}/clusters",
                 f"eval.sets=[{demo}/data/eval/shapes,{demo}/data/eval/colored_shapes,{demo}/data/eval/retrieval]",
                 f"deepspeed_config={REPO}/ds_configs/zero0.json", "logging.every=10", "checkpoint.stop_check_every=1"]
    try:
        job, state, log = run_job(os.path.join(out, "cluster"), config, overrides, out, args.at_step)
    except TimeoutError as e:
        raise SystemExit(f"slurm-demo: {e}")
    resumed = re.search(r"start step (\d+)/(\d+)", open(log).read().split("(restart 1)")[1])
    print(f"slurm-demo: job {job} {state}: resumed at step {resumed.group(1)} of {resumed.group(2)} on restart 1")
    if state != "COMPLETED":
        sys.exit(f"slurm-demo: the job ended {state}: see {log}")
    results = read_json(os.path.join(run_dir, "results.json"))
    print(f"slurm-demo: step {results['step']}, exported to {results['export']}; eval: {results.get('eval')}")


def run_job(root: str, config: str, overrides: list[str], out: str, at_step: int) -> tuple[str, str, str]:
    """Submit the job from ``out``, preempt it after step ``at_step``, wait for its end: its id, final state, log."""
    with local_slurm(root) as slurm:
        job = slurm.submit(os.path.join(REPO, "launch", "slurm.sbatch"), config, *overrides, cwd=out)
        log = os.path.join(out, f"cid_ds-{job}.out")
        text = lambda: open(log).read() if os.path.exists(log) else ""  # noqa: E731
        steps = lambda: [int(s) for s in re.findall(r"\[cid_ds\] step (\d+)/", text())]  # noqa: E731
        print(f"slurm-demo: job {job} on nodes n1, n2; its log: {log}", flush=True)
        slurm.wait(lambda: max(steps(), default=0) >= at_step, 1800, f"step {at_step}", job, log)
        slurm.run("scancel", "--signal=TERM", job)
        print("slurm-demo: scancel --signal=TERM (what a preemption sends)", flush=True)
        seconds = slurm.wait(lambda: slurm.state(job) == "PENDING", 120, "the requeue", job, log)
        stopped = re.search(r"checkpoint of step (\d+) saved", text())
        print(f"slurm-demo: both nodes checkpointed step {stopped.group(1)} and the job requeued itself "
              f"{seconds:.1f} s after the signal", flush=True)
        slurm.wait(lambda: "(restart 1)" in text(), 120, "the restart", job, log)
        slurm.wait(lambda: slurm.state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 3600, "the job's end",
                   job, log)
        return job, slurm.state(job), log


if __name__ == "__main__":
    main()
