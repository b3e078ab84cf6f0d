"""Pipeline stages, one module per YAML key, and the terminal handlers (proxy, echo)."""
