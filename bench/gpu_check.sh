#!/usr/bin/env bash
# The GPU checks in one command, sized for 8 minutes on one H100/H200 (a short device lease):
#     OUT=/tmp/out PY=python3 bench/gpu_check.sh   (default OUT: runs/gpu_check; PY: the interpreter, default python)
# 0. gpu_bundle/ (bench/gpu_bundle.py, made where PyPI is reachable) installed offline when the interpreter lacks
#    DeepSpeed: the lent machines hold torch, torchvision, numpy, tensorboard and pyyaml and reach no index. What
#    could not travel is skipped, one line each: DALI (the trainer reads with the PIL loader), faiss-gpu (k-means on
#    faiss-cpu), open_clip's own trainer (it needs webdataset 0.2.x: OPEN_CLIP_PYTHON);
# 1. bench/engine_dispatch.py: ops, syncs and step time of each shipped DeepSpeed JSON's engine, stock and as the
#    trainer runs it, against a plain torch autocast step, ViT-B/32 and ViT-B/16 at batch 256;
# 2. bench/trainer_throughput.py: the whole trainer (cid_ds CID, DALI where installed) against open_clip's plain
#    trainer on the same ViT-B/16 student: samples/s, data wait, MFU against the bf16 GEMM peak measured in the same
#    run, and where the step's time goes (torch.profiler's top ops of 3 steps); then the same trainer with
#    perf.cuda_graphs (its compiling falls in the dropped first window);
# 3. bench/kmeans.py: data_tools.cluster's faiss k-means (on the GPU with faiss-gpu) on 2M synthetic 512-d
#    embeddings, against a GEMM of the same FLOPs.
# Each step has its own time limit; a step that fails or runs out is reported and the next one runs. Every line
# goes to OUT/gpu_check.txt; the summary (the lines each bench ends with) is printed at the end. Without a GPU
# the same steps run small on the CPU, to check the script and the benches themselves.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the trainer's processes import cid_ds without an install
out="${OUT:-runs/gpu_check}"
py="${PY:-python}"
mkdir -p "$out"
log="$out/gpu_check.txt"
: >"$log"
summary=()

# step NAME SECONDS CMD...: run CMD under a time limit, its output into the log, its last lines into the summary
step() {
    local name="$1" limit="$2"
    shift 2
    echo "== $name: $*" | tee -a "$log"
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$out/step.txt" 2>&1
    local status=$?
    cat "$out/step.txt" >>"$log"
    local result="exit $status"
    [[ $status == 124 || $status == 137 ]] && result="ran out of its ${limit}s"
    summary+=("== $name ($result, $((SECONDS - started))s)" "$(grep -v -i 'warn' "$out/step.txt" | tail -n 12)")
    rm -f "$out/step.txt"
}

# skip WHAT WHY: one line in the log and the summary for what this machine cannot run
skip() {
    echo "== skipped: $1: $2" | tee -a "$log"
    summary+=("== skipped: $1: $2")
}

if ! "$py" -c 'import deepspeed' 2>/dev/null; then
    if [[ -f gpu_bundle/requirements.txt ]]; then
        step "install gpu_bundle/ offline" 60 "$py" -m pip install --no-index --find-links gpu_bundle \
            -r gpu_bundle/requirements.txt
    else
        echo "no DeepSpeed for $py and no gpu_bundle/: run python bench/gpu_bundle.py where PyPI is reachable" | tee -a "$log"
        exit 1
    fi
fi
backend=(--cid-backend dali)
"$py" -c 'import nvidia.dali' 2>/dev/null || {
    skip "DALI" "nvidia.dali is not installed (476 MB do not travel): the trainer reads with the PIL loader"
    backend=(--cid-backend wds)
}
kmeans=(--n 2000000 --dim 512 --k 20000 --niter 10 --gpu on)
"$py" -c 'import sys, faiss; sys.exit(0 if faiss.get_num_gpus() > 0 else 1)' 2>/dev/null || {
    skip "faiss-gpu" "this faiss has no GPU (faiss-gpu does not travel): k-means on faiss-cpu, 250k x 512 into 5000"
    kmeans=(--n 250000 --dim 512 --k 5000 --niter 10 --gpu off)
}

if "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "GPU: $("$py" -c 'import torch; print(torch.cuda.get_device_name())')" | tee -a "$log"
    open_clip=()
    if [[ -n "${OPEN_CLIP_PYTHON:-}" ]]; then
        systems="open_clip,cid_ds CID"
        open_clip=(--open-clip-python "$OPEN_CLIP_PYTHON")
    else
        systems="cid_ds CID"
        skip "open_clip's trainer" "it needs webdataset 0.2.x (OPEN_CLIP_PYTHON): cid_ds alone, MFU against the GEMM peak"
    fi
    step "engine step per JSON, ViT-B/32 batch 256" 50 "$py" bench/engine_dispatch.py --student ViT-B-32 --batch 256 --reps 5
    step "engine step per JSON, ViT-B/16 batch 256" 65 "$py" bench/engine_dispatch.py --student ViT-B-16 --batch 256 --reps 3
    step "trainer ${backend[1]} vs open_clip plain, ViT-B/16" 170 "$py" bench/trainer_throughput.py --student ViT-B-16 \
        --work "$out/trainer_throughput" --systems "$systems" ${open_clip[@]+"${open_clip[@]}"} "${backend[@]}" --rounds 1 --steps 60 \
        --log-every 10 --no-fast-paths --profile-steps 3
    step "where the step's time goes (profile's top ops)" 5 \
        sh -c "head -n 13 \"\$(find '$out/trainer_throughput' -name 'rank0_ops.txt' | head -n 1)\""
    step "trainer with perf.cuda_graphs, ViT-B/16" 75 "$py" bench/trainer_throughput.py --student ViT-B-16 \
        --work "$out/trainer_throughput" --systems "cid_ds CID perf.cuda_graphs" "${backend[@]}" --rounds 1 \
        --steps 60 --log-every 10 --no-fast-paths
    step "faiss k-means (${kmeans[*]})" 50 "$py" bench/kmeans.py "${kmeans[@]}"
else
    echo "no GPU: the CPU fallback (small sizes)" | tee -a "$log"
    export DS_ACCELERATOR=cpu
    step "engine step per JSON (CPU)" 120 "$py" bench/engine_dispatch.py --reps 2
    step "trainer (CPU, cid_ds CID only)" 240 "$py" bench/trainer_throughput.py --work "$out/trainer_throughput" \
        --systems "cid_ds CID" --rounds 1 --steps 30 --log-every 10 --no-fast-paths --profile-steps 3
    step "where the step's time goes (profile's top ops)" 5 \
        sh -c "head -n 13 \"\$(find '$out/trainer_throughput' -name 'rank0_ops.txt' | head -n 1)\""
    step "faiss k-means (CPU)" 60 "$py" bench/kmeans.py --n 50000 --dim 128 --k 500 --niter 10 --gpu off
fi
printf '%s\n' "${summary[@]}" | tee -a "$log"
