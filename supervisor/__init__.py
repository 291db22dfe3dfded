"""The supervisor: runs jobs on one host and reports them through a connector."""
