"""The config layer: Hydra composition of recipes and groups, the typed schema, and its diagnostics."""
