"""The demo's CID student as a two-node SLURM job with a preemption in the middle (``make slurm-demo``).

    python -m launch.slurm_demo [--demo runs/demo] [--out runs/slurm_demo] [--at-step 100]

On this machine: a real SLURM of two nodes (launch/local_slurm.py, loopback only) runs ``sbatch
launch/slurm.sbatch ds_configs/experiments/demo_cid.yaml`` on the demo's prepared data (``make demo`` first). At
``--at-step`` it sends what a preemption sends, ``scancel --signal=TERM``: both nodes' ranks save one checkpoint
and the job requeues itself; SLURM holds a requeued job for two minutes, which the demo skips (``scontrol update
StartTime=now``). The job resumes from the checkpoint and finishes; the demo prints where it stopped and resumed.
Needs root and Debian's slurm-wlm + munge (``apt-get install slurm-wlm munge``).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

from cid_ds.io import read_json
from launch.local_slurm import local_slurm, missing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(condition, seconds: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > seconds:
            raise SystemExit(f"slurm-demo: {what} did not happen within {seconds:.0f} s")
        time.sleep(1)
    return time.monotonic() - start


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
    with local_slurm(os.path.join(out, "cluster")) as slurm:
        job = slurm.submit(os.path.join(REPO, "launch", "slurm.sbatch"), config, *overrides, cwd=out)
        log = os.path.join(out, f"cid_ds-{job}.out")
        text = lambda: open(log).read() if os.path.exists(log) else ""  # noqa: E731
        print(f"slurm-demo: job {job} on nodes n1, n2; its log: {log}", flush=True)
        wait_for(lambda: re.search(rf"\[cid_ds\] step (\d+)/", text()) and max(
            int(s) for s in re.findall(r"\[cid_ds\] step (\d+)/", text())) >= args.at_step, 1800,
                 f"step {args.at_step}")
        slurm.run("scancel", "--signal=TERM", job)
        print("slurm-demo: scancel --signal=TERM (what a preemption sends)", flush=True)
        seconds = wait_for(lambda: slurm.state(job) == "PENDING", 120, "the requeue")
        stopped = re.search(r"checkpoint of step (\d+) saved", text())
        print(f"slurm-demo: both nodes checkpointed step {stopped.group(1)} and the job requeued itself "
              f"{seconds:.1f} s after the signal", flush=True)
        slurm.release_requeued(job)
        wait_for(lambda: "(restart 1)" in text(), 120, "the restart")
        wait_for(lambda: slurm.state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 3600, "the job's end")
        state = slurm.state(job)
    resumed = re.search(r"start step (\d+)/(\d+)", text().split("(restart 1)")[1])
    print(f"slurm-demo: job {job} {state}: resumed at step {resumed.group(1)} of {resumed.group(2)} on restart 1")
    if state != "COMPLETED":
        sys.exit(f"slurm-demo: the job ended {state}: see {log}")
    results = read_json(os.path.join(run_dir, "results.json"))
    print(f"slurm-demo: step {results['step']}, exported to {results['export']}; eval: {results.get('eval')}")


if __name__ == "__main__":
    main()
