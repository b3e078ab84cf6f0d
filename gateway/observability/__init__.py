"""Observability: metrics (declared in metrics.py, updated through instruments.py, rendered and
merged across workers by exposition.py), the access log (access_log.py), JSON logging (logs.py).

Each module is imported by its full name; this package re-exports nothing, so importing one
part never pulls in the others.
"""
