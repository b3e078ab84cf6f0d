"""The side-by-side performance harness (SPEC §12): `python -m bench`, never collected by pytest."""
