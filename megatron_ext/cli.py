"""`megatron-ext`: one subcommand per tool, each defined in its package's cli.py and imported when the parser is built.

The contract every subcommand follows: a mistake the user can fix raises megatron_ext.errors.UserError
(ConfigError, ConversionError, CheckpointError, ...) and is printed here as one line,
`megatron-ext <command>: <message>`, with exit code 2 and no traceback; anything else keeps its
traceback. Logging is configured here, once. Keep this module and the packages' cli.py free of
megatron (and of anything heavy) at import time: worker processes started with spawn re-import it.
No package imports this module.
"""

import argparse
import importlib
import logging
import sys

from megatron_ext.errors import UserError

# subcommand -> (its package's cli module, the function that adds its parser and sets `func`)
COMMANDS = {
    "preprocess": ("megatron_ext.data.cli", "add_preprocess_args"),
    "train": ("megatron_ext.training.cli", "add_train_args"),
    "eval": ("megatron_ext.eval.cli", "add_eval_args"),
    "convert": ("megatron_ext.convert.cli", "add_convert_args"),
    "plan": ("megatron_ext.launch.cli", "add_plan_args"),
    "launch": ("megatron_ext.launch.cli", "add_launch_args"),
    "repro": ("megatron_ext.repro.cli", "add_repro_args"),
    "serve": ("megatron_ext.serve.cli", "add_serve_args"),
}


class OneLineErrors(argparse.ArgumentParser):
    """argparse's usage errors as one line, `megatron-ext <command>: <message>`, exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="megatron-ext", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)
    for module, add in COMMANDS.values():
        getattr(importlib.import_module(module), add)(subparsers)
    return parser


def configure_logging() -> None:
    """Our INFO lines as plain messages; megatron-core's own INFO (very chatty) and its TE/apex notes muted."""
    import warnings

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # megatron-core warns once per module that TE/apex are missing; compat says which path runs in one line
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed")
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated")
    warnings.filterwarnings("ignore", module=r"megatron\.")  # deprecation notes about settings we do not use


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # for commands that record how they were called
    configure_logging()
    try:
        return args.func(args)
    except UserError as error:
        message = " ".join(str(error).split())  # one line, whatever the message's own layout
        print(f"megatron-ext {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
