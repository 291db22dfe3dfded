#!/usr/bin/env bash
# Refresh the lock files from pyproject.toml: requirements-test.lock (the project, its test
# tools) and requirements.lock (the project alone, at the same versions). Pins that still fit
# are kept; `bash scripts/lock.sh --upgrade` moves every pin to the newest release.
source "$(dirname "$0")/setup-env.sh"
[ -x .venv/bin/uv ] || python_env test   # uv comes with the test tools
compile() {  # compile OUTPUT [uv pip compile options]
    local out="$1"
    shift
    .venv/bin/uv pip compile pyproject.toml --quiet --generate-hashes --universal \
        --python-version 3.11 --annotation-style line \
        --custom-compile-command "bash scripts/lock.sh" -o "$out" "$@"
}
compile requirements-test.lock --extra test "$@"
compile requirements.lock -c requirements-test.lock "$@"
