"""`torchinit` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="torchinit", description="Build and load PyTorch models exactly.")
    parser.add_argument("command", choices=["demo", "inspect"],
                        help="demo: compare naive init, init_module and empty init; inspect PATH: list a checkpoint")
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from torchinit.demo import main as demo

        return demo(rest)
    from torchinit.checkpoint.inspect import main as inspect

    return inspect(rest)


if __name__ == "__main__":
    raise SystemExit(main())
