"""`megatron-ext eval <task>` and `megatron-ext eval suite`: a thin layer over the tasks of the registry.

One subcommand per registered task (megatron_ext/eval/registry.py; `EvalTask.command`, e.g. `lm-eval` for the task
`lm_eval`, whose name works too), its flags generated from the task's settings dataclass, so a default lives in
one place. Building the parser imports no torch or megatron; a bad setting raises a UserError, which
`megatron-ext` prints as one line, before any model loads (the settings' values, then the task's `prepare`).
"""

import argparse
import dataclasses
import shlex
import types
import typing
from pathlib import Path

from megatron_ext.eval.registry import TASKS


def add_eval_args(subparsers) -> argparse.ArgumentParser:
    """Add `eval` with one sub-command per registered task and `suite`; each sets `func=run_eval`."""
    commands = [task.command for task in TASKS.values()]
    parser = subparsers.add_parser("eval", help=f"long-context evaluation ({', '.join([*commands, 'suite'])})",
                                   description=__doc__.splitlines()[0])
    tasks = parser.add_subparsers(dest="eval_task", required=True, metavar="TASK")
    for task in TASKS.values():
        aliases = [task.name] if task.name != task.command else []
        task_parser = tasks.add_parser(task.command, aliases=aliases, help=task.help, description=task.help)
        _add_model_args(task_parser, with_reference=task.uses_reference, reference_required=task.needs_reference)
        _add_settings_args(task_parser, task.settings)
        task_parser.add_argument("--output-dir", default="runs/eval",
                                 help="where the JSON (and PNG/CSV) results go (default: runs/eval)")
        task_parser.set_defaults(func=run_eval, eval_task=task.name)  # the registered name, whichever was typed
    suite = tasks.add_parser("suite", help="run a chosen set of tasks on several models, write one Markdown report",
                             description="Run the tasks a YAML config lists and write one Markdown report.")
    suite.add_argument("--config", required=True, help="YAML file, e.g. examples/configs/eval_tiny_harpe.yaml")
    suite.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set passkey.trials=50 (repeatable)")
    suite.set_defaults(func=run_eval)
    return parser


def _add_model_args(parser, with_reference: bool, reference_required: bool = False) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True,
                       help="a megatron_ext checkpoint (root or iter_ directory) or a Hugging Face model directory")
    group.add_argument("--name", help="the model's name in tables (default: its directory)")
    group.add_argument("--tokenizer", help="megatron checkpoints: the tokenizer .model, if it moved since training")
    group.add_argument("--tensor-parallel-size", type=int, default=1, help="megatron checkpoints, under torchrun")
    group.add_argument("--pipeline-parallel-size", type=int, default=1, help="megatron checkpoints, under torchrun")
    group.add_argument("--context-parallel-size", type=int, default=1,
                       help="megatron checkpoints, under torchrun/srun: each prompt's tokens split zig-zag over CP "
                            "ranks; ranks beyond TP x PP x CP split the prompts (data parallel)")
    group.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    if with_reference:
        group.add_argument("--reference", required=reference_required,
                           help="a second model (same tokenizer) to compare with, e.g. the model before extension, "
                                "or the conversion of --model")
        group.add_argument("--reference-name", help="the reference's name in tables")


def _add_settings_args(parser, settings_class) -> None:
    group = parser.add_argument_group("settings")
    defaults = settings_class()
    hints = typing.get_type_hints(settings_class)  # types, also where a plug-in postpones annotations
    for f in dataclasses.fields(settings_class):
        kind = _base_type(hints[f.name])
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
    """Run `megatron-ext eval <task>` or `eval suite` from parsed arguments; 0 on success.

    A bad setting raises a UserError (EvalSettingsError, ConfigError) before any model loads."""
    if args.eval_task == "suite":
        return _run_suite(args)
    from megatron_ext.eval.results import is_reporting_rank

    task = TASKS[args.eval_task]
    settings = settings_from_args(args, task.settings)
    settings.validate()
    task.prepare(settings, pipeline_parallel_size=args.pipeline_parallel_size)
    model, reference = _load_models(args, lambda tokenizer: task.check_prompts(settings, tokenizer))
    result = task.evaluate(model, settings, reference=reference)
    if is_reporting_rank():
        output = Path(args.output_dir)
        print(result.table())
        written = [result.save_json(output / f"{task.name}.json"), *task.output_files(result, output)]
        print("wrote " + ", ".join(str(path) for path in written))
    return 0


def _load_models(args, check_before_loading):
    """(model, reference or None), each argument resolved once; `check_before_loading(tokenizer)` runs first, with a
    function that reads the model's tokenizer without its weights (the checks that count tokens)."""
    from megatron_ext.eval.models import check_parallel_sizes, eval_tokenizer, load_eval_model, resolve_eval_model

    sizes = dict(tensor=args.tensor_parallel_size, pipeline=args.pipeline_parallel_size,
                 context=args.context_parallel_size)
    check_parallel_sizes(sizes)
    model_source = resolve_eval_model(args.model, setting="--model")
    check_parallel_sizes(sizes, model_source, "--model")
    reference_source = None
    if getattr(args, "reference", None):
        reference_source = resolve_eval_model(args.reference, setting="--reference")
        check_parallel_sizes(sizes, reference_source, "--reference")
    check_before_loading(lambda: eval_tokenizer(model_source, tokenizer_model=args.tokenizer))
    common = dict(precision=args.precision, tensor_parallel_size=args.tensor_parallel_size,
                  pipeline_parallel_size=args.pipeline_parallel_size,
                  context_parallel_size=args.context_parallel_size, tokenizer_model=args.tokenizer)
    model = load_eval_model(model_source, name=args.name, **common)
    reference = None
    if reference_source is not None:
        reference = load_eval_model(reference_source, name=args.reference_name, setting="--reference", **common)
    return model, reference


def _run_suite(args) -> int:
    from megatron_ext.eval.suite import load_suite_config, run_suite

    config = load_suite_config(args.config, args.overrides)
    command = shlex.join(["megatron-ext", "eval", "suite", "--config", args.config,
                          *[part for item in args.overrides for part in ("--set", item)]])
    report = run_suite(config, command=command)
    print(f"report: {report}")
    return 0
