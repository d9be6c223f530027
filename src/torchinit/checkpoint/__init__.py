"""Checkpoint formats, the streaming reader, and loading into any model."""
