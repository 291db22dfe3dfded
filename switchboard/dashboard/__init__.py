"""The operator dashboard: static HTML, CSS and ES modules served at `/` and `/dashboard/`.

Everything it shows comes from the REST API with the operator's token; the server only
serves files.
"""

from switchboard.dashboard.routes import dashboard_routes

__all__ = ["dashboard_routes"]
