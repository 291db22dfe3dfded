"""Test reports a job writes among its output files: parsed (junit.py) and stored as test
cases (ingest.py)."""
