"""Transports between one Supervisor and a coordinator."""
