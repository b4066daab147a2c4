#!/usr/bin/env bash
# The container's entrypoint: its arguments are CONFIG [key=value ...].
#     docker run --gpus all -p 6006:6006 -v /data:/data IMAGE ds_configs/experiments/x.yaml optim.lr=1e-3
# With HOSTFILE set (a path inside the container) it runs launch/multi_node.sh, else single_node.sh;
# NUM_GPUS, NODE_RANK, MASTER_ADDR, MASTER_PORT pass through to them. Both exec the supervised launch, so
# docker stop's SIGTERM (passed on by tini, PID 1) makes every rank save a checkpoint and exit:
#     docker stop -t 300 CONTAINER     (CID_DS_STOP_GRACE: how long the ranks get before they are killed)
# TensorBoard: port 6006 is exposed; run it beside the job, e.g.
#     docker exec CONTAINER tensorboard --logdir runs --bind_all --port 6006
set -euo pipefail
launch_dir="$(dirname "${BASH_SOURCE[0]}")"
if [[ -n "${HOSTFILE:-}" ]]; then
    exec "$launch_dir/multi_node.sh" "$HOSTFILE" "$@"
fi
exec "$launch_dir/single_node.sh" "$@"
