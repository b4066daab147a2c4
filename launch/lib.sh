# Sourced by the launch scripts. They run in the caller's directory, against which relative paths in a YAML
# and its overrides resolve (cid_ds.config); DeepSpeed's remote launch (pdsh) cds to the same directory on
# every machine, so it must exist there too (a shared filesystem), as the repository must.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    echo "usage: $1" >&2
    exit 2
}

# An argument path made absolute against the caller's directory.
absolute() {
    [[ -e "$1" ]] || { echo "no such file: $1" >&2; exit 2; }
    echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
}

print_command() {
    printf '[launch]'
    printf ' %q' "$@"
    printf '\n'
}

# SUPERVISOR: the prefix that runs a launch command under launch/supervise.py, so that SIGTERM, SIGINT and
# SIGUSR1 to this script reach every rank, which checkpoint and exit, and nothing the launch started
# outlives it. Its Python is the one of the `deepspeed` first on PATH (whose environment has psutil).
set_supervisor() {
    local deepspeed_cmd shebang python
    deepspeed_cmd="$(command -v deepspeed)" || { echo "deepspeed not found on PATH (activate its environment)" >&2; exit 2; }
    read -r shebang < "$deepspeed_cmd"
    python="${shebang#\#!}"
    [[ "$shebang" == "#!/"* && -x "$python" ]] || python=python3
    SUPERVISOR=("$python" "$REPO_ROOT/launch/supervise.py" --)
}

# Run "$@" in the background and wait for it, passing on TERM, INT and USR1 (for a script that must run
# something after the command and so cannot exec it; bash would otherwise die of the signal alone).
run_forwarding_signals() {
    "$@" &
    local pid=$! status=0
    for sig in TERM INT USR1; do
        trap "kill -$sig $pid 2>/dev/null || true" "$sig"
    done
    while true; do
        wait "$pid" && status=0 || status=$?
        kill -0 "$pid" 2>/dev/null || break  # wait returned for a trapped signal: the command still runs
    done
    return "$status"
}
