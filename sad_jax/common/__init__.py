"""Utilities every layer uses: located errors, the path layer (fileio), shared types,
config files."""
