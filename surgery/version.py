"""The package version (pyproject.toml's), which the writers record in the files they write."""
__version__ = "0.1.0"
