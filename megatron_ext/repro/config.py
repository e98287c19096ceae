"""ReproConfig: the YAML of `megatron-ext repro` (examples/reproduction/*.yaml), every default once.

One tree for the study's two tracks. What the tracks set alike is one dataclass each: `Track` (the pretraining
length L, the scale s, the seeds, the methods, and the rules those follow), `Pretrain` (the optimizer of the
pretraining at L), `Extend` (the extension's micro-batches and optimizer) and `Eval` (prompts per forward).
What differs is named in each track's own classes: the perplexity track (`PerplexityTrack`: text, one pretrained
model, every method the same token budget, perplexity + passkey + attention entropy) and the retrieval track
(`RetrievalTrack`: passkey prompts, one pretrained model per seed that must retrieve at L, two step budgets).
`Track.check` is the one validation path of both.

The top level of the YAML is the perplexity track (the first edition's keys, which the results files record)
with what both tracks share (`model`, `data`) and the retrieval track's section (`retrieval`).
"""

import glob
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from megatron_ext.config import check, read_config

TRACKS = ("perplexity", "retrieval")


# --- shared by both tracks --------------------------------------------------------------------


@dataclass
class ReproModel:
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    rope_base: float = 10_000.0  # the pretrained model's RoPE base

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class ReproData:
    seed: int = 0  # corpus draws and tokenizer
    num_documents: int = 4500  # of them, retrieval_fraction are passkey documents, the rest stdlib text
    retrieval_fraction: float = 0.9
    vocab_size: int = 2000
    # passkey documents' filler, in characters: short ones for pretraining (question and key inside one
    # window of base_length tokens), longer ones for the extension (key up to the target length away)
    pretrain_passkey_chars: list[int] = field(default_factory=lambda: [60, 360])
    extension_passkey_chars: list[int] = field(default_factory=lambda: [450, 4500])


@dataclass
class Pretrain:
    """Pretraining at L: `iters` optimizer steps of `global_batch_size` sequences of L tokens."""

    iters: int = 1400
    global_batch_size: int = 32
    micro_batch_size: int = 16
    lr: float = 2.0e-3
    min_lr: float = 2.0e-4
    warmup_iters: int = 30

    def check(self, prefix: str) -> None:
        check(self.iters >= 1, f"{prefix}pretrain.iters ({self.iters}) must be >= 1")
        check(self.global_batch_size % self.micro_batch_size == 0,
              f"{prefix}pretrain.global_batch_size ({self.global_batch_size}) must be a multiple of "
              f"{prefix}pretrain.micro_batch_size ({self.micro_batch_size})")
        check(self.warmup_iters < max(self.iters, 2),
              f"{prefix}pretrain.warmup_iters ({self.warmup_iters}) must be below {prefix}pretrain.iters "
              f"({self.iters})")


@dataclass
class Extend:
    """The extension's micro-batches and optimizer, the same for every method of a track."""

    micro_batch_tokens: int = 4_096
    lr: float = 5.0e-4
    min_lr: float = 5.0e-5
    warmup_iters: int = 5

    def check(self, track: "Track", stages: int) -> None:
        """The track's own rules; `stages`: the most stages a selected method trains in."""
        raise NotImplementedError


@dataclass
class Eval:
    batch_size: int = 10  # prompts per forward pass

    def check(self, track: "Track") -> None:
        check(self.batch_size >= 1, f"{track.SECTION}eval.batch_size ({self.batch_size}) must be >= 1")


@dataclass
class Track:
    """One track of the study: pretrain at L = base_length, extend to scale * L with every selected method."""

    base_length: int = 256  # L: the pretraining length
    scale: int = 8  # extend to scale * L
    seeds: list[int] = field(default_factory=lambda: [1])
    methods: list[str] | None = None  # None: all, in report order
    # and each track's own `pretrain` (a Pretrain), `extend` (an Extend) and `eval` (an Eval)

    SECTION: ClassVar[str] = ""  # where its keys are in the YAML (errors name them so)
    MIN_BASE_LENGTH: ClassVar[tuple[int, str]] = (16, "")  # and why

    @property
    def target_length(self) -> int:
        return self.base_length * self.scale

    def eval_lengths(self) -> list[int]:
        raise NotImplementedError

    def method_table(self, model: ReproModel) -> dict:
        """Every method, by name, in report order, for this track's lengths and `model`."""
        from megatron_ext.repro.methods import build_methods

        return build_methods(base_length=self.base_length, scale=self.scale, head_dim=model.head_dim,
                             base=model.rope_base)

    def selected_methods(self, model: ReproModel) -> list:
        table = self.method_table(model)
        return [table[name] for name in (self.methods or list(table))]

    def check(self, model: ReproModel) -> None:
        """Errors name the key, the value and the fix; cheap, runs before any work. `model` is checked already."""
        p, (shortest, why) = self.SECTION, self.MIN_BASE_LENGTH
        check(self.base_length >= shortest and self.base_length % 16 == 0,
              f"{p}base_length ({self.base_length}) must be a multiple of 16 and >= {shortest}{why}, e.g. "
              f"{type(self).base_length}")
        check(self.scale >= 2 and self.scale & (self.scale - 1) == 0,
              f"{p}scale ({self.scale}) must be a power of two >= 2 (the ABF ladder doubles), e.g. 8")
        check(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds),
              f"{p}seeds ({self.seeds}) must be distinct and non-empty, e.g. [1, 2, 3]")
        known = list(self.method_table(model))
        for name in self.methods or ():
            check(name in known, f"{p}methods: unknown {name!r}; choose from {known}")
        self.pretrain.check(p)
        self.extend.check(self, max(len(method.stages) for method in self.selected_methods(model)))
        self.eval.check(self)
        self.check_own()

    def check_own(self) -> None:
        """The rules of the track's own settings."""


# --- the perplexity track: text at L, one pretrained model, every method one token budget -------------------


@dataclass
class TextPretrain(Pretrain):
    seed: int = 1234


@dataclass
class TextExtend(Extend):
    iters: int = 30  # every method takes as many optimizer steps ...
    tokens_per_iter: int = 16_384  # ... of as many tokens: the same token budget

    def check(self, track, stages):
        target = track.target_length
        check(self.tokens_per_iter % target == 0,
              f"extend.tokens_per_iter ({self.tokens_per_iter}) must be a multiple of the target length "
              f"({target}) so every method's batch holds whole sequences")
        check(self.micro_batch_tokens % target == 0 and self.tokens_per_iter % self.micro_batch_tokens == 0,
              f"extend.micro_batch_tokens ({self.micro_batch_tokens}) must be a multiple of the target length "
              f"({target}) and divide extend.tokens_per_iter ({self.tokens_per_iter})")
        check(self.iters >= stages and self.warmup_iters < self.iters,
              f"extend.iters ({self.iters}) must give each of up to {stages} stages at least one step and exceed "
              f"extend.warmup_iters ({self.warmup_iters}): raise extend.iters (a stage warms up for at most its "
              "length minus one step)")


@dataclass
class TextEval(Eval):
    length_multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # of base_length
    passkey_trials: int = 50
    perplexity_documents: int = 12  # standard-library test modules, each cut to the longest length
    perplexity_data: list[str] = field(default_factory=lambda: ["{stdlib}/test/test_*.py"])
    attention_trials: int = 4  # passkey prompts at the longest length for the attention entropy

    def check(self, track):
        super().check(track)
        check(self.passkey_trials >= 1 and self.attention_trials >= 1 and self.perplexity_documents >= 1,
              "eval: passkey_trials, attention_trials and perplexity_documents must be >= 1")
        for source in self.perplexity_data:
            path = source.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
            check(bool(glob.glob(path)) or Path(path + ".idx").is_file(),
                  f"eval.perplexity_data: {source!r} ({path}) matches no file; give JSONL/text files, a glob or an "
                  "indexed-dataset prefix (a Python without its test suite has no test/test_*.py: try '{stdlib}/*.py')")
        check(bool(self.length_multiples) and all(x >= 1 for x in self.length_multiples),
              f"eval.length_multiples ({self.length_multiples}) must be a non-empty list of integers >= 1")


@dataclass
class PerplexityTrack(Track):
    # seeds: extension seeds (data order, PoSE draws); every seed extends the same pretrained model
    pretrain: TextPretrain = field(default_factory=TextPretrain)
    extend: TextExtend = field(default_factory=TextExtend)
    eval: TextEval = field(default_factory=TextEval)

    def eval_lengths(self) -> list[int]:
        return [self.base_length * m for m in self.eval.length_multiples]

    def check_own(self):
        check(self.methods is None or "original" in self.methods,
              "methods must include 'original' (the floor every extension is compared with)")


# --- the retrieval track: passkey prompts, one pretrained model per seed, two step budgets ------------------


@dataclass
class RetrievalPretrain(Pretrain):
    iters: int = 1200
    micro_batch_size: int = 32
    # a seed below min_accuracy after `iters` continues at min_lr for extra_iters, checked again, at most
    # max_extra_rounds times (the seed's pretraining ends at its first passing check)
    extra_iters: int = 300
    max_extra_rounds: int = 2

    def check(self, prefix):
        super().check(prefix)
        check(self.extra_iters >= 2 and self.max_extra_rounds >= 0,
              f"{prefix}pretrain: extra_iters ({self.extra_iters}) >= 2 and max_extra_rounds "
              f"({self.max_extra_rounds}) >= 0")


@dataclass
class RetrievalExtend(Extend):
    micro_batch_tokens: int = 8_192
    lr: float = 3.0e-4
    min_lr: float = 3.0e-4  # constant after warm-up
    # optimizer steps per budget: a small one (speed of adaptation) and a large one (the ceiling)
    budgets: dict = field(default_factory=lambda: {"small": 10, "large": 40})
    sequences_per_iter: int = 8  # prompts per step, at the stage's length (PoSE: at base_length)
    equal_tokens: bool = True  # PoSE-family rows at the largest budget's tokens (scale x its steps)

    def check(self, track, stages):
        check(bool(self.budgets) and all(isinstance(v, int) and v >= stages for v in self.budgets.values())
              and not any(name.endswith("_equal_tokens") or name == "none" for name in self.budgets),
              f"retrieval.extend.budgets ({self.budgets}) must map names (not 'none' nor '*_equal_tokens') to "
              f"optimizer steps >= {stages} (the most stages of a selected method), e.g. {{small: 10, large: 40}}")
        check(self.sequences_per_iter >= 1 and self.micro_batch_tokens >= track.target_length,
              f"retrieval.extend: sequences_per_iter ({self.sequences_per_iter}) >= 1 and micro_batch_tokens "
              f"({self.micro_batch_tokens}) >= the target length ({track.target_length})")
        check(0 <= self.warmup_iters < min(self.budgets.values()),
              f"retrieval.extend.warmup_iters ({self.warmup_iters}) must be below the smallest budget")


@dataclass
class RetrievalEval(Eval):
    batch_size: int = 16
    trials: int = 100  # passkey prompts per length ...
    longest_trials: int = 256  # ... and at the longest length
    depth_bins: int = 5  # rows of the needle heatmap (depth x length), from the same prompts
    key_max: int = 50_000
    bootstrap: int = 2_000  # resamples for the 95% intervals

    def check(self, track):
        super().check(track)
        check(self.trials >= 1 and self.longest_trials >= 1 and self.depth_bins >= 1 and self.bootstrap >= 100,
              "retrieval.eval: trials, longest_trials, depth_bins >= 1 and bootstrap >= 100")


@dataclass
class RetrievalTrack(Track):
    base_length: int = 128
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])  # pretraining seeds (init and data order)
    # seeds whose pretraining may miss min_accuracy (after its extra rounds): each is reported and left out; one
    # more stops the run. The extension study is about models that retrieve at L.
    max_failed_seeds: int = 0
    min_accuracy: float = 0.95  # passkey exact match at L the pretrained model must reach
    check_trials: int = 200
    pretrain: RetrievalPretrain = field(default_factory=RetrievalPretrain)
    extend: RetrievalExtend = field(default_factory=RetrievalExtend)
    eval: RetrievalEval = field(default_factory=RetrievalEval)

    SECTION = "retrieval."
    MIN_BASE_LENGTH = (96, " (the passkey template alone takes about 70 tokens)")

    def eval_lengths(self) -> list[int]:
        return [self.base_length * 2 ** i for i in range(self.scale.bit_length())]

    def trials_at(self, length: int) -> int:
        return self.eval.longest_trials if length == self.target_length else self.eval.trials

    def check_own(self):
        check(0 <= self.max_failed_seeds < len(self.seeds),
              f"retrieval.max_failed_seeds ({self.max_failed_seeds}) must lie in [0, number of seeds - 1]")
        check(0.0 <= self.min_accuracy <= 1.0,
              f"retrieval.min_accuracy ({self.min_accuracy}) must lie in [0, 1], e.g. 0.95")
        check(self.check_trials >= 1, f"retrieval.check_trials ({self.check_trials}) must be >= 1")


# --- the whole study -------------------------------------------------------------------------


@dataclass
class ReproConfig(PerplexityTrack):
    """The perplexity track's settings at the top level, what both tracks share, and the retrieval track."""

    output_dir: str = "runs/repro_cpu_8x"
    # perplexity: pretrain on text at base_length, extend, perplexity + passkey; retrieval: see `retrieval`
    tracks: list[str] = field(default_factory=lambda: ["perplexity"])
    model: ReproModel = field(default_factory=ReproModel)
    data: ReproData = field(default_factory=ReproData)
    retrieval: RetrievalTrack = field(default_factory=RetrievalTrack)

    @property
    def head_dim(self) -> int:
        return self.model.head_dim

    def track(self, name: str) -> Track:
        return {"perplexity": self, "retrieval": self.retrieval}[name]

    def validate(self) -> None:
        """The shared sections, then every track the study runs; errors name the key, the value and the fix."""
        check(bool(self.tracks) and set(self.tracks) <= set(TRACKS) and len(set(self.tracks)) == len(self.tracks),
              f"tracks ({self.tracks}) must be distinct names from {list(TRACKS)}, e.g. [perplexity, retrieval]")
        m = self.model
        check(m.hidden_size % m.num_attention_heads == 0 and m.head_dim % 2 == 0 and m.head_dim >= 8,
              f"model.hidden_size ({m.hidden_size}) / model.num_attention_heads ({m.num_attention_heads}) must be "
              "an even head dim >= 8")
        for key in ("pretrain_passkey_chars", "extension_passkey_chars"):
            value = getattr(self.data, key)
            check(len(value) == 2 and 0 < value[0] <= value[1], f"data.{key} ({value}) must be [shortest, longest]")
        for name in self.tracks:
            self.track(name).check(self.model)


def load_repro_config(path, overrides: list[str] = ()) -> ReproConfig:
    config = read_config(path, ReproConfig, overrides, example="examples/reproduction/cpu_8x.yaml")
    config.validate()
    return config


# A few steps of everything on a very small model: the pipeline end to end in about two minutes (the tests).
SMOKE_OVERRIDES = [
    "tracks=[perplexity,retrieval]",
    "seeds=[1]",
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "data.num_documents=120", "data.pretrain_passkey_chars=[40,120]", "data.extension_passkey_chars=[120,600]",
    "data.vocab_size=400", "pretrain.iters=4", "pretrain.global_batch_size=4", "pretrain.micro_batch_size=4",
    "pretrain.warmup_iters=1", "extend.iters=3", "extend.tokens_per_iter=2048", "extend.micro_batch_tokens=2048",
    "extend.warmup_iters=1", "eval.passkey_trials=2", "eval.perplexity_documents=1", "eval.attention_trials=1",
    "eval.batch_size=2", "eval.perplexity_data=['{stdlib}/*.py']",
    # the retrieval track at its smallest: L = 192 -> 384 (the 400-token vocabulary's template takes ~160), one seed, the check reported but not enforced
    "retrieval.base_length=192", "retrieval.scale=2", "retrieval.seeds=[1]", "retrieval.min_accuracy=0",
    "retrieval.check_trials=4", "retrieval.pretrain.iters=3", "retrieval.pretrain.global_batch_size=4",
    "retrieval.pretrain.micro_batch_size=4", "retrieval.pretrain.warmup_iters=1",
    "retrieval.extend.budgets={small: 2, large: 3}", "retrieval.extend.sequences_per_iter=2",
    "retrieval.extend.warmup_iters=1", "retrieval.eval.trials=6", "retrieval.eval.longest_trials=8",
    "retrieval.eval.batch_size=4", "retrieval.eval.bootstrap=200",
]
