"""The switchboard: supervisor sessions, scheduler, store, REST API."""
