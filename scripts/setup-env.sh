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

python_env() {  # python_env [extra]
    local extra="${1:-}"
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
        .venv/bin/python -m pip install -q --upgrade pip >&2
    fi
    .venv/bin/python -m pip install -q -e ".${extra:+[$extra]}" >&2
}
