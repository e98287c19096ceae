"""`megatron-ext convert hf-to-mcore | mcore-to-hf`.

Imports nothing heavy until a command runs (megatron_ext.cli builds its parser at start-up). Bad input
raises ConversionError (a UserError): one line, exit code 2, before anything is written.
"""

import argparse


def add_convert_args(subparsers) -> argparse.ArgumentParser:
    """Add `convert` (with its two commands) to a `megatron-ext` subparsers object."""
    parser = subparsers.add_parser(
        "convert", help="convert checkpoints: Hugging Face <-> megatron_ext (megatron-core)",
        description="Convert Llama / Mistral / Qwen2 checkpoints between Hugging Face safetensors and "
                    "megatron_ext (megatron-core dist_checkpointing), keeping the RoPE settings and HARPE bases. "
                    "Check a conversion with `megatron-ext eval compare --model CHECKPOINT --reference HF_DIR "
                    "--data TEXT`: max logit difference, top-1 agreement and perplexity of both.")
    _add_commands(parser)
    parser.set_defaults(func=run_convert)
    return parser


def _add_commands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="convert_command", required=True)
    to_mcore = commands.add_parser(
        "hf-to-mcore", help="Hugging Face directory -> megatron_ext checkpoint",
        description="Writes OUT/iter_0000000 (+ OUT/latest): train from it with checkpoint.pretrained: "
                    "OUT/iter_0000000. It loads at any TP/PP; --tp/--pp are checked and recorded.")
    to_mcore.add_argument("--hf", required=True, metavar="DIR", help="model directory: config.json + *.safetensors")
    to_mcore.add_argument("--out", required=True, metavar="DIR", help="new checkpoint root (must not exist)")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel size you will train with")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline-parallel size you will train with")
    _add_common(to_mcore, dtype_default="the weights' own dtype")

    to_hf = commands.add_parser(
        "mcore-to-hf", help="megatron_ext checkpoint -> Hugging Face directory",
        description="Writes a transformers model directory. HARPE models (rope_type 'harpe') load with "
                    "megatron_ext.hf.load_harpe_model.")
    to_hf.add_argument("--ckpt", required=True, metavar="DIR", help="an iter_XXXXXXX directory or a checkpoint root")
    to_hf.add_argument("--out", required=True, metavar="DIR", help="new model directory (must not exist)")
    to_hf.add_argument("--family", choices=ConversionFamilies(), metavar="FAMILY",
                       help="one of %(choices)s; default: the family it was converted from, else qwen2 with q/k/v "
                            "biases, llama without")
    to_hf.add_argument("--hf-base", metavar="DIR",
                       help="Hugging Face directory to take config fields (token ids, ...) and tokenizer files from")
    to_hf.add_argument("--tokenizer", metavar="PATH",
                       help="tokenizer file or directory to export with the model (default: --hf-base's, else the "
                            "copy the checkpoint carries)")
    to_hf.add_argument("--rope-format", choices=("rope_parameters", "rope_scaling", "both"),
                       help="config.json RoPE form: transformers>=5 (rope_parameters), 4.x (rope_theta + "
                            "rope_scaling) or both; default: the source model's, else both")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    _add_common(to_hf, dtype_default="the dtype it was converted from, else the saved one")


class ConversionFamilies:
    """`--family`'s choices: the families of megatron_ext.convert.adapters.ADAPTERS, read only when argparse asks
    (a --family given, or help shown), since the adapters import torch and building the parser must not."""

    def _names(self) -> list[str]:
        from megatron_ext.convert.adapters import ADAPTERS

        return list(ADAPTERS)

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()


def _add_common(parser, dtype_default: str) -> None:
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help=f"weights dtype (default: {dtype_default})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_convert(args) -> int:
    """Run the parsed command; prints the output path and the peak memory."""
    import megatron_ext.convert.mcore_io  # noqa: F401  (imports megatron: counted in the baseline below)

    _return_freed_memory()
    baseline = _start_peak_memory_count()
    if args.convert_command == "hf-to-mcore":
        from megatron_ext.convert.from_hf import hf_to_mcore

        result = hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                             progress=not args.no_progress)
        print(f"checkpoint: {result}  (train from it with checkpoint.pretrained: {result})")
        print(_compare_hint(result, args.hf))
    else:
        from megatron_ext.convert.to_hf import mcore_to_hf

        result = mcore_to_hf(args.ckpt, args.out, family=args.family, dtype=args.dtype, hf_base=args.hf_base,
                             rope_form=args.rope_format, max_shard_size=args.max_shard_size,
                             progress=not args.no_progress, tokenizer=args.tokenizer)
        print(f"model: {result}")
        print(_compare_hint(args.ckpt, result))
    peak = _peak_rss_bytes()
    print(f"peak memory: {peak / 2**20:.0f} MiB max RSS, {(peak - baseline) / 2**20:.0f} MiB above the "
          f"{baseline / 2**20:.0f} MiB after imports")
    return 0


def _compare_hint(checkpoint, hf_dir) -> str:
    """The command that checks this conversion (megatron_ext/eval/compare.py): users ask for it after each one."""
    import shlex

    command = ["megatron-ext", "eval", "compare", "--model", str(checkpoint), "--reference", str(hf_dir)]
    return f"check it: {shlex.join(command)} --data TEXT_FILE"


def _return_freed_memory() -> None:
    """Have glibc hand every freed tensor of 1 MiB or more back to the OS.

    By default glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), then keeps
    freed layer-sized tensors in its heap for reuse: this process's memory would creep towards a
    few layers' worth. A fixed threshold keeps peak memory at what is alive. No-op off glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed, which also stops its dynamic growth
    except (OSError, AttributeError):
        pass


def _start_peak_memory_count() -> int:
    """Restart the peak-RSS count at the current RSS (Linux: clear_refs), so the peak reported is
    the conversion's, not the imports'; returns the RSS it starts from."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # 5: reset the peak resident set size to the current one
        return _proc_status_bytes("VmRSS")
    except OSError:
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    try:
        return _proc_status_bytes("VmHWM")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise OSError(f"no {field} in /proc/self/status")
