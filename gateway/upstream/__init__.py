"""Upstreams: keep-alive connections, their pools, and the balancers that pick an endpoint."""
