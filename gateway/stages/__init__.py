"""Pipeline stages, one module per YAML key, and the terminal handlers (proxy, echo).

A stage kind's module holds its frozen config, its parser, its builder and its lifecycle, and
ends with one `StageKind` record (kind.py); registry.py lists them.  Stages are built once per
stage per snapshot (and not even that when `SharedState` hands back the live instance of an
unchanged stage), never per request; which store a stage uses is decided then too.
"""
