"""Settings of every evaluation: one dataclass per task, where every default lives.

The task functions, the `megatron-ext eval` flags and the suite's YAML sections are all built from
these. Standard library only, so building the command line stays cheap.
"""

import glob
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ext.errors import UserError
from megatron_ext.data.prompts import PASSKEY_FILLER

RULER_TASKS = ("mk_niah", "mv_niah", "vt")


class EvalSettingsError(UserError, ValueError):
    """A bad evaluation setting (or model choice, such as a reference with another tokenizer): the message
    names the setting and the fix. `megatron-ext eval` prints it as one line and exits with code 2."""


@dataclass
class PerplexitySettings:
    data: list[str] = field(default_factory=list, metadata=dict(
        help="JSONL or text files (globs allowed; '{stdlib}' = this Python's standard library) or indexed-dataset "
             "prefixes, tokenized with the model's tokenizer"))
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192, 16384, 32768], metadata=dict(
        help="evaluated window sizes, BOS included"))
    stride: int = field(default=1024, metadata=dict(
        help="tokens a window moves by (PoSE: 1024); capped at the window's length - 1, the tokens one window "
             "scores, so no token is skipped or predicted without a row the window read"))
    truncate: bool = field(default=False, metadata=dict(
        help="one window per document: its first length-1 tokens (PoSE's --truncate, used for GovReport)"))
    num_documents: int = field(default=20, metadata=dict(help="documents evaluated (the first that qualify)"))
    min_document_tokens: int = field(default=0, metadata=dict(help="skip documents with fewer tokens"))
    max_document_tokens: int | None = field(default=None, metadata=dict(help="cut documents to this many tokens"))
    json_key: str = field(default="text", metadata=dict(help="the text field of JSONL records"))

    def validate(self) -> None:
        if not self.data:
            raise EvalSettingsError("perplexity.data is empty: give JSONL/text files or indexed-dataset prefixes")
        if not self.lengths or min(self.lengths) < 2:
            raise EvalSettingsError(f"perplexity.lengths ({self.lengths}) must be window sizes >= 2")
        if self.stride < 1 or self.num_documents < 1:
            raise EvalSettingsError(f"perplexity.stride ({self.stride}) and num_documents ({self.num_documents}) "
                                    "must be >= 1")
        missing = [source for source in self.data if not perplexity_source_paths(source)]
        if missing:
            raise EvalSettingsError(f"perplexity.data {missing}: no such file, glob match or indexed dataset "
                                    "(PREFIX.idx/.bin): give JSONL or text files, a glob, or an indexed-dataset prefix")


def perplexity_source_paths(source: str) -> list[str]:
    """The files one entry of perplexity.data names: [PREFIX] for an indexed dataset, else its glob's matches."""
    source = source.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
    if Path(source + ".idx").is_file() and Path(source + ".bin").is_file():
        return [source]
    return sorted(glob.glob(source, recursive=True))


@dataclass
class PasskeySettings:
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192, 16384, 32768], metadata=dict(
        help="prompt lengths in tokens (answer included)"))
    trials: int = field(default=20, metadata=dict(help="prompts per length (PoSE: 50)"))
    key_max: int = field(default=50000, metadata=dict(help="keys are drawn uniformly from 1 .. key_max"))
    seed: int = field(default=0, metadata=dict(help="draws keys and depths; the same seed gives the same prompts"))
    filler: str = field(default=PASSKEY_FILLER, metadata=dict(help="the irrelevant text, repeated"))
    batch_size: int = field(default=1, metadata=dict(help="prompts per forward pass"))

    def validate(self) -> None:
        if not self.lengths or self.trials < 1 or self.key_max < 1 or self.batch_size < 1:
            raise EvalSettingsError(f"passkey: lengths ({self.lengths}) must be non-empty and trials ({self.trials}), "
                                    f"key_max ({self.key_max}), batch_size ({self.batch_size}) >= 1")


@dataclass
class NeedleSettings:
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192, 16384, 32768], metadata=dict(
        help="context lengths in tokens (the grid's columns)"))
    depths: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                                metadata=dict(help="needle depths in [0, 1] (the grid's rows)"))
    trials: int = field(default=5, metadata=dict(help="prompts per cell"))
    key_max: int = field(default=50000, metadata=dict(help="keys are drawn uniformly from 1 .. key_max"))
    seed: int = field(default=0, metadata=dict(help="draws the keys"))
    filler: str = field(default=PASSKEY_FILLER, metadata=dict(help="the haystack text, repeated"))
    batch_size: int = field(default=1, metadata=dict(help="prompts per forward pass"))

    def validate(self) -> None:
        if not self.lengths or not self.depths or self.trials < 1 or self.batch_size < 1:
            raise EvalSettingsError(f"needle: lengths ({self.lengths}) and depths ({self.depths}) must be non-empty, "
                                    f"trials ({self.trials}) and batch_size ({self.batch_size}) >= 1")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise EvalSettingsError(f"needle.depths ({self.depths}) must lie in [0, 1]")


@dataclass
class RulerSettings:
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192, 16384, 32768], metadata=dict(
        help="prompt lengths in tokens"))
    tasks: list[str] = field(default_factory=lambda: ["mk_niah", "mv_niah", "vt"], metadata=dict(
        help="tasks to run: mk_niah, mv_niah, vt"))
    trials: int = field(default=10, metadata=dict(help="prompts per task and length"))
    num_keys: int = field(default=4, metadata=dict(help="mk_niah: needles, each with its own key"))
    num_values: int = field(default=4, metadata=dict(help="mv_niah: values hidden for the one key"))
    num_hops: int = field(default=4, metadata=dict(help="vt: assignments after the first (num_hops + 1 variables)"))
    seed: int = field(default=0, metadata=dict(help="draws keys, values, names and depths"))
    filler: str = field(default=PASSKEY_FILLER, metadata=dict(help="the haystack text, repeated"))
    batch_size: int = field(default=1, metadata=dict(help="prompts per forward pass"))

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in RULER_TASKS]
        if unknown:
            raise EvalSettingsError(f"ruler.tasks: unknown {unknown}; choose from {list(RULER_TASKS)}")
        if not self.lengths or not self.tasks or min(self.trials, self.num_keys, self.num_values, self.num_hops,
                                                     self.batch_size) < 1:
            raise EvalSettingsError("ruler: lengths and tasks must be non-empty, trials, num_keys, num_values, "
                                    "num_hops and batch_size >= 1")


@dataclass
class AttentionSettings:
    lengths: list[int] = field(default_factory=lambda: [2048, 8192], metadata=dict(
        help="passkey prompt lengths to look at"))
    trials: int = field(default=4, metadata=dict(help="prompts per length"))
    key_max: int = field(default=50000, metadata=dict(help="keys are drawn uniformly from 1 .. key_max"))
    seed: int = field(default=0, metadata=dict(help="draws keys and depths"))
    filler: str = field(default=PASSKEY_FILLER, metadata=dict(help="the irrelevant text, repeated"))

    def validate(self) -> None:
        if not self.lengths or self.trials < 1:
            raise EvalSettingsError(f"attention: lengths ({self.lengths}) must be non-empty and "
                                    f"trials ({self.trials}) >= 1")


@dataclass
class CompareSettings:
    data: list[str] = field(default_factory=list, metadata=dict(
        help="the text both models read: JSONL or text files (globs allowed; '{stdlib}' = this Python's standard "
             "library) or indexed-dataset prefixes"))
    num_documents: int = field(default=4, metadata=dict(help="documents compared (the first ones)"))
    max_tokens: int = field(default=512, metadata=dict(
        help="tokens per document read in one forward pass, BOS included"))
    json_key: str = field(default="text", metadata=dict(help="the text field of JSONL records"))

    def validate(self) -> None:
        if not self.data:
            raise EvalSettingsError("compare.data is empty: give the text to compare on (--data FILE: JSONL, text "
                                    "files, a glob or an indexed-dataset prefix)")
        if self.num_documents < 1 or self.max_tokens < 2:
            raise EvalSettingsError(f"compare.num_documents ({self.num_documents}) must be >= 1 and max_tokens "
                                    f"({self.max_tokens}) >= 2")
        missing = [source for source in self.data if not perplexity_source_paths(source)]
        if missing:
            raise EvalSettingsError(f"compare.data {missing}: no such file, glob match or indexed dataset "
                                    "(PREFIX.idx/.bin): give JSONL or text files, a glob, or an indexed-dataset prefix")
