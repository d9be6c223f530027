"""Construct: the init context and the construction mode."""
