"""Materialize: turn constructed tensors into written, verified ones."""
