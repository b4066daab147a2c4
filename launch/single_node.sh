#!/usr/bin/env bash
# One machine, one process per GPU:
#     launch/single_node.sh CONFIG [key=value ...]
# NUM_GPUS: processes (default: every GPU CUDA_VISIBLE_DEVICES shows; 1 on CPU, where each process is
# a CPU rank, gloo, with DS_ACCELERATOR=cpu). MASTER_PORT: rendezvous port (default 29500).
# Relative paths in the YAML and the overrides are relative to the directory this script is run from.
# SIGTERM, SIGINT or SIGUSR1 to this script (docker stop, a scheduler, Ctrl-C) makes every rank save a
# checkpoint and exit; the script exits with their status (launch/supervise.py, CID_DS_STOP_GRACE).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(( $# >= 1 )) || usage "launch/single_node.sh CONFIG [key=value ...]"
config="$(absolute "$1")"
shift

if [[ -n "${NUM_GPUS:-}" ]]; then
    processes=(--num_gpus "$NUM_GPUS")
elif [[ "${DS_ACCELERATOR:-}" == cpu ]] || ! nvidia-smi -L >/dev/null 2>&1; then
    processes=(--num_gpus 1)
else
    processes=()  # DeepSpeed's default: every visible GPU
fi

# The rendezvous listens on the loopback address only (cid_ds/rendezvous.py): nothing off this machine joins.
command=(deepspeed "${processes[@]}" --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" "$REPO_ROOT/launch/train.py"
         --config "$config" "$@")
print_command "${command[@]}"
set_supervisor
exec "${SUPERVISOR[@]}" "${command[@]}"
