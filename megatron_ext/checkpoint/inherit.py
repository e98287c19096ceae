"""What a run takes from the checkpoint it starts from, decided from megatron_ext.json alone: the architecture
(the checkpoint wins; a config may leave it out but not contradict it), the sequence length and the RoPE setup.
`train` (training/start.py), `plan` and `launch` settle a config through this one module.

The rules, each logged as one row of the start block (`Settled.rows`):
- model.<architecture key>: the checkpoint's; an explicit value that differs is refused by name.
- model.seq_length, when the config leaves it out: a resume keeps its run's; pretrained weights train at the
  context they record (`CheckpointState.context_window`: a converted model's max_position_embeddings, a
  trained one's length or PoSE target). Never the dataclass default.
- rope: the config's `rope` section is a set of changes to the checkpoint's RoPE: keys it names win, the others
  are the checkpoint's. A changed `scaling` drops the checkpoint's `scaling_params` (they belong to its scaling)
  and a changed `head_base_strategy` its `head_base_params`. To drop a scaling, say so: `rope.scaling: default`.
Imports no megatron and no torch beyond megatron_ext.rope's.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from megatron_ext.checkpoint.layout import CheckpointError, resolve_checkpoint
from megatron_ext.checkpoint.state import SavedCheckpoint, read_checkpoint
from megatron_ext.config import ModelConfig, TrainConfig
from megatron_ext.rope import RopeConfig

# model.<key> -> its effective value (None-valued defaults resolved), compared with the checkpoint's
ARCHITECTURE = {name: (lambda model, name=name: model.architecture()[name]) for name in ModelConfig.ARCHITECTURE}

# a parameter dict -> the setting it parameterizes: inherited only while that setting is the checkpoint's
ROPE_PARAMETERS = {"scaling_params": "scaling", "head_base_params": "head_base_strategy"}

CONVERT_HINT = ("make one with `megatron-ext convert hf-to-mcore --hf <Hugging Face model dir> --out <dir>` and set "
                "checkpoint.pretrained: <dir>/iter_0000000")


@dataclass
class Settled:
    """The rows of the start block: (setting, where its value comes from, the value as people read it)."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, setting: str, source: str, value) -> None:
        self.rows.append((setting, source, str(value)))

    def lines(self) -> list[str]:
        return [f"  {setting} from {source}: {value}" for setting, source, value in self.rows]


def pretrained_checkpoint(config: TrainConfig) -> SavedCheckpoint:
    """checkpoint.pretrained resolved and read (an iter_ directory, a root, `latest`); its path is written back
    absolute. A missing one is refused with how to make it."""
    try:
        path = resolve_checkpoint(config.checkpoint.pretrained, setting="checkpoint.pretrained")
    except FileNotFoundError as error:
        raise type(error)(f"{error}; {CONVERT_HINT}") from None
    saved = read_checkpoint(path, setting="checkpoint.pretrained")
    config.checkpoint.pretrained = str(saved.path)
    return saved


def adopt_model(config: TrainConfig, given: dict, saved: SavedCheckpoint, setting: str) -> Settled:
    """Bring config.model and config.rope in line with `saved` (see the module's rules); `given` is what the user
    set (the YAML mapping with its overrides). Returns the rows that say where each value came from."""
    settled = Settled()
    given_model = {key: value for key, value in (given.get("model") or {}).items() if value is not None}
    _adopt_architecture(config, given_model, saved, setting, settled)
    _adopt_seq_length(config, given_model, saved, setting, settled)
    _adopt_rope(config, given, saved, setting, settled)
    return settled


def _adopt_architecture(config, explicit: dict, saved: SavedCheckpoint, setting: str, settled: Settled) -> None:
    source = saved.state.config.model
    # a null (vocab_size, num_query_groups, ffn_hidden_size) means "the size it stands for": not a value given
    source = dataclasses.replace(source, vocab_size=source.vocab_size or saved.state.tokenizer_vocab_size)
    for key, value_of in ARCHITECTURE.items():
        theirs = value_of(source)
        if key in explicit and value_of(config.model) != theirs:
            raise CheckpointError(
                f"model.{key}: the config says {value_of(config.model)!r}, the checkpoint {setting} "
                f"({saved.path}) says {theirs!r}: drop model.{key} from the config (the checkpoint's architecture "
                f"is used) or start from another checkpoint")
        setattr(config.model, key, getattr(source, key))
    taken = [f"{key}={value_of(source)}" for key, value_of in ARCHITECTURE.items() if key not in explicit]
    agreed = [f"{key}={value_of(source)}" for key, value_of in ARCHITECTURE.items() if key in explicit]
    if taken:
        settled.add("model", setting, ", ".join(taken))
    if agreed:
        settled.add("model", f"the config (as {setting} says)", ", ".join(agreed))


def _adopt_seq_length(config, explicit: dict, saved: SavedCheckpoint, setting: str, settled: Settled) -> None:
    recorded = saved.state.context_window
    if "seq_length" in explicit:
        note = "" if config.model.seq_length == recorded else f" ({setting} records a context of {recorded})"
        settled.add("model.seq_length", "the config", f"{config.model.seq_length}{note}")
        return
    if setting == "checkpoint.resume":  # the same run goes on: its own training window
        config.model.seq_length = saved.state.config.model.seq_length
        settled.add("model.seq_length", setting, f"{config.model.seq_length} (the run's training length)")
        return
    config.model.seq_length = recorded
    settled.add("model.seq_length", setting, f"{recorded} (the context it records; set model.seq_length to train "
                                             "at another length)")


def _adopt_rope(config, given: dict, saved: SavedCheckpoint, setting: str, settled: Settled) -> None:
    source = saved.state.config.rope
    groups = config.model.num_query_groups or config.model.num_attention_heads
    section = rope_keys_given(given)
    config.rope = merge_rope(source, config.rope, section)
    if not section:
        settled.add("RoPE", setting, config.rope.describe(groups))
        return
    changed = config.rope != source
    summary = f"{config.rope.describe(groups)}" + (f" (was: {source.describe(groups)})" if changed else "")
    settled.add("RoPE", f"{setting} with rope.{', rope.'.join(sorted(section))} of the config", summary)


def rope_keys_given(given: dict) -> set[str]:
    """The RopeConfig fields the config's `rope` section names (old names read as their new ones)."""
    section = given.get("rope") or {}
    return {RopeConfig.RENAMED_SETTINGS.get(key, key) for key in section}


def merge_rope(checkpoint: RopeConfig, configured: RopeConfig, keys: set[str]) -> RopeConfig:
    """The checkpoint's RoPE with the `keys` of `configured` set over it; a parameter dict left out follows its
    setting (kept while that is the checkpoint's, else empty: another scaling's parameters are not these)."""
    merged = copy.deepcopy(checkpoint)
    for key in keys:
        setattr(merged, key, copy.deepcopy(getattr(configured, key)))
    for parameters, owner in ROPE_PARAMETERS.items():
        if parameters not in keys and getattr(merged, owner) != getattr(checkpoint, owner):
            setattr(merged, parameters, {})
    return merged


def settle_architecture(config: TrainConfig, given: dict) -> Settled | None:
    """For `plan` and `launch`: the architecture, length and RoPE from checkpoint.pretrained, as `train` takes
    them (None: the config names no pretrained weights)."""
    if not config.checkpoint.pretrained:
        return None
    saved = pretrained_checkpoint(config)
    return adopt_model(config, given, saved, "checkpoint.pretrained")
