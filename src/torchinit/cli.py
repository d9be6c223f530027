"""`torchinit` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="torchinit", description="Build and load PyTorch models exactly.")
    parser.add_argument("command", choices=["demo", "inspect"],
                        help="demo: compare naive init, init_module and empty init; inspect PATH: list a checkpoint "
                             "(`torchinit COMMAND --help` for its own arguments)")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the command's arguments")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from torchinit.demo import main as demo

        return demo(args.arguments)
    from torchinit.checkpoint.inspect import main as inspect

    return inspect(args.arguments)


if __name__ == "__main__":
    raise SystemExit(main())
