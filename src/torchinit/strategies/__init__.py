"""Strategies: how a set-up module is placed (one device for now)."""
