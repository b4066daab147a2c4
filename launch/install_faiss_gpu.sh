#!/usr/bin/env bash
# GPU hosts and the Docker image: swap requirements.txt's faiss-cpu for faiss-gpu of the same version, so that
# data_tools.cluster and data_tools.balance run k-means and their searches on the GPUs (faiss.get_num_gpus()).
# requirements.txt stays the one list of versions, and CI and CPU machines keep faiss-cpu.
#     make setup-gpu                                  (the Makefile's .venv)
#     PIP="python -m pip" launch/install_faiss_gpu.sh  (any environment; --dry-run prints the commands)
# faiss-gpu 1.15.1's wheel is built for CUDA 12 and brings its runtime and cuBLAS as nvidia-*-cu12 wheels
# beside torch's CUDA 13 ones; a driver for CUDA 13 runs both.
set -euo pipefail
requirements="$(dirname "${BASH_SOURCE[0]}")/../requirements.txt"
version="$(sed -n 's/^faiss-cpu==\([0-9][0-9.]*\).*$/\1/p' "$requirements")"
if [[ -z "$version" ]]; then
    echo "install_faiss_gpu.sh: no 'faiss-cpu==VERSION' line in $requirements" >&2
    exit 1
fi
run=()
[[ "${1:-}" == "--dry-run" ]] && run=(echo)
pip=(${PIP:-pip})
"${run[@]}" "${pip[@]}" uninstall --yes faiss-cpu
"${run[@]}" "${pip[@]}" install --no-cache-dir "faiss-gpu==$version"
