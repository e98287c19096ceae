"""ReproConfig: the YAML of `megatron-ext repro` (examples/reproduction/cpu_8x.yaml), every default once."""

import glob
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ext.config import ConfigError, read_config
from megatron_ext.repro.retrieval import RetrievalTrack, validate_track

TRACKS = ("perplexity", "retrieval")


@dataclass
class ReproModel:
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    rope_base: float = 10_000.0  # the pretrained model's RoPE base


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
class ReproPretrain:
    iters: int = 1400
    global_batch_size: int = 32  # sequences of base_length tokens
    micro_batch_size: int = 16
    lr: float = 2.0e-3
    min_lr: float = 2.0e-4
    warmup_iters: int = 30
    seed: int = 1234


@dataclass
class ReproExtend:
    iters: int = 30  # every method takes as many optimizer steps ...
    tokens_per_iter: int = 16_384  # ... of as many tokens: the same token budget
    micro_batch_tokens: int = 4_096
    lr: float = 5.0e-4
    min_lr: float = 5.0e-5
    warmup_iters: int = 5


@dataclass
class ReproEval:
    length_multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # of base_length
    passkey_trials: int = 50
    perplexity_documents: int = 12  # standard-library test modules, each cut to the longest length
    perplexity_data: list[str] = field(default_factory=lambda: ["{stdlib}/test/test_*.py"])
    attention_trials: int = 4  # passkey prompts at the longest length for the attention entropy
    batch_size: int = 10


@dataclass
class ReproConfig:
    output_dir: str = "runs/repro_cpu_8x"
    # perplexity: pretrain on text at base_length, extend, perplexity + passkey; retrieval: see `retrieval`
    tracks: list[str] = field(default_factory=lambda: ["perplexity"])
    seeds: list[int] = field(default_factory=lambda: [1])  # extension seeds (data order, PoSE draws)
    base_length: int = 256  # L: the pretraining length
    scale: int = 8  # extend to scale * L
    methods: list[str] | None = None  # None: all, in report order
    model: ReproModel = field(default_factory=ReproModel)
    data: ReproData = field(default_factory=ReproData)
    pretrain: ReproPretrain = field(default_factory=ReproPretrain)
    extend: ReproExtend = field(default_factory=ReproExtend)
    eval: ReproEval = field(default_factory=ReproEval)
    retrieval: RetrievalTrack = field(default_factory=RetrievalTrack)

    @property
    def target_length(self) -> int:
        return self.base_length * self.scale

    @property
    def head_dim(self) -> int:
        return self.model.hidden_size // self.model.num_attention_heads

    def eval_lengths(self) -> list[int]:
        return [self.base_length * m for m in self.eval.length_multiples]

    def method_table(self) -> dict:
        from megatron_ext.repro.methods import build_methods

        return build_methods(base_length=self.base_length, scale=self.scale, head_dim=self.head_dim,
                             base=self.model.rope_base)

    def selected_methods(self) -> list:
        table = self.method_table()
        return [table[name] for name in (self.methods or list(table))]

    def validate(self) -> None:
        """Errors name the key, the value and the fix; cheap, runs before any work."""
        def check(ok, message):
            if not ok:
                raise ConfigError(message)

        check(bool(self.tracks) and set(self.tracks) <= set(TRACKS) and len(set(self.tracks)) == len(self.tracks),
              f"tracks ({self.tracks}) must be distinct names from {list(TRACKS)}, e.g. [perplexity, retrieval]")
        if "retrieval" in self.tracks:
            validate_track(self.retrieval, list(self.method_table()))
        check(bool(self.seeds), "seeds is empty: give at least one, e.g. seeds: [1]")
        check(len(set(self.seeds)) == len(self.seeds), f"seeds ({self.seeds}) repeat: give distinct seeds")
        check(self.base_length >= 16 and self.base_length % 16 == 0,
              f"base_length ({self.base_length}) must be a multiple of 16, e.g. 256")
        check(self.scale >= 2 and self.scale & (self.scale - 1) == 0,
              f"scale ({self.scale}) must be a power of two >= 2 (the ABF ladder doubles), e.g. 8")
        m = self.model
        check(m.hidden_size % m.num_attention_heads == 0 and self.head_dim % 2 == 0 and self.head_dim >= 8,
              f"model.hidden_size ({m.hidden_size}) / model.num_attention_heads ({m.num_attention_heads}) must be "
              "an even head dim >= 8")
        known = list(self.method_table())
        for name in self.methods or ():
            check(name in known, f"methods: unknown {name!r}; choose from {known}")
        check(self.methods is None or "original" in self.methods,
              "methods must include 'original' (the floor every extension is compared with)")
        for key in ("pretrain_passkey_chars", "extension_passkey_chars"):
            value = getattr(self.data, key)
            check(len(value) == 2 and 0 < value[0] <= value[1], f"data.{key} ({value}) must be [shortest, longest]")
        check(self.pretrain.global_batch_size % self.pretrain.micro_batch_size == 0,
              f"pretrain.global_batch_size ({self.pretrain.global_batch_size}) must be a multiple of "
              f"pretrain.micro_batch_size ({self.pretrain.micro_batch_size})")
        e = self.extend
        check(e.tokens_per_iter % self.target_length == 0,
              f"extend.tokens_per_iter ({e.tokens_per_iter}) must be a multiple of the target length "
              f"({self.target_length}) so every method's batch holds whole sequences")
        check(e.micro_batch_tokens % self.target_length == 0 and e.tokens_per_iter % e.micro_batch_tokens == 0,
              f"extend.micro_batch_tokens ({e.micro_batch_tokens}) must be a multiple of the target length "
              f"({self.target_length}) and divide extend.tokens_per_iter ({e.tokens_per_iter})")
        stages = max(len(method.stages) for method in self.selected_methods())
        check(e.iters >= stages and e.warmup_iters < e.iters,
              f"extend.iters ({e.iters}) must give each of up to {stages} stages at least one step and exceed "
              f"extend.warmup_iters ({e.warmup_iters}): raise extend.iters (a stage warms up for at most its "
              "length minus one step)")
        check(self.eval.passkey_trials >= 1 and self.eval.attention_trials >= 1 and self.eval.perplexity_documents >= 1,
              "eval: passkey_trials, attention_trials and perplexity_documents must be >= 1")
        for source in self.eval.perplexity_data:
            path = source.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
            check(bool(glob.glob(path)) or Path(path + ".idx").is_file(),
                  f"eval.perplexity_data: {source!r} ({path}) matches no file; give JSONL/text files, a glob or an "
                  "indexed-dataset prefix (a Python without its test suite has no test/test_*.py: try '{stdlib}/*.py')")
        check(bool(self.eval.length_multiples) and all(x >= 1 for x in self.eval.length_multiples),
              f"eval.length_multiples ({self.eval.length_multiples}) must be a non-empty list of integers >= 1")


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
