"""`megatron-ext eval <task>` (also `python -m megatron_ext.eval.cli <task>`): a thin layer over the task functions.

Each task's flags are generated from its settings dataclass (megatron_ext/eval/settings.py), so a default
lives in one place. Building the parser imports no torch or megatron.
"""

import argparse
import dataclasses
import shlex
import sys
import types
import typing
from pathlib import Path

from megatron_ext.eval import settings as task_settings

TASKS = {
    "perplexity": (task_settings.PerplexitySettings, "sliding-window perplexity per evaluated length"),
    "passkey": (task_settings.PasskeySettings, "passkey retrieval accuracy per length (PoSE template)"),
    "needle": (task_settings.NeedleSettings, "needle-in-a-haystack grid: heatmap PNG and CSV"),
    "ruler": (task_settings.RulerSettings, "RULER-style tasks: multi-key NIAH, multi-value NIAH, variable tracking"),
    "attention": (task_settings.AttentionSettings, "attention entropy per layer/head, JS divergence to a reference"),
}


def add_eval_args(subparsers) -> argparse.ArgumentParser:
    """Add `eval` with one sub-command per task and `suite`; each sets `func=run_eval`."""
    parser = subparsers.add_parser("eval", help="long-context evaluation (perplexity, passkey, needle, ruler, "
                                   "attention, suite)", description=__doc__.splitlines()[0])
    tasks = parser.add_subparsers(dest="eval_task", required=True, metavar="TASK")
    for task, (settings_class, help_text) in TASKS.items():
        task_parser = tasks.add_parser(task, help=help_text, description=help_text)
        _add_model_args(task_parser, with_reference=task == "attention")
        _add_settings_args(task_parser, settings_class)
        task_parser.add_argument("--output-dir", default="runs/eval",
                                 help="where the JSON (and PNG/CSV) results go (default: runs/eval)")
        task_parser.set_defaults(func=run_eval)
    suite = tasks.add_parser("suite", help="run a chosen set of tasks on several models, write one Markdown report",
                             description="Run the tasks a YAML config lists and write one Markdown report.")
    suite.add_argument("--config", required=True, help="YAML file, e.g. examples/configs/eval_tiny_harpe.yaml")
    suite.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set passkey.trials=50 (repeatable)")
    suite.set_defaults(func=run_eval)
    return parser


def _add_model_args(parser, with_reference: bool) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True,
                       help="a megatron_ext checkpoint (root or iter_ directory) or a Hugging Face model directory")
    group.add_argument("--name", help="the model's name in tables (default: its directory)")
    group.add_argument("--tokenizer", help="megatron checkpoints: the tokenizer .model, if it moved since training")
    group.add_argument("--tensor-parallel-size", type=int, default=1, help="megatron checkpoints, under torchrun")
    group.add_argument("--pipeline-parallel-size", type=int, default=1, help="megatron checkpoints, under torchrun")
    group.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    if with_reference:
        group.add_argument("--reference", help="a second model (same tokenizer), e.g. before extension: adds the "
                                               "JS divergence of attention")
        group.add_argument("--reference-name", help="the reference's name in tables")


def _add_settings_args(parser, settings_class) -> None:
    group = parser.add_argument_group("settings")
    defaults = settings_class()
    for f in dataclasses.fields(settings_class):
        kind = _base_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {getattr(defaults, f.name)!r})"
        if kind is bool:
            group.add_argument(flag, dest=f"setting_{f.name}", action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(kind) is list:
            group.add_argument(flag, dest=f"setting_{f.name}", nargs="+", type=typing.get_args(kind)[0],
                               metavar=f.name.upper(), help=help_text)
        else:
            group.add_argument(flag, dest=f"setting_{f.name}", type=kind, metavar=f.name.upper(), help=help_text)


def _base_type(annotation):
    """X | None -> X."""
    if isinstance(annotation, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def settings_from_args(args, settings_class):
    """The settings dataclass: its defaults, overridden by the flags given."""
    given = {f.name: getattr(args, f"setting_{f.name}") for f in dataclasses.fields(settings_class)
             if getattr(args, f"setting_{f.name}", None) is not None}
    return settings_class(**given)


def run_eval(args) -> int:
    """Run `megatron-ext eval <task>` or `eval suite` from parsed arguments; 0 on success, 2 on a bad setting."""
    import logging
    import warnings

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"megatron\.")  # deprecation notes about settings we do not use
    if args.eval_task == "suite":
        return _run_suite(args)
    settings = settings_from_args(args, TASKS[args.eval_task][0])
    try:
        settings.validate()
    except ValueError as error:
        print(f"megatron-ext eval {args.eval_task}: {error}", file=sys.stderr)
        return 2
    from megatron_ext.eval.results import is_reporting_rank

    model, reference = _load_models(args)
    result = _evaluate(args.eval_task, model, settings, reference)
    if is_reporting_rank():
        output = Path(args.output_dir)
        print(result.table())
        written = [result.save_json(output / f"{args.eval_task}.json")]
        if args.eval_task == "needle":
            written += [result.write_heatmap(output / "needle_heatmap.png"), result.write_csv(output / "needle.csv")]
        if args.eval_task == "attention":
            written += result.write_plots(output)
        print("wrote " + ", ".join(str(path) for path in written))
    return 0


def _load_models(args):
    from megatron_ext.eval.models import load_eval_model

    common = dict(precision=args.precision, tensor_parallel_size=args.tensor_parallel_size,
                  pipeline_parallel_size=args.pipeline_parallel_size, tokenizer_model=args.tokenizer)
    model = load_eval_model(args.model, name=args.name, **common)
    reference = None
    if getattr(args, "reference", None):
        reference = load_eval_model(args.reference, name=args.reference_name, **common)
    return model, reference


def _evaluate(task, model, settings, reference):
    from megatron_ext.eval.attention import evaluate_attention
    from megatron_ext.eval.suite import EVALUATE

    if task == "attention":
        return evaluate_attention(model, settings, reference=reference)
    return EVALUATE[task](model, settings)


def _run_suite(args) -> int:
    from megatron_ext.eval.suite import load_suite_config, run_suite
    from megatron_ext.training.config import ConfigError

    try:
        config = load_suite_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError, ConfigError) as error:
        print(f"megatron-ext eval suite: {error}", file=sys.stderr)
        return 2
    command = shlex.join(["megatron-ext", "eval", "suite", "--config", args.config,
                          *[part for item in args.overrides for part in ("--set", item)]])
    report = run_suite(config, command=command)
    print(f"report: {report}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-ext", description=__doc__.splitlines()[0])
    add_eval_args(parser.add_subparsers(dest="command", required=True))
    # `python -m megatron_ext.eval.cli passkey ...` is `megatron-ext eval passkey ...`
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
