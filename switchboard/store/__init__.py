"""Persistence behind one interface (store.base); SQLite is the embedded implementation."""
