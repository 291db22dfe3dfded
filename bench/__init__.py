"""Benchmarks (run as modules, e.g. `python -m bench.wasm_start`); see bench/README.md."""
