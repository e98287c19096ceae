"""`megatron-ext repro`: the small-scale reproduction of context extension (see megatron_ext/repro/runner.py)."""

import shlex


def add_repro_args(subparsers) -> None:
    parser = subparsers.add_parser(
        "repro", help="pretrain a tiny model at L, extend it to s*L with every method, evaluate, write a report",
        description="Small-scale reproduction: vanilla, PI, NTK, ABF, YaRN, ABF-multi, PoSE (+linear/YaRN), HARPE "
                    "(uniform, peak-valley) and HARPE+PoSE from one pretrained model under one token budget.")
    parser.add_argument("--config", required=True, help="YAML, e.g. examples/reproduction/cpu_8x.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set seeds=[1,2] (repeatable)")
    parser.add_argument("--smoke", action="store_true",
                        help="a few steps of everything on a very small model (checks the pipeline in ~2 min)")
    parser.add_argument("--fresh", action="store_true",
                        help="train and evaluate every method again even if its result.json exists")
    parser.set_defaults(func=_run_repro)


def _run_repro(args) -> int:
    from megatron_ext.repro.config import SMOKE_OVERRIDES, load_repro_config
    from megatron_ext.repro.runner import run_repro

    overrides = (SMOKE_OVERRIDES if args.smoke else []) + list(args.overrides)
    config = load_repro_config(args.config, overrides)  # every setting checked before any work
    command = "megatron-ext " + shlex.join(args.argv)
    report = run_repro(config, command=command, fresh=args.fresh)
    print(f"report: {report}")
    return 0
