"""`megatron-ext preprocess`: JSONL/text -> megatron indexed dataset (the work is megatron_ext/data/preprocess.py).

Imports nothing heavy until the command runs.
"""

import argparse
from pathlib import Path

from megatron_ext.data.preprocess import DEFAULT_WORKERS, UpsampleRule, preprocess
from megatron_ext.data.tokenizer_files import KINDS
from megatron_ext.errors import InputError, MissingFile


def add_preprocess_args(subparsers) -> argparse.ArgumentParser:
    """Add the `preprocess` command to an argparse subparsers object; it dispatches to `run_preprocess`."""
    parser = subparsers.add_parser(
        "preprocess",
        help="tokenize JSONL/text into a megatron indexed dataset",
        description="Tokenize JSONL or plain-text files into {prefix}.bin/.idx (megatron-core indexed dataset).",
    )
    parser.add_argument("--input", nargs="+", action="extend", required=True, metavar="FILE",
                        help="JSONL (one object per line), plain-text files (one document each), or a local Hugging Face "
                             "dataset: a save_to_disk directory, .arrow or .parquet files (read a batch of rows at a time)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    tokenizer = parser.add_mutually_exclusive_group(required=True)
    tokenizer.add_argument("--tokenizer", metavar="PATH",
                           help="a sentencepiece .model, a Hugging Face tokenizer directory (tokenizer.json) or a "
                                "tiktoken BPE file (Llama-3's tokenizer.model)")
    tokenizer.add_argument("--tokenizer-model", metavar="FILE", help="a sentencepiece .model (the older --tokenizer)")
    parser.add_argument("--tokenizer-type", choices=KINDS,
                        help="the tokenizer's kind (default: detected from the files)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="tokenizing processes")
    parser.add_argument("--text-key", "--json-key", dest="json_key", default="text",
                        help="the field (JSONL) or column (a Hugging Face dataset) holding the text")
    parser.add_argument("--source-key", default="source", help="JSONL field naming the source (default: file stem)")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="end every document with the EOD token")
    parser.add_argument("--prepend-bos", action="store_true", help="start every document with BOS (as Llama saw)")
    parser.add_argument("--upsample", action="append", type=_upsample_arg, default=[],
                        metavar="SOURCE:MIN_TOKENS:FACTOR",
                        help="write documents of SOURCE with >= MIN_TOKENS tokens FACTOR times (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing PREFIX.bin/.idx (default: refuse to)")
    parser.set_defaults(func=run_preprocess)
    return parser


def run_preprocess(args: argparse.Namespace) -> int:
    """Run the `preprocess` command parsed by `add_preprocess_args`; print the statistics table."""
    from megatron_ext.data.tokenizer import load_tokenizer
    from megatron_ext.data.tokenizer_record import sidecar_path

    if args.tokenizer_model is not None:
        if not Path(args.tokenizer_model).is_file():
            raise MissingFile(
                f"--tokenizer-model '{args.tokenizer_model}' does not exist: pass a sentencepiece .model file"
            )
        if args.tokenizer_type not in (None, "sentencepiece"):
            raise InputError(f"--tokenizer-model names a sentencepiece .model, but --tokenizer-type says "
                             f"{args.tokenizer_type}: pass the file with --tokenizer instead")
        path, kind, setting = args.tokenizer_model, "sentencepiece", "--tokenizer-model"
    else:
        path, kind, setting = args.tokenizer, args.tokenizer_type, "--tokenizer"
    tokenizer = load_tokenizer(path, kind, setting=setting)  # before any work: a bad tokenizer stops here
    upsample = {}
    for source, rule in args.upsample:
        if source in upsample:
            raise InputError(f"--upsample names source '{source}' twice: keep one rule per source")
        upsample[source] = rule
    result = preprocess(
        args.input,
        args.output_prefix,
        tokenizer,
        workers=args.workers,
        json_key=args.json_key,
        source_key=args.source_key,
        append_eod=args.append_eod,
        prepend_bos=args.prepend_bos,
        upsample=upsample,
        overwrite=args.overwrite,
    )
    print(f"wrote {result.bin_path} and {result.idx_path}; the tokenizer they were made with is recorded in "
          f"{sidecar_path(args.output_prefix)}")
    print(result.table())
    return 0


def _upsample_arg(text: str) -> tuple[str, UpsampleRule]:
    parts = text.rsplit(":", 2)  # the source name may itself contain ':'
    try:
        source, min_tokens, factor = parts
        if not source:
            raise ValueError
        return source, UpsampleRule(min_tokens=int(min_tokens), factor=int(factor))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not SOURCE:MIN_TOKENS:FACTOR (e.g. stdlib_code:2048:3)"
        ) from None
