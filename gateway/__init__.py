"""An API gateway for the edge: HTTP/1.1 data plane on uvloop, routes in YAML, live reload."""

__version__ = "0.1.0"
