"""Runtime: the immutable snapshot built from a config, and the state kept across reloads."""
