"""The training configuration: YAML -> validated dataclasses. Every default lives here, once.

Imports no megatron and nothing of the loop: configs are checked before any process group, model or
data exists, and the planner, converters and evaluation read the same dataclasses.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from megatron_ext.config.layout import config_layout_problems
from megatron_ext.config.limits import validate_sizes, validate_tiny_vocabulary
from megatron_ext.config.reader import ConfigError, check, read_config
from megatron_ext.config.types import FilePath
from megatron_ext.rope.config import RopeConfig


# What a resume may change. Each section says it: ON_RESUME = FIXED (every field defines the model, its tokens,
# the positions it sees or the order of its data) or FREE (none does), or names its FIXED_ON_RESUME fields and
# its FREE_ON_RESUME ones, every field in exactly one (tests/test_start.py checks that each field has a class);
# megatron_ext.training.start reads them.
FIXED, FREE = "fixed", "free"

MAX_LR = 1.0  # optimizer.lr above this is a typo (validate says why)


@dataclass
class ModelConfig:
    ON_RESUME: ClassVar[str] = FIXED
    # the fields a checkpoint's weights fix (continual pretraining takes them from checkpoint.pretrained and refuses
    # a contradiction); the others are how this run trains it. tests/test_start.py checks every field is one of them.
    ARCHITECTURE: ClassVar[tuple[str, ...]] = (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size",
        "normalization", "norm_epsilon", "swiglu", "tie_embeddings", "qkv_bias")
    TRAINING: ClassVar[tuple[str, ...]] = ("seq_length", "init_method_std", "attention_dropout", "hidden_dropout")

    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None: one KV head per query head (no GQA)
    ffn_hidden_size: int | None = None  # None: Llama's SwiGLU size, 8/3 * hidden rounded up to 64
    seq_length: int = 256  # the trained window (L_c under PoSE)
    vocab_size: int | None = None  # None: the tokenizer's
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = True
    tie_embeddings: bool = False
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return -(-int(8 * self.hidden_size / 3) // 64) * 64

    def architecture(self) -> dict:
        """ARCHITECTURE's fields with their effective values (defaults of None resolved), as checkpoints compare."""
        resolved = {"ffn_hidden_size": self.ffn_size,
                    "num_query_groups": self.num_query_groups or self.num_attention_heads}
        return {name: resolved.get(name, getattr(self, name)) for name in self.ARCHITECTURE}


@dataclass
class PoseConfig:
    ON_RESUME: ClassVar[str] = FIXED

    enabled: bool = False
    target_length: int = 0  # L_t: position ids are drawn from [0, target_length)
    num_chunks: int = 2
    variant: str = "code"  # "code" (released PoSE code) or "paper"
    mask_chunk_boundary: bool = False


@dataclass
class DataConfig:
    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = (
        "train_data", "train_data_weights", "tokenizer", "tokenizer_type", "tokenizer_model", "document_mask",
        "mask_eod_loss", "add_extra_token", "answer_only_loss", "tiny_corpus", "tiny_corpus_documents",
        "tiny_corpus_passkey_prompts", "tokenizer_vocab_size", "upsample",
        "split")  # which documents train
    FREE_ON_RESUME: ClassVar[tuple[str, ...]] = ("cache_dir", "valid_data")

    train_data: list[FilePath] = field(default_factory=list)  # indexed-dataset prefixes ({prefix}.bin/.idx)
    train_data_weights: list[float] | None = None
    tokenizer: FilePath | None = None  # a sentencepiece .model, a Hugging Face tokenizer directory, a tiktoken BPE file
    tokenizer_type: str | None = None  # sentencepiece | huggingface | tiktoken; None: detected from the files
    tokenizer_model: FilePath | None = None  # a sentencepiece .model (the older name of `tokenizer` for that kind)
    document_mask: bool = False  # packed documents: positions restart at each document, attention stays inside it
    mask_eod_loss: bool = False  # no loss at EOD tokens (megatron's eod_mask_loss: an EOD predicts the next doc)
    # megatron's add_extra_token_to_sequence: false reads seq_length tokens per sample (no overlap, last position
    # unscored), so documents of exactly seq_length tokens come one per sample (the retrieval prompts)
    add_extra_token: bool = True
    answer_only_loss: bool = False  # loss only where {prefix}_loss_mask.bin/.idx marks a target (answer tokens)
    tiny_corpus: bool = False  # build the offline tiny corpus + tokenizer + dataset under cache_dir
    tiny_corpus_documents: int = 400
    # > 0: with tiny_corpus, train on this many passkey prompts of seq_length tokens (the evaluation's template,
    # loss on the key: megatron_ext.data.passkey_data) instead of its text, which then only trains the tokenizer
    tiny_corpus_passkey_prompts: int = 0
    tokenizer_vocab_size: int = 2000  # for the tokenizer trained on the tiny corpus
    cache_dir: FilePath = "runs/cache"
    upsample: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> {min_tokens, factor}
    # validation (training.eval_interval): its own prefixes, or megatron's split string over the training data's
    # documents ("train,valid[,test]" weights, e.g. "98,2,0"; each source split alike)
    valid_data: list[FilePath] = field(default_factory=list)
    split: str | None = None

    def tokenizer_source(self) -> tuple[str, str | None, str | None]:
        """(the setting that names the tokenizer, its path or None, its kind or None: detect it from the files)."""
        if self.tokenizer_model is not None:
            return "data.tokenizer_model", self.tokenizer_model, self.tokenizer_type or "sentencepiece"
        return "data.tokenizer", self.tokenizer, self.tokenizer_type


@dataclass
class ParallelConfig:
    ON_RESUME: ClassVar[str] = FREE  # checkpoints reshard to any layout

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False  # reduce gradient buckets during the backward instead of after it
    overlap_param_gather: bool = False  # distributed optimizer: all-gather updated weights during the next forward
    ddp_bucket_size: int | None = None  # parameters per gradient bucket; None: megatron's max(40M, 1M x DP)
    cp_comm_type: str = "p2p"  # context-parallel attention exchange: p2p | a2a | allgather | a2a+p2p
    hierarchical_context_parallel_sizes: list[int] | None = None  # a2a+p2p: [a2a group, p2p ring], product = CP
    # interleaved 1F1B: each PP rank holds this many model chunks of num_layers / (PP x VPP) layers; None: off
    virtual_pipeline_model_parallel_size: int | None = None
    # Megatron-LM's name: a collective (or the rendezvous) that waits longer than this ends the run with an error
    # naming the rank that did not answer (a stopped, hung or dead node), instead of waiting for ever;
    # fractions allowed (0.1 = 6 s, for tests)
    distributed_timeout_minutes: float = 10.0


@dataclass
class TrainingConfig:
    """Batch, precision and run-length settings.

    FP8 (`fp8`: hybrid | e4m3, Transformer Engine only): megatron-core wraps each transformer layer in TE's
    fp8_autocast, which quantizes the inputs of TE's GEMM modules (linear_qkv, linear_proj, fc1, fc2) and
    nothing else; their outputs come back in the activation dtype. The HARPE/PoSE rotation runs on the
    bf16 q/k that linear_qkv returns, with cos/sin from fp32 angles (PositionIdSelfAttention.
    get_query_key_value_tensors), outside every GEMM, and attention stays bf16 (megatron's
    fp8_dot_product_attention / fp8_multi_head_attention stay off; with them linear_qkv would hand FP8 q/k
    to the rotation). So FP8 changes the projections' precision, never the positions' or the bases'.
    """

    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = (
        "seed", "global_batch_size", "rampup_batch_size",  # the data position
        "precision")
    FREE_ON_RESUME: ClassVar[tuple[str, ...]] = (
        "train_iters", "micro_batch_size", "recompute", "exit_signal_handler", "exit_interval", "nonfinite",
        "nonfinite_patience", "fp8", "fp8_recipe", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_margin",
        "eval_interval", "eval_iters")

    train_iters: int = 100
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seed: int = 1234
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; or "bf16" / "fp32"
    recompute: str = "none"  # none | selective | full
    exit_signal_handler: bool = True  # SIGTERM/SIGUSR1: save a checkpoint, then exit (SLURM)
    exit_interval: int | None = None  # save and stop after every this many iterations of a run
    nonfinite: str = "stop"  # a NaN/inf loss or grad norm: "stop" at once, or "skip" that step (no update)
    nonfinite_patience: int = 3  # with "skip": this many consecutive non-finite iterations, then stop
    fp8: str | bool = "off"  # off | hybrid (e4m3 forward, e5m2 gradients) | e4m3: FP8 GEMMs (Transformer Engine);
    # YAML reads a bare `off` as false, which means off too
    fp8_recipe: str = "delayed"  # delayed | tensorwise (current scaling, TE >= 2.2) | mxfp8 (Blackwell)
    fp8_amax_history_len: int = 1  # delayed recipe: amax history window (megatron-core's default)
    fp8_amax_compute_algo: str = "most_recent"  # delayed recipe: most_recent | max over the history
    fp8_margin: int = 0  # delayed recipe: scale = 2^-margin x the largest value FP8 holds / amax
    eval_interval: int | None = None  # validation loss every this many iterations (and after the last); None: off
    eval_iters: int = 10  # validation iterations of global_batch_size samples each (the same samples every time)
    # megatron-LM's [start, increment, samples]: the global batch grows from start by increment over that many
    # samples, up to global_batch_size; iterations count steps of whatever batch size (megatron_ext/training/batches.py)
    rampup_batch_size: list[int] | None = None

    @property
    def fp8_format(self) -> str | None:
        """megatron's TransformerConfig.fp8: None when off, else hybrid or e4m3."""
        return None if self.fp8 in ("off", False) else self.fp8


@dataclass
class OptimizerConfig:
    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = ("adam_beta1", "adam_beta2", "adam_eps")
    FREE_ON_RESUME: ClassVar[tuple[str, ...]] = (
        "lr", "min_lr", "weight_decay", "clip_grad", "warmup_iters", "lr_decay_style", "lr_decay_iters",
        "lr_wsd_decay_iters", "lr_wsd_decay_style")

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_iters: int = 10
    lr_decay_style: str = "cosine"  # cosine | linear | constant | WSD (warmup-stable-decay)
    lr_decay_iters: int | None = None  # None: train_iters
    lr_wsd_decay_iters: int | None = None  # WSD: the last this many iterations of lr_decay_iters anneal to min_lr
    lr_wsd_decay_style: str = "exponential"  # WSD's anneal: exponential | linear | cosine | minus_sqrt (megatron-LM's)


@dataclass
class CheckpointConfig:
    ON_RESUME: ClassVar[str] = FREE

    dir: FilePath = "runs/checkpoints"
    save_interval: int = 50
    keep_last: int | None = 2
    resume: FilePath = "auto"  # auto (newest complete one, if any) | none | a checkpoint directory
    pretrained: FilePath | None = None  # weights to start from when there is nothing to resume (e.g. a converted HF model)
    from_scratch: bool = False  # a model of >= 1B parameters starts from random weights only when this says so
    load_optimizer: bool = True
    verify: bool = True  # check every file against the checkpoint's manifest (size, CRC-32) before loading
    async_save: bool = False  # write checkpoints on a background thread while training goes on (host copy of the state)


@dataclass
class LoggingConfig:
    ON_RESUME: ClassVar[str] = FREE

    log_interval: int = 1
    tensorboard_dir: FilePath | None = "runs/tensorboard"
    metrics_file: FilePath | None = "runs/metrics.jsonl"  # one JSON line per iteration (appended on resume)
    wandb_project: str | None = None
    progress_bar: bool = True
    gpu_peak_tflops: float | None = None  # for MFU; None: looked up from the device name
    profile: dict | None = None  # {start_iter, end_iter, ranks}: a torch.profiler trace of those iterations; None: off
    profile_dir: FilePath = "runs/profile"  # where profile traces go (Chrome trace JSON, read by TensorBoard's plugin too)

    def profile_window(self) -> "ProfileWindow | None":
        """`profile` checked and typed (None when profiling is off)."""
        if self.profile is None:
            return None
        unknown = sorted(set(self.profile) - {"start_iter", "end_iter", "ranks"})
        check(not unknown, f"logging.profile: unknown key(s) {', '.join(map(str, unknown))}: give start_iter, "
                           "end_iter and optionally ranks")
        start, end = self.profile.get("start_iter"), self.profile.get("end_iter")
        ranks = self.profile.get("ranks")
        check(_is_int(start) and _is_int(end) and 1 <= start <= end,
              f"logging.profile: start_iter ({start}) and end_iter ({end}) must be iterations with "
              "1 <= start_iter <= end_iter, e.g. {start_iter: 5, end_iter: 7}")
        check(ranks is None or (isinstance(ranks, list) and ranks and all(_is_int(r) and r >= 0 for r in ranks)),
              f"logging.profile.ranks ({ranks}) must be a list of ranks, e.g. [0], or left out for every rank")
        return ProfileWindow(start, end, tuple(ranks) if ranks is not None else None)


@dataclass(frozen=True)
class ProfileWindow:
    """The iterations (inclusive) and ranks (None: all) that `logging.profile` traces."""

    start_iter: int
    end_iter: int
    ranks: tuple[int, ...] | None = None

    def covers(self, iteration: int, rank: int) -> bool:
        return self.start_iter <= iteration <= self.end_iter and (self.ranks is None or rank in self.ranks)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    pose: PoseConfig = field(default_factory=PoseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fixed_on_resume() -> tuple[str, ...]:
    """The settings a resumed run must share with its checkpoint, read from each section's class: a section name
    where the whole section is fixed, else `section.field`."""
    keys = []
    for section in dataclasses.fields(TrainConfig):
        kind = section.default_factory
        if getattr(kind, "ON_RESUME", None) == FIXED:
            keys.append(section.name)
        else:
            keys += [f"{section.name}.{name}" for name in getattr(kind, "FIXED_ON_RESUME", ())]
    return tuple(keys)


CHOICES = {
    "model.normalization": ("RMSNorm", "LayerNorm"),
    "pose.variant": ("code", "paper"),
    "data.tokenizer_type": (None, "sentencepiece", "huggingface", "tiktoken"),
    "training.precision": ("auto", "bf16", "fp32"),
    "training.recompute": ("none", "selective", "full"),
    "training.nonfinite": ("stop", "skip"),
    "parallel.cp_comm_type": ("p2p", "a2a", "allgather", "a2a+p2p"),
    "training.fp8": ("off", False, "hybrid", "e4m3"),
    "training.fp8_recipe": ("delayed", "tensorwise", "mxfp8"),
    "training.fp8_amax_compute_algo": ("most_recent", "max"),
    "optimizer.lr_decay_style": ("cosine", "linear", "constant", "WSD"),
    "optimizer.lr_wsd_decay_style": ("exponential", "linear", "cosine", "minus_sqrt"),
}


def load_config(path: str | Path, overrides: list[str] = (), *, check_files: bool = True) -> TrainConfig:
    """Read a YAML file, apply `key.sub=value` overrides, build and validate the config.

    check_files=False skips the data/tokenizer file checks (planning for a cluster elsewhere)."""
    config = read_config(path, TrainConfig, overrides, example="examples/configs/*.yaml")
    validate(config, check_files=check_files)
    return config


def validate(c: TrainConfig, *, check_files: bool = True) -> None:
    """Cross-field checks; each message names the key, the value and the fix."""
    m, p, t, o, pose = c.model, c.parallel, c.training, c.optimizer, c.pose
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(c, section), name)
        check(value in allowed, f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
    for key in ("model.num_layers", "model.hidden_size", "model.num_attention_heads", "model.seq_length",
                "training.train_iters", "training.micro_batch_size", "training.global_batch_size",
                "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
                "parallel.context_parallel_size", "checkpoint.save_interval", "logging.log_interval"):
        section, name = key.split(".")
        value = getattr(getattr(c, section), name)
        check(value >= 1, f"{key}: {value} must be >= 1")
    validate_sizes(c)  # every size and count in its range (config/limits.py), before any arithmetic on them
    groups = m.num_query_groups or m.num_attention_heads
    check(m.hidden_size % m.num_attention_heads == 0,
           f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads ({m.num_attention_heads})")
    check(m.num_attention_heads % groups == 0,
           f"model.num_query_groups ({groups}) must divide model.num_attention_heads ({m.num_attention_heads})")
    layout = config_layout_problems(c)  # the planner's rules (config/layout.py); `train` checks its ranks too
    check(not layout, "; ".join(layout))
    check(not p.sequence_parallel or p.tensor_model_parallel_size > 1,
           "parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1: set it to false")
    check(0 < p.distributed_timeout_minutes < math.inf, f"parallel.distributed_timeout_minutes "
          f"({p.distributed_timeout_minutes}) must be > 0 minutes (Megatron-LM's default: 10)")
    _validate_numbers(c)
    _validate_overlap(p)
    _validate_context_parallel(c)
    _validate_fp8(t)
    _validate_schedule(c)
    _validate_validation(c, check_files)
    c.logging.profile_window()
    decay_iters = o.lr_decay_iters or t.train_iters
    check(0 <= o.warmup_iters < decay_iters,
           f"optimizer.warmup_iters ({o.warmup_iters}) must be in [0, {decay_iters}) (fewer than optimizer.lr_decay_iters, "
           "default training.train_iters): megatron's scheduler needs at least one decay step after warmup")
    check(not (c.checkpoint.from_scratch and c.checkpoint.pretrained),
          "checkpoint.from_scratch: true and checkpoint.pretrained both set: keep the one you mean")
    check(c.checkpoint.keep_last is None or c.checkpoint.keep_last >= 1,
           f"checkpoint.keep_last ({c.checkpoint.keep_last}) must be >= 1, or null to keep all")
    if pose.enabled:
        check(pose.target_length >= m.seq_length,
               f"pose.target_length ({pose.target_length}) must be >= model.seq_length ({m.seq_length}): "
               "PoSE draws ids for a short window from a longer target range")
        check(pose.variant != "code" or pose.num_chunks == 2,
               f"pose.num_chunks ({pose.num_chunks}): the 'code' variant uses 2 chunks; use variant 'paper' for more")
    check(bool(c.data.train_data) != c.data.tiny_corpus,
           "data: set exactly one of data.train_data (indexed-dataset prefixes) or data.tiny_corpus: true")
    prompts = c.data.tiny_corpus_passkey_prompts
    check(not (c.data.answer_only_loss and c.data.tiny_corpus and not prompts),
          "data.answer_only_loss needs data.train_data with loss-mask sidecars ({prefix}_loss_mask.bin/.idx) or "
          "data.tiny_corpus_passkey_prompts; the tiny corpus' text has none: set data.answer_only_loss: false")
    check(prompts >= 0 and (not prompts or (c.data.tiny_corpus and not c.data.add_extra_token
                                            and c.data.answer_only_loss)),
          f"data.tiny_corpus_passkey_prompts ({prompts}) trains on whole prompts with the loss on their key: it "
          "needs data.tiny_corpus: true, data.add_extra_token: false and data.answer_only_loss: true")
    for prefix in c.data.train_data if check_files else ():
        check(Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file(),
               f"data.train_data: {prefix}.bin/.idx not found; make them with `megatron-ext preprocess`")
    _validate_tokenizer(c.data, check_files, pretrained=c.checkpoint.pretrained)
    if check_files:
        validate_tiny_vocabulary(c)
    try:
        c.rope.validate(num_attention_heads=m.num_attention_heads, num_query_groups=groups)
    except (ValueError, ArithmeticError) as error:
        raise ConfigError(f"rope: {error}") from None
    except TypeError as error:  # the params are passed as keywords: an unknown or ill-typed one lands here
        raise ConfigError(f"rope.head_base_params / rope.scaling_params ({c.rope.head_base_params}, "
                          f"{c.rope.scaling_params}) do not fit rope.head_base_strategy "
                          f"{c.rope.head_base_strategy!r} / rope.scaling {c.rope.scaling!r}: {error}") from None


def validate_optimizer(o: OptimizerConfig) -> None:
    """The optimizer's own numbers. No checkpoint supplies them, so `train` checks them before it reads (and
    verifies) the checkpoint it resumes from; validate() checks them again with everything else."""
    for key, value in (("optimizer.lr", o.lr), ("optimizer.min_lr", o.min_lr), ("optimizer.clip_grad", o.clip_grad),
                       ("optimizer.adam_eps", o.adam_eps), ("optimizer.weight_decay", o.weight_decay)):
        check(math.isfinite(value), f"{key} ({value}) must be a finite number: set it to an ordinary value")
    check(o.lr > 0, f"optimizer.lr ({o.lr}) must be > 0: set e.g. optimizer.lr=3e-4")
    # Adam moves every weight by about lr per step; weights start near init_method_std (0.02): an lr above 1
    # replaces them with noise at the first step and ends in the non-finite stop (1e39 used to exit 1)
    check(o.lr <= MAX_LR, f"optimizer.lr ({o.lr}) must be at most {MAX_LR}: Adam moves every weight by about lr "
                          "per step; set e.g. optimizer.lr=3e-4")
    # decoupled weight decay multiplies every weight by (1 - lr x weight_decay) per step: >= 1 zeroes or flips them
    check(o.weight_decay >= 0 and o.lr * o.weight_decay < 1,
          f"optimizer.weight_decay ({o.weight_decay}) must be >= 0 with lr x weight_decay < 1 (now "
          f"{o.lr * o.weight_decay:g}; each step scales the weights by 1 - lr x weight_decay): set e.g. 0.1")
    check(o.adam_eps > 0, f"optimizer.adam_eps ({o.adam_eps}) must be > 0 (it keeps Adam's division finite): "
                          "set e.g. optimizer.adam_eps=1e-8")
    check(0 <= o.min_lr <= o.lr, f"optimizer.lr ({o.lr}) must be > 0 and optimizer.min_lr ({o.min_lr}) in [0, lr]")
    check(0 < o.adam_beta1 < 1 and 0 < o.adam_beta2 < 1,
          f"optimizer.adam_beta1/adam_beta2 ({o.adam_beta1}, {o.adam_beta2}) must be in (0, 1)")
    check(o.clip_grad >= 0, f"optimizer.clip_grad ({o.clip_grad}) must be >= 0 (0 turns clipping off)")


def _validate_numbers(c: TrainConfig) -> None:
    """Numbers that would train to NaN or never stop: refused before any work, each with its fix."""
    m, t, ckpt = c.model, c.training, c.checkpoint
    validate_optimizer(c.optimizer)
    for key, value in (("model.norm_epsilon", m.norm_epsilon), ("model.init_method_std", m.init_method_std)):
        check(math.isfinite(value), f"{key} ({value}) must be a finite number: set it to an ordinary value")
    check(c.logging.gpu_peak_tflops is None or c.logging.gpu_peak_tflops > 0,
          f"logging.gpu_peak_tflops ({c.logging.gpu_peak_tflops}) must be > 0 TFLOP/s, or null to look it up")
    check(m.norm_epsilon > 0, f"model.norm_epsilon ({m.norm_epsilon}) must be > 0 (it keeps the norm's division "
                              "finite): set e.g. model.norm_epsilon=1e-5")
    check(m.init_method_std > 0, f"model.init_method_std ({m.init_method_std}) must be > 0: set e.g. "
                                 "model.init_method_std=0.02")
    for key, value in (("model.attention_dropout", m.attention_dropout), ("model.hidden_dropout", m.hidden_dropout)):
        check(0 <= value < 1, f"{key} ({value}) must be in [0, 1): set it to 0 for no dropout")
    check(t.exit_interval is None or t.exit_interval >= 0,
          f"training.exit_interval ({t.exit_interval}) must be >= 1 (stop after that many iterations), "
          "or null/0 for never")
    check(ckpt.save_interval >= 1, f"checkpoint.save_interval ({ckpt.save_interval}) must be >= 1: set the "
                                   "number of iterations between checkpoints")
    check(t.nonfinite_patience >= 0, f"training.nonfinite_patience ({t.nonfinite_patience}) must be >= 0: the "
                                     "consecutive non-finite iterations training.nonfinite=skip tolerates")


def _validate_schedule(c: TrainConfig) -> None:
    """WSD, the batch-size ramp-up and interleaved pipeline stages (megatron-LM's rules; training/batches.py)."""
    o, t, p, m = c.optimizer, c.training, c.parallel, c.model
    decay_iters = o.lr_decay_iters or t.train_iters
    wsd = o.lr_wsd_decay_iters
    check(o.lr_decay_style != "WSD" or (wsd is not None and 1 <= wsd <= decay_iters - o.warmup_iters),
          f"optimizer.lr_decay_style=WSD anneals over optimizer.lr_wsd_decay_iters ({wsd}), which must be in "
          f"[1, {decay_iters - o.warmup_iters}] (lr_decay_iters minus warmup_iters): e.g. "
          f"optimizer.lr_wsd_decay_iters={max(1, decay_iters // 10)}")
    check(wsd is None or o.lr_decay_style == "WSD",
          f"optimizer.lr_wsd_decay_iters ({wsd}) is read only by optimizer.lr_decay_style=WSD: set that, or remove it")
    ramp = t.rampup_batch_size
    if ramp is not None:
        check(len(ramp) == 3 and all(_is_int(n) and n >= 1 for n in ramp),
              f"training.rampup_batch_size ({ramp}) must be [start, increment, samples] >= 1, e.g. [4, 4, 1000]")
        start, increment, _ = ramp
        check(start < t.global_batch_size and (t.global_batch_size - start) % increment == 0,
              f"training.rampup_batch_size: start {start} plus steps of {increment} must reach "
              f"training.global_batch_size ({t.global_batch_size})")
        check(start % t.micro_batch_size == 0 and increment % t.micro_batch_size == 0,
              f"training.rampup_batch_size: start ({start}) and increment ({increment}) must be multiples of "
              f"training.micro_batch_size ({t.micro_batch_size}): every batch is whole micro-batches")
    vpp, pp = p.virtual_pipeline_model_parallel_size, p.pipeline_model_parallel_size
    if vpp is not None:
        check(vpp >= 2 and pp >= 2,
              f"parallel.virtual_pipeline_model_parallel_size ({vpp}) interleaves >= 2 model chunks per pipeline "
              f"rank and needs parallel.pipeline_model_parallel_size >= 2 (now {pp}): or leave it unset (null)")
        check(m.num_layers % (pp * vpp) == 0,
              f"parallel.virtual_pipeline_model_parallel_size ({vpp}) x pipeline_model_parallel_size ({pp}) must "
              f"divide model.num_layers ({m.num_layers}): each chunk holds num_layers / (PP x VPP) layers")


def _validate_validation(c: TrainConfig, check_files: bool) -> None:
    """training.eval_interval and where its samples come from (data.valid_data or data.split)."""
    t, d = c.training, c.data
    check(t.eval_interval is None or t.eval_interval >= 1,
          f"training.eval_interval ({t.eval_interval}) must be >= 1 iterations, or null for no validation")
    check(t.eval_iters >= 1, f"training.eval_iters ({t.eval_iters}) must be >= 1")
    split = split_weights(d.split) if d.split is not None else None
    if t.eval_interval is None:
        check(not d.valid_data, "data.valid_data is read only with training.eval_interval: set "
                                "training.eval_interval=N to validate every N iterations, or remove data.valid_data")
        return
    check(bool(d.valid_data) != bool(split and split[1] > 0),
          "training.eval_interval needs validation data: give data.valid_data (indexed-dataset prefixes) or "
          "data.split with a validation part, e.g. data.split=98,2,0 - one of them, not both")
    if check_files:
        for prefix in d.valid_data:
            check(Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file(),
                  f"data.valid_data: {prefix}.bin/.idx not found; make them with `megatron-ext preprocess`")


def split_weights(split: str) -> list[float]:
    """megatron's split string "969,30,1" (train, valid[, test]) as three weights; refused when malformed."""
    try:
        weights = [float(part) for part in str(split).replace("/", ",").split(",")]
    except ValueError:
        weights = []
    check(len(weights) in (2, 3) and all(w >= 0 and math.isfinite(w) for w in weights) and weights[0] > 0,
          f"data.split ({split!r}) must be train,valid[,test] weights with a training part, e.g. 98,2,0")
    return (weights + [0.0])[:3]


def _validate_overlap(p: ParallelConfig) -> None:
    """megatron-LM's rules for overlapping DP communication (megatron/training/arguments.py)."""
    check(not p.overlap_param_gather or p.use_distributed_optimizer,
          "parallel.overlap_param_gather needs parallel.use_distributed_optimizer: true (only the distributed "
          "optimizer all-gathers weights): set both, or overlap_param_gather=false")
    check(not p.overlap_param_gather or p.overlap_grad_reduce,
          "parallel.overlap_param_gather needs parallel.overlap_grad_reduce: true (megatron overlaps the weight "
          "all-gather only together with the gradient reduce-scatter): set both")
    check(p.ddp_bucket_size is None or p.ddp_bucket_size >= 1,
          f"parallel.ddp_bucket_size ({p.ddp_bucket_size}) must be >= 1 parameters, or null for megatron's default")


def _validate_context_parallel(c: TrainConfig) -> None:
    """parallel.cp_comm_type against the heads and the CP size; at CP=1 there is nothing to exchange and the
    type is ignored. Transformer Engine's a2a scatters the local query *and* KV heads over the (a2a) group."""
    p, m = c.parallel, c.model
    cp, tp, kind = p.context_parallel_size, p.tensor_model_parallel_size, p.cp_comm_type
    sizes = p.hierarchical_context_parallel_sizes
    if cp == 1:
        return
    heads, groups = m.num_attention_heads // tp, max(1, (m.num_query_groups or m.num_attention_heads) // tp)
    if kind == "a2a":
        check(heads % cp == 0 and groups % cp == 0,
              f"parallel.cp_comm_type=a2a scatters attention heads over the {cp} CP ranks, but each TP rank holds "
              f"{heads} query heads and {groups} KV heads: pick a CP size dividing both, lower TP, or use p2p")
    if kind != "a2a+p2p":
        check(sizes is None, f"parallel.hierarchical_context_parallel_sizes ({sizes}) is read only by "
                             "parallel.cp_comm_type=a2a+p2p: remove it, or set that type")
        return
    check(sizes is not None and len(sizes) == 2 and all(_is_int(n) and n >= 1 for n in sizes)
          and sizes[0] * sizes[1] == cp,
          f"parallel.cp_comm_type=a2a+p2p needs parallel.hierarchical_context_parallel_sizes = [a2a group, p2p "
          f"ring] multiplying to parallel.context_parallel_size ({cp}), got {sizes}: e.g. [{min(cp, 8)}, "
          f"{cp // min(cp, 8)}]")
    check(heads % sizes[0] == 0 and groups % sizes[0] == 0,
          f"parallel.hierarchical_context_parallel_sizes[0] ({sizes[0]}) is the a2a group, which scatters the "
          f"{heads} query and {groups} KV heads of a TP rank: pick an a2a size dividing both")


def _validate_fp8(t: TrainingConfig) -> None:
    """The recipe settings; whether this machine has Transformer Engine is checked when the model is built."""
    check(t.fp8_amax_history_len >= 1, f"training.fp8_amax_history_len ({t.fp8_amax_history_len}) must be >= 1")
    check(t.fp8_margin >= 0, f"training.fp8_margin ({t.fp8_margin}) must be >= 0")
    defaults = TrainingConfig()
    delayed_only = [name for name in ("fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_margin")
                    if getattr(t, name) != getattr(defaults, name)]
    check(t.fp8_recipe == "delayed" or not delayed_only,
          f"training.{delayed_only[0] if delayed_only else ''} applies to training.fp8_recipe=delayed only (the "
          f"{t.fp8_recipe} recipe scales from the current tensor): remove it or use the delayed recipe")


def _validate_tokenizer(data: DataConfig, check_files: bool, *, pretrained: str | None) -> None:
    """One tokenizer named (none for the tiny corpus, which trains its own); with check_files, a path whose kind
    is known (megatron_ext/data/tokenizer_files.py: the file sniffing, no megatron)."""
    check(data.tokenizer is None or data.tokenizer_model is None,
          f"data.tokenizer ({data.tokenizer}) and data.tokenizer_model ({data.tokenizer_model}) are both set: keep "
          "data.tokenizer (tokenizer_model is its older name for a sentencepiece .model)")
    check(data.tokenizer_model is None or data.tokenizer_type in (None, "sentencepiece"),
          f"data.tokenizer_model names a sentencepiece .model, but data.tokenizer_type is {data.tokenizer_type!r}: "
          "name the file with data.tokenizer instead")
    setting, path, kind = data.tokenizer_source()
    check(data.tiny_corpus or path is not None or pretrained,  # a checkpoint records its tokenizer
          "data.tokenizer: give the tokenizer the data was tokenized with (a sentencepiece .model, a Hugging Face "
          "tokenizer directory or a tiktoken BPE file), or start from checkpoint.pretrained, whose tokenizer is used")
    if path is not None and check_files and not data.tiny_corpus:
        from megatron_ext.data.tokenizer_files import detect_tokenizer

        detect_tokenizer(path, kind, setting=setting)
