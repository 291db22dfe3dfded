#!/usr/bin/env bash
# The demo: switchboard on SQLite, a Wasm supervisor, a sample job. Ctrl-C stops it.
source "$(dirname "$0")/setup-env.sh"
python_env
exec .venv/bin/python scripts/demo.py "$@"
