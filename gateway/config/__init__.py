"""Configuration: YAML in, frozen model out (see load.py for the loader, model.py for the model)."""
