# Sourced by the launch scripts. They run from the repository root, because the experiment YAMLs and
# DeepSpeed's remote launch (pdsh: "cd <launch dir>") use repository-relative paths.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    echo "usage: $1" >&2
    exit 2
}

# An argument path made absolute against the caller's directory, before the script moves to REPO_ROOT.
absolute() {
    [[ -e "$1" ]] || { echo "no such file: $1" >&2; exit 2; }
    echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
}

print_command() {
    printf '[launch]'
    printf ' %q' "$@"
    printf '\n'
}
