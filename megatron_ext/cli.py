"""`megatron-ext` command line: one subcommand per tool, each module imported only when its command runs.

Keep this module free of megatron (and of anything heavy) at import time: worker processes
started with spawn re-import it.
"""

import argparse
import sys


def _add_preprocess(subparsers):
    from megatron_ext.data.preprocess import add_preprocess_args

    add_preprocess_args(subparsers)


COMMANDS = [_add_preprocess]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-ext", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
