"""What the planner plans for (Workload: a model, a sequence length, a batch) and what it picks (Layout).

Imports no megatron.
"""

import dataclasses
import logging
from dataclasses import dataclass

from megatron_ext.checkpoint.inherit import settle_architecture
from megatron_ext.checkpoint.layout import CheckpointNotFound
from megatron_ext.config import CHOICES, ConfigError, ModelConfig, TrainConfig, from_dict, read_raw, validate
from megatron_ext.launch.errors import LaunchError
from megatron_ext.launch.presets import METHODS

log = logging.getLogger("megatron_ext")

RECOMPUTE = CHOICES["training.recompute"]  # none, selective, full
CP_COMM_TYPES = CHOICES["parallel.cp_comm_type"]  # p2p, a2a, allgather, a2a+p2p


@dataclass(frozen=True)
class Workload:
    """One training step's work.

    seq_length:            tokens per sample that the GPUs process (PoSE: the short window L_c).
    position_range:        position ids span [0, position_range) (PoSE: the target L_t).
    per_head_bases:        HARPE: one RoPE base per KV group, so one cos/sin table per local group.
    per_sample_positions:  PoSE: every sample has its own position ids (cos/sin per sample).
    """

    name: str
    model: ModelConfig
    seq_length: int
    global_batch_size: int
    position_range: int
    per_head_bases: bool = False
    per_sample_positions: bool = False
    rotary_dim: int | None = None  # None: the whole head
    virtual_pipeline_stages: int | None = None  # parallel.virtual_pipeline_model_parallel_size: chunks per PP rank

    @property
    def head_dim(self) -> int:
        return self.model.hidden_size // self.model.num_attention_heads

    @property
    def kv_groups(self) -> int:
        return self.model.num_query_groups or self.model.num_attention_heads

    @property
    def tokens_per_step(self) -> int:
        return self.seq_length * self.global_batch_size

    def describe_model(self) -> str:
        m = self.model
        return (f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads in {self.kv_groups} KV "
                f"groups, FFN {m.ffn_size}, vocabulary {m.vocab_size}")

    def describe(self) -> str:
        rope = "one RoPE base per KV group (HARPE)" if self.per_head_bases else "one RoPE base"
        if self.per_sample_positions:
            return (f"{self.name}: PoSE, {self.seq_length}-token window with position ids up to "
                    f"{self.position_range}, {rope}, global batch {self.global_batch_size}")
        return f"{self.name}: {self.seq_length} tokens per sample, {rope}, global batch {self.global_batch_size}"


def workload_from_preset(name: str, model: ModelConfig, seq_length: int, *, method: str = "harpe",
                         pose_window: int = 2048, global_batch_size: int = 32) -> Workload:
    """A preset model at seq_length: HARPE trains at seq_length; PoSE trains pose_window tokens whose
    ids span seq_length; rope is one base for all heads (stock RoPE, PI, YaRN, ABF...)."""
    if method not in METHODS:
        raise LaunchError(f"--method {method!r}: pick one of {', '.join(METHODS)}")
    if method == "pose":
        if not 0 < pose_window <= seq_length:
            raise LaunchError(f"--pose-window ({pose_window}) must be in (0, --seq-length = {seq_length}]")
        return Workload(name, dataclasses.replace(model, seq_length=pose_window), pose_window,
                        global_batch_size, seq_length, per_sample_positions=True)
    return Workload(name, dataclasses.replace(model, seq_length=seq_length), seq_length, global_batch_size,
                    seq_length, per_head_bases=method == "harpe")


# the model sizes whose defaults are the tiny test model's: planned from the config only when it gives them
PLANNED_SIZES = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")


def read_train_config(path, overrides=()) -> TrainConfig:
    """A training YAML checked like `megatron-ext train` does, the architecture, length and RoPE settled from
    checkpoint.pretrained by train's rules (megatron_ext/checkpoint/inherit.py); the dataset files need not exist
    here. Pretrained weights that are not on this machine leave the config's model block, which must then give
    the sizes."""
    given = read_raw(path, list(overrides), example="examples/configs/*.yaml")
    config = from_dict(TrainConfig, given, prefix="")
    try:
        settled = settle_architecture(config, given)
    except CheckpointNotFound as error:
        missing = [f"model.{key}" for key in PLANNED_SIZES if (given.get("model") or {}).get(key) is None]
        if missing:
            raise LaunchError(f"{error}. Without it here, the config's model block is planned, but it leaves out "
                              f"{', '.join(missing)}: plan where the checkpoint is, or give them") from None
        log.warning(f"megatron_ext: checkpoint.pretrained ({config.checkpoint.pretrained}) is not on this machine: "
                    "planning the config's model block as written (train checks it against the checkpoint)")
        settled = None
    if settled is not None:
        log.info("megatron_ext: the model planned, from checkpoint.pretrained:\n" + "\n".join(settled.lines()))
    validate(config, check_files=False)
    return config


def workload_from_config(config: TrainConfig, name: str) -> Workload:
    m = config.model
    if m.vocab_size is None:
        raise ConfigError(f"model.vocab_size is null in {name}: the planner needs it; add --set "
                          "model.vocab_size=32000 (or your tokenizer's size), or set checkpoint.pretrained")
    pose = config.pose
    return Workload(
        name=name, model=m, seq_length=m.seq_length, global_batch_size=config.training.global_batch_size,
        position_range=pose.target_length if pose.enabled else m.seq_length,
        per_head_bases=config.rope.per_head, per_sample_positions=pose.enabled,
        rotary_dim=config.rope.rotary_dim(m.hidden_size // m.num_attention_heads),
        virtual_pipeline_stages=config.parallel.virtual_pipeline_model_parallel_size,
    )


@dataclass(frozen=True)
class Layout:
    """A parallel layout: TP x PP x CP x DP GPUs; sequence parallelism whenever TP > 1.

    cp_comm_type: how attention exchanges the sequence across CP ranks (meaningful for CP > 1); a2a_size
    is a2a+p2p's all-to-all group (the ring spans CP / a2a_size of them). overlap: the gradient
    reduction (and with the distributed optimizer the weight all-gather) overlaps compute, as the
    planner assumes unless told otherwise (PlanRequest.overlap).
    """

    tp: int
    pp: int
    cp: int
    dp: int
    micro_batch_size: int
    recompute: str
    cp_comm_type: str = "p2p"
    a2a_size: int = 1
    overlap: bool = True

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def cp_exchange(self) -> str:
        """The CP type as the table shows it: '-' without CP, a2a+p2p with its a2a x ring sizes."""
        if self.cp == 1:
            return "-"
        if self.cp_comm_type == "a2a+p2p":
            return f"a2a+p2p {self.a2a_size}x{self.cp // self.a2a_size}"
        return self.cp_comm_type

    def micro_batches(self, global_batch_size: int) -> int:
        """Micro-batches per step on every DP rank (gradient accumulation steps)."""
        return global_batch_size // (self.micro_batch_size * self.dp)

    def overrides(self, distributed_optimizer: bool) -> dict[str, object]:
        """The training config's keys that select this layout: the sizes, and the CP exchange when it is not
        the default ring (p2p: a config that names another type keeps it). The options the planner assumes
        besides the layout (overlap) are the report's `assumed_settings`."""
        keys = {
            "parallel.tensor_model_parallel_size": self.tp,
            "parallel.pipeline_model_parallel_size": self.pp,
            "parallel.context_parallel_size": self.cp,
            "parallel.sequence_parallel": self.sequence_parallel,
            "parallel.use_distributed_optimizer": distributed_optimizer,
        }
        if self.cp > 1 and self.cp_comm_type != "p2p":
            keys["parallel.cp_comm_type"] = self.cp_comm_type
        if self.cp > 1 and self.cp_comm_type == "a2a+p2p":
            keys["parallel.hierarchical_context_parallel_sizes"] = [self.a2a_size, self.cp // self.a2a_size]
        return {**keys, "training.micro_batch_size": self.micro_batch_size, "training.recompute": self.recompute}

    def override_args(self, distributed_optimizer: bool) -> list[str]:
        """The overrides as `key=value` for `megatron-ext train --set` (YAML values without spaces)."""
        return [f"{key}={yaml_word(value)}" for key, value in self.overrides(distributed_optimizer).items()]

    def __str__(self) -> str:
        """The sizes (the CP type is the table's `CP comm` column and the overrides' cp_comm_type)."""
        return (f"TP{self.tp} PP{self.pp} CP{self.cp} DP{self.dp}, micro-batch {self.micro_batch_size}, "
                f"recompute {self.recompute}")


def yaml_word(value) -> str:
    """A value as YAML reads it back, in one shell word: true/false, [2,4]."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)
