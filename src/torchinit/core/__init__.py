"""Core: the bottom layer. Plain helpers every layer may use: errors, flags, dtype rules, aten op tables, DTensor
placement math, list shortening and the gates around private torch APIs. Imports nothing else of torchinit."""
