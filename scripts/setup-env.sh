# Sourced by the scripts: a virtualenv in .venv with the project and, with "test", its
# test tools; on Debian as root, the system packages the tests need.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            echo "missing system packages: ${missing[*]} (install them, then run again)" >&2
            exit 1
        fi
        echo "installing ${missing[*]}" >&2
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${missing[@]}" >&2
    fi
}

python_env() {  # python_env [extra]: the versions of requirements[-extra].lock
    local extra="${1:-}"
    local lock="requirements${extra:+-$extra}.lock"
    if [ ! -x .venv/bin/python ]; then
        echo "creating .venv" >&2
        python3 -m venv .venv
    fi
    # The lock pins every package with its hashes; the project itself comes on top, without
    # dependencies of its own choosing. pip and setuptools are chatty even when all is well:
    # show their words only on failure.
    if ! { .venv/bin/python -m pip install -q --require-hashes -r "$lock" &&
        .venv/bin/python -m pip install -q --no-deps -e .; } > .venv/pip.log 2>&1; then
        cat .venv/pip.log >&2
        exit 1
    fi
}
