"""Where stages keep shared state: the Protocols, and the per-worker memory store."""
