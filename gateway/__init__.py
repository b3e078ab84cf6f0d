"""An API gateway for the edge: HTTP/1.1 data plane on uvloop, routes in YAML, live reload."""

from gateway._compiled import check_fresh

__version__ = "0.1.0"

check_fresh()
