"""Checkpoints, imports pointing down only: header.py / safetensors.py / dcp.py read bytes -> base.py the lazy
`Checkpoint` -> formats.py and zero.py (and optim_state.py) read each format -> opener.py opens any path ->
load_model.py, partitions.py, save.py, sharded_state.py, load_state.py, export.py, inspect.py use them."""
