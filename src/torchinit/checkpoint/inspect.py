"""`torchinit inspect PATH`: what a checkpoint holds — tensors, dtypes, shapes, bytes, shards, metadata — read
from headers only (torch pickles are opened with mmap, so their data is not read either)."""

from __future__ import annotations

import argparse
from collections import Counter

from torchinit.checkpoint.header import CheckpointError
from torchinit.checkpoint.opener import open_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchinit inspect", description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--select", help="the nested key holding the state dict, if any")
    parser.add_argument("--limit", type=int, default=50, help="tensors to list (0: all)")
    args = parser.parse_args(argv)
    try:
        checkpoint = open_checkpoint(args.path, args.select)
    except CheckpointError as error:
        print(f"error: {error}")
        return 1
    keys = list(checkpoint)
    total = sum(checkpoint.nbytes(k) for k in keys)
    print(f"{checkpoint.path}: {len(keys)} tensors, {total / 2**20:,.1f} MiB in {len(checkpoint.files)} file(s)")
    dtypes = Counter(str(checkpoint.dtype(k)).removeprefix("torch.") for k in keys)
    print("dtypes: " + ", ".join(f"{name} x{count}" for name, count in dtypes.most_common()))
    if len(checkpoint.files) > 1:
        for file in checkpoint.files:
            print(f"  shard {file.name}")
    for key, value in checkpoint.metadata.items():
        print(f"metadata {key}: {value}")
    shown = keys if args.limit == 0 else keys[: args.limit]
    width = max((len(k) for k in shown), default=0)
    for key in shown:
        dtype = str(checkpoint.dtype(key)).removeprefix("torch.")
        print(f"  {key:<{width}}  {dtype:<9} {str(list(checkpoint.shape(key))):<18} "
              f"{checkpoint.nbytes(key) / 2**20:>10,.3f} MiB")
    if len(shown) < len(keys):
        print(f"  ... and {len(keys) - len(shown)} more (--limit 0 lists all)")
    return 0
