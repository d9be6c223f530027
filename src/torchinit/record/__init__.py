"""The record: what construction wrote down (data.py), its interpreter (replay.py), the record bound to a model's
placeholders and the per-module registry (recording.py), and the tensors still waiting for a value (pending.py).
`init/` writes records; `materialize/` and the strategies replay them; neither imports the other."""
