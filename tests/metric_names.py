"""Every metric of a supervisor, as it appears in the exposition: name -> type. Pinned by
both the switchboard's metrics tests (which scrape a supervisor too) and the supervisor's."""

SUPERVISOR_METRICS = {
    "supervisor_reconnects_total": "counter",
    "supervisor_failovers_total": "counter",
    "supervisor_events_resent_total": "counter",
    "supervisor_event_problems_total": "counter",
    "supervisor_protocol_errors_total": "counter",
    "supervisor_backlog_bytes": "gauge",
    "supervisor_running_jobs": "gauge",
    "supervisor_runs_ended_total": "counter",
    "supervisor_backend_errors_total": "counter",
    "supervisor_cache_lookups_total": "counter",
    "supervisor_limits_exceeded_total": "counter",
    "supervisor_output_files_total": "counter",
}
