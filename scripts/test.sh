#!/usr/bin/env bash
# Install everything the tests need (venv, packages, WASI toolchain, a Docker engine) and
# run the suite. The tests start their own private dockerd and PostgreSQL servers; nothing here
# starts a service.
source "$(dirname "$0")/setup-env.sh"
apt_install clang lld wasi-libc libclang-rt-14-dev-wasm32 docker.io busybox-static chromium \
    postgresql pgbouncer redis-server  # redis-server: only for the benchmark's peer row (Celery + Redis)
python_env test

.venv/bin/ruff check .
.venv/bin/lint-imports  # the package arrows: pyproject.toml [tool.importlinter]
.venv/bin/mypy  # the type check: pyproject.toml [tool.mypy]
set +e
# Three workers, each taking whole test modules (a module's fixtures start one switchboard,
# engine or cluster per worker): most tests wait on processes and sockets, so on two cores
# three at a time keep both busy (13.6 minutes where two took 16.6).
# SWITCHBOARD_TEST_WORKERS=0 runs them one at a time.
workers="${SWITCHBOARD_TEST_WORKERS:-3}"
if [ "$workers" = 0 ]; then
    .venv/bin/python -m pytest "$@"
else
    .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
fi
status=$?
set -e
if [ "$status" = 5 ]; then
    echo "pytest collected no tests: that is a failure, not a pass" >&2
    exit 1
fi
exit "$status"
