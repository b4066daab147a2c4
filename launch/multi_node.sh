#!/usr/bin/env bash
# Several machines through DeepSpeed's launcher:
#     launch/multi_node.sh HOSTFILE CONFIG [key=value ...]
# HOSTFILE: one "HOST slots=N" line per machine, each host once (launch/hostfile.example).
#
# Two ways to start:
#   - one call, on the first machine (default): DeepSpeed starts every machine's processes over
#     passwordless ssh (pdsh). The remote shells do not inherit this environment: the variables in
#     PROPAGATED below that are set here travel in a .deepspeed_env file (DeepSpeed's mechanism).
#   - one call per machine, without ssh (srun, Kubernetes, any scheduler that starts a command on
#     every machine): set NODE_RANK (this machine's line in HOSTFILE, from 0) and MASTER_ADDR (the
#     machine of NODE_RANK 0). Each call is DeepSpeed's `--no_ssh --node_rank` launch: it starts only
#     this machine's processes, which inherit this environment (no .deepspeed_env needed).
# A HOSTFILE with a single host (e.g. "localhost slots=2") runs that host's processes locally.
# SIGTERM, SIGINT or SIGUSR1 to this script makes every rank save a checkpoint and exit (launch/supervise.py):
# with one call per machine, on each machine; with pdsh, the ranks are not this machine's processes and
# DeepSpeed's runner ends them itself, without a checkpoint.
# MASTER_PORT: rendezvous port (default 29500). Relative paths in the YAML and the overrides are
# relative to the directory this script is run from (on every machine: a shared filesystem).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(( $# >= 2 )) || usage "launch/multi_node.sh HOSTFILE CONFIG [key=value ...]"
hostfile="$(absolute "$1")"
config="$(absolute "$2")"
shift 2

# Network interface and InfiniBand choices, NCCL logging, import path, DeepSpeed/OpenMP settings.
# (On GPU DeepSpeed already forwards NCCL_* and PYTHON*; listing them keeps CPU/gloo runs covered.)
PROPAGATED=(NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE NCCL_IB_GID_INDEX NCCL_NET_GDR_LEVEL NCCL_DEBUG
            GLOO_SOCKET_IFNAME PYTHONPATH DS_ACCELERATOR DS_BUILD_OPS OMP_NUM_THREADS TORCH_EXTENSIONS_DIR)

mapfile -t hosts < <(awk '!/^[[:space:]]*(#|$)/ {print $1}' "$hostfile")
launcher=(deepspeed --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}")
env_file=""
if [[ -n "${NODE_RANK:-}" ]]; then
    : "${MASTER_ADDR:?NODE_RANK is set: set MASTER_ADDR to the machine of NODE_RANK 0}"
    launcher+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
elif (( ${#hosts[@]} == 1 )); then
    # DeepSpeed runs a single host's processes locally, yet with a hostfile it would first check ssh
    # to that host and ask it (over ssh) for its address.
    launcher+=(--no_ssh_check --master_addr "${MASTER_ADDR:-127.0.0.1}")
else
    [[ -z "${MASTER_ADDR:-}" ]] || launcher+=(--master_addr "$MASTER_ADDR")
    # DeepSpeed reads DS_ENV_FILE (default ~/.deepspeed_env and ./.deepspeed_env, one KEY=VALUE a line,
    # no comments or blank lines); this one keeps those files' lines and adds PROPAGATED.
    env_file="$(mktemp -t deepspeed_env.XXXXXX)"
    export DS_ENV_FILE="$env_file"
    trap 'rm -f "$env_file"' EXIT
    for own in "$HOME/.deepspeed_env" "$PWD/.deepspeed_env" "$REPO_ROOT/.deepspeed_env"; do
        [[ ! -f "$own" ]] || grep -v '^[[:space:]]*$' "$own" >> "$env_file" || true
    done
    for name in "${PROPAGATED[@]}"; do
        [[ -z "${!name:-}" ]] || echo "$name=${!name}" >> "$env_file"
    done
    echo "[launch] .deepspeed_env for the remote machines ($env_file):"
    sed 's/^/    /' "$env_file"
fi

command=("${launcher[@]}" "$REPO_ROOT/launch/train.py" --config "$config" "$@")
print_command "${command[@]}"
set_supervisor
if [[ -n "$env_file" ]]; then
    run_forwarding_signals "${SUPERVISOR[@]}" "${command[@]}"  # not exec: the EXIT trap removes the env file
else
    exec "${SUPERVISOR[@]}" "${command[@]}"
fi
