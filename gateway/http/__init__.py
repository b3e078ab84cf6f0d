"""The data plane's HTTP/1.1: server protocol, request-target normalization, framing, headers."""
