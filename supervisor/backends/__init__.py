"""Backends: one module per kind of job a supervisor can run."""
