"""Core: the bottom layer. Plain helpers every layer may use: errors, flags, dtype rules, aten op tables and
storage keys, DTensor placement math, the non-finite check (values.py), list shortening, and the gates around
private torch APIs (compat.py) and DeepSpeed's ZeRO-3 parameter attributes (compat_deepspeed.py). Imports nothing
else of torchinit."""
