"""The training configuration: YAML -> validated dataclasses. Every default lives here, once.

Imports no megatron and nothing of the loop: configs are checked before any process group, model or
data exists, and the planner, converters and evaluation read the same dataclasses.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ext.config.reader import ConfigError, check, read_config
from megatron_ext.rope.config import RopeConfig


@dataclass
class ModelConfig:
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


@dataclass
class PoseConfig:
    enabled: bool = False
    target_length: int = 0  # L_t: position ids are drawn from [0, target_length)
    num_chunks: int = 2
    variant: str = "code"  # "code" (released PoSE code) or "paper"
    mask_chunk_boundary: bool = False


@dataclass
class DataConfig:
    train_data: list[str] = field(default_factory=list)  # indexed-dataset prefixes ({prefix}.bin/.idx)
    train_data_weights: list[float] | None = None
    tokenizer: str | None = None  # a sentencepiece .model, a Hugging Face tokenizer directory, a tiktoken BPE file
    tokenizer_type: str | None = None  # sentencepiece | huggingface | tiktoken; None: detected from the files
    tokenizer_model: str | None = None  # a sentencepiece .model (the older name of `tokenizer` for that kind)
    document_mask: bool = False  # packed documents: positions restart at each document, attention stays inside it
    mask_eod_loss: bool = False  # no loss at EOD tokens (megatron's eod_mask_loss: an EOD predicts the next doc)
    tiny_corpus: bool = False  # build the offline tiny corpus + tokenizer + dataset under cache_dir
    tiny_corpus_documents: int = 400
    tokenizer_vocab_size: int = 2000  # for the tokenizer trained on the tiny corpus
    cache_dir: str = "runs/cache"
    upsample: dict[str, dict] = field(default_factory=dict)  # source -> {min_tokens, factor}

    def tokenizer_source(self) -> tuple[str, str | None, str | None]:
        """(the setting that names the tokenizer, its path or None, its kind or None: detect it from the files)."""
        if self.tokenizer_model is not None:
            return "data.tokenizer_model", self.tokenizer_model, self.tokenizer_type or "sentencepiece"
        return "data.tokenizer", self.tokenizer, self.tokenizer_type


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False


@dataclass
class TrainingConfig:
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


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_iters: int = 10
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    lr_decay_iters: int | None = None  # None: train_iters


@dataclass
class CheckpointConfig:
    dir: str = "runs/checkpoints"
    save_interval: int = 50
    keep_last: int | None = 2
    resume: str = "auto"  # auto (newest complete one, if any) | none | a checkpoint directory
    pretrained: str | None = None  # weights to start from when there is nothing to resume (e.g. a converted HF model)
    from_scratch: bool = False  # a model of >= 1B parameters starts from random weights only when this says so
    load_optimizer: bool = True
    verify: bool = True  # check every file against the checkpoint's manifest (size, CRC-32) before loading
    async_save: bool = False  # write checkpoints on a background thread while training goes on (host copy of the state)


@dataclass
class LoggingConfig:
    log_interval: int = 1
    tensorboard_dir: str | None = "runs/tensorboard"
    metrics_file: str | None = "runs/metrics.jsonl"  # one JSON line per iteration (appended on resume)
    wandb_project: str | None = None
    progress_bar: bool = True
    gpu_peak_tflops: float | None = None  # for MFU; None: looked up from the device name


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


CHOICES = {
    "model.normalization": ("RMSNorm", "LayerNorm"),
    "pose.variant": ("code", "paper"),
    "data.tokenizer_type": (None, "sentencepiece", "huggingface", "tiktoken"),
    "training.precision": ("auto", "bf16", "fp32"),
    "training.recompute": ("none", "selective", "full"),
    "training.nonfinite": ("stop", "skip"),
    "optimizer.lr_decay_style": ("cosine", "linear", "constant"),
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
    groups = m.num_query_groups or m.num_attention_heads
    check(m.hidden_size % m.num_attention_heads == 0,
           f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads ({m.num_attention_heads})")
    check(m.num_attention_heads % groups == 0,
           f"model.num_query_groups ({groups}) must divide model.num_attention_heads ({m.num_attention_heads})")
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    check(m.num_attention_heads % tp == 0,
           f"parallel.tensor_model_parallel_size ({tp}) must divide model.num_attention_heads "
           f"({m.num_attention_heads}): pick a TP size that divides the heads")
    check(groups % tp == 0 or tp % groups == 0,
           f"parallel.tensor_model_parallel_size ({tp}) and the KV groups ({groups}) must divide one another")
    check(m.num_layers % pp == 0,
           f"parallel.pipeline_model_parallel_size ({pp}) must divide model.num_layers ({m.num_layers})")
    check(cp == 1 or m.seq_length % (2 * cp) == 0,
           f"model.seq_length ({m.seq_length}) must be divisible by 2 x parallel.context_parallel_size "
           f"({2 * cp}) for the zig-zag split")
    check(not p.sequence_parallel or tp > 1,
           "parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1: set it to false")
    check(t.global_batch_size % t.micro_batch_size == 0,
           f"training.global_batch_size ({t.global_batch_size}) must be a multiple of "
           f"training.micro_batch_size ({t.micro_batch_size})")
    _validate_numbers(c)
    check(o.lr > 0 and 0 <= o.min_lr <= o.lr,
           f"optimizer.lr ({o.lr}) must be > 0 and optimizer.min_lr ({o.min_lr}) in [0, lr]")
    decay_iters = o.lr_decay_iters or t.train_iters
    check(0 <= o.warmup_iters < decay_iters,
           f"optimizer.warmup_iters ({o.warmup_iters}) must be in [0, {decay_iters}) (fewer than optimizer.lr_decay_iters, "
           "default training.train_iters): megatron's scheduler needs at least one decay step after warmup")
    check(0 < o.adam_beta1 < 1 and 0 < o.adam_beta2 < 1,
           f"optimizer.adam_beta1/adam_beta2 ({o.adam_beta1}, {o.adam_beta2}) must be in (0, 1)")
    check(o.clip_grad >= 0, f"optimizer.clip_grad ({o.clip_grad}) must be >= 0 (0 turns clipping off)")
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
    for prefix in c.data.train_data if check_files else ():
        check(Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file(),
               f"data.train_data: {prefix}.bin/.idx not found; make them with `megatron-ext preprocess`")
    _validate_tokenizer(c.data, check_files, pretrained=c.checkpoint.pretrained)
    try:
        c.rope.validate(num_attention_heads=m.num_attention_heads, num_query_groups=groups)
    except ValueError as error:
        raise ConfigError(f"rope: {error}") from None


def _validate_numbers(c: TrainConfig) -> None:
    """Numbers that would train to NaN or never stop: refused before any work, each with its fix."""
    m, t, o, ckpt = c.model, c.training, c.optimizer, c.checkpoint
    for key, value in (("optimizer.lr", o.lr), ("optimizer.min_lr", o.min_lr), ("optimizer.clip_grad", o.clip_grad),
                       ("optimizer.adam_eps", o.adam_eps), ("optimizer.weight_decay", o.weight_decay),
                       ("model.norm_epsilon", m.norm_epsilon), ("model.init_method_std", m.init_method_std)):
        check(math.isfinite(value), f"{key} ({value}) must be a finite number: set it to an ordinary value")
    check(o.lr > 0, f"optimizer.lr ({o.lr}) must be > 0: set e.g. optimizer.lr=3e-4")
    check(o.adam_eps > 0, f"optimizer.adam_eps ({o.adam_eps}) must be > 0 (it keeps Adam's division finite): "
                          "set e.g. optimizer.adam_eps=1e-8")
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
