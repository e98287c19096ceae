"""What a megatron_ext checkpoint records besides its tensors, as types: `CheckpointState` (the model's
config, tokenizer, HARPE bases, data position, layout) and `SavedCheckpoint` (that plus what the store
adds: iteration, optimizer flavour, sharding format, the layout that saved it).

`read_checkpoint` is the one way commands open a checkpoint argument (a run directory, a checkpoint
root, `latest`, an iter_ directory); its errors name the setting the argument came from.
A checkpoint carries its tokenizer's files in its own `tokenizer/` and records that path relative to itself, so
a copied or moved checkpoint reads its own copy (`SavedCheckpoint.tokenizer_path`). A relative record must stay
inside the checkpoint (`SavedCheckpoint.inside`): megatron_ext.json is a file anyone with write access can edit,
and `../../secret` would otherwise be read, or copied into an export. Reads
megatron_ext.json only: no torch tensors, no megatron. Per-rank RNG states live in rng/ and are the
store's business (megatron_ext/checkpoint/store.py).
"""
from __future__ import annotations

import json
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_ext.checkpoint.layout import JSON_FILE, CheckpointError, resolve_checkpoint
from megatron_ext.config import ConfigError, TrainConfig, from_dict

TOKENIZER_DIR = "tokenizer"  # inside an iter_ directory: the tokenizer's files the checkpoint carries


@dataclass
class CheckpointState:
    """The model-level record every megatron_ext checkpoint carries (megatron_ext.json's "state")."""

    config: TrainConfig  # the configuration it was trained with (or converted into)
    head_bases: list[float]  # one RoPE base per KV group, as trained (HARPE), else all equal
    padded_vocab_size: int  # rows of the embedding and output layer
    # the tokenizer: TOKENIZER_DIR (its files inside the checkpoint, relative to it), or an absolute path
    # (checkpoints written before they carried their tokenizer); read it through SavedCheckpoint.tokenizer_path
    tokenizer_model: str | None = None
    tokenizer_vocab_size: int | None = None
    tokenizer_fingerprint: str | None = None  # megatron_ext.data.tokenizer_files: sha256 of the files that decide ids
    iteration: int = 0
    consumed_samples: int = 0  # the data position: samples of the training stream used so far
    parallel: dict = field(default_factory=dict)  # tp, pp, cp, dp it was trained with or prepared for
    hf: dict | None = None  # the Hugging Face model it was converted from (architecture, config, dtypes, ...)

    @classmethod
    def of_run(cls, config: TrainConfig, *, iteration: int, padded_vocab_size: int, tokenizer_model: str | None,
               tokenizer_vocab_size: int | None, parallel: dict, hf: dict | None = None,
               tokenizer_fingerprint: str | None = None) -> CheckpointState:
        """The state of a model built from `config`, after `iteration` steps of its training stream."""
        groups = config.model.num_query_groups or config.model.num_attention_heads
        return cls(config=config, head_bases=config.rope.group_bases(groups).tolist(),
                   padded_vocab_size=padded_vocab_size, tokenizer_model=tokenizer_model,
                   tokenizer_vocab_size=tokenizer_vocab_size, tokenizer_fingerprint=tokenizer_fingerprint,
                   iteration=iteration,
                   consumed_samples=iteration * config.training.global_batch_size, parallel=dict(parallel), hf=hf)

    def to_json(self) -> dict:
        return {**asdict(self), "config": self.config.to_dict()}

    @classmethod
    def from_json(cls, raw: dict, where: str = "checkpoint") -> CheckpointState:
        """Read back what to_json wrote, including checkpoints written before the state was typed."""
        raw = dict(raw)
        try:
            config = from_dict(TrainConfig, _current_config_keys(raw.pop("config")), prefix="")
        except ConfigError as error:
            raise CheckpointError(f"{where}: its recorded config does not read back ({error})") from None
        known = {name for name in cls.__dataclass_fields__ if name != "config"}
        missing = {"head_bases", "padded_vocab_size"} - set(raw)
        if missing:
            raise CheckpointError(f"{where}: megatron_ext.json lacks {sorted(missing)}; is it a megatron_ext "
                                  "checkpoint?")
        return cls(config=config, **{key: value for key, value in raw.items() if key in known})

    @property
    def context_window(self) -> int:
        """The length the model was trained for: PoSE's target length, else the trained sequence length."""
        return self.config.pose.target_length if self.config.pose.enabled else self.config.model.seq_length


def _current_config_keys(config: dict) -> dict:
    """Saved configs of format 1 named the HARPE strategy `rope.head_base_strategy`; it is `rope.head_base_strategy` now."""
    rope = dict(config.get("rope") or {})
    if "head_bases" in rope:
        rope.setdefault("head_base_strategy", rope.pop("head_bases"))
    return {**config, "rope": rope} if "rope" in config else config


@dataclass
class SavedCheckpoint:
    """One checkpoint on disk as megatron_ext.json describes it."""

    path: Path  # the iter_ directory
    iteration: int
    state: CheckpointState
    optimizer: dict | None  # {"flavor": "plain" | "distributed", "has_state": bool}, None: weights only
    sharding_metadata: dict  # what sharded_state_dict needs to read the tensors back
    parallel_layout: dict  # world size and TP/PP/CP/... of the ranks that saved it
    format_version: int
    saved_at: str | None = None

    @property
    def tokenizer_path(self) -> Path | None:
        """Where this checkpoint's tokenizer is, wherever the checkpoint now lies: its own copy (recorded relative
        to it). An absolute record (older checkpoints) that points into an iter_ directory of this checkpoint's
        name, e.g. /old/place/iter_0000000/tokenizer, is read from this checkpoint's own copy when it has one, so a
        copy never reads the original's files; any other absolute path is used as it is."""
        recorded = self.state.tokenizer_model
        if not recorded:
            return None
        if not isinstance(recorded, str) or not Path(recorded).is_absolute():
            return self.inside(recorded, "state.tokenizer_model")
        path = Path(recorded)
        own = _own_copy(path, self.path)
        if own is not None:
            return own
        if path.exists() and not (path.is_dir() or stat.S_ISREG(path.stat().st_mode)):
            raise CheckpointError(f"{self.path / JSON_FILE} records state.tokenizer_model: {recorded!r}, which is "
                                  "neither a file nor a directory (a device or a pipe); is the file edited? Name the "
                                  "tokenizer yourself (data.tokenizer, --tokenizer)")
        return path

    def inside(self, recorded: str, key: str) -> Path:
        """`recorded`, a path megatron_ext.json records relative to the checkpoint (`key` names where), as a path
        inside it; a CheckpointError naming `key` if it is absolute or leads out of the checkpoint (`..`, a
        symlink): what a checkpoint carries is read only from inside it."""
        if not isinstance(recorded, str) or Path(recorded).is_absolute() or \
                not (self.path / recorded).resolve().is_relative_to(self.path.resolve()):
            raise CheckpointError(f"{self.path / JSON_FILE} records {key}: {recorded!r}, outside the checkpoint; "
                                  "megatron_ext reads what a checkpoint carries only from inside it. Is the file "
                                  "edited? Use a checkpoint megatron_ext wrote, or name the tokenizer yourself")
        return self.path / recorded


def _own_copy(recorded: Path, checkpoint: Path) -> Path | None:
    """`checkpoint`/<rest> if `recorded` is <somewhere>/<checkpoint's iter_ name>/<rest> and that exists here, inside
    the checkpoint (a <rest> with `..` in it is no copy of this checkpoint's)."""
    parts = recorded.parts
    if checkpoint.name not in parts[:-1]:
        return None
    index = len(parts) - 1 - parts[::-1].index(checkpoint.name)
    own = checkpoint.joinpath(*parts[index + 1:])
    return own if own.exists() and own.resolve().is_relative_to(checkpoint.resolve()) else None


def read_checkpoint(argument: str | Path, *, setting: str) -> SavedCheckpoint:
    """Resolve `argument` (run dir, checkpoint root, `latest`, iter_ dir) and read its megatron_ext.json.

    `setting` is how the user gave the argument (`--model`, `--ckpt`, `checkpoint.pretrained`, ...)."""
    path = resolve_checkpoint(argument, setting=setting)
    summary_file = path / JSON_FILE
    try:
        summary = json.loads(summary_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{setting} ({str(path)!r}) has no {JSON_FILE}: it is not a megatron_ext "
                              "checkpoint (convert other megatron checkpoints with `megatron-ext convert`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{setting}: {summary_file} is not readable JSON ({error})") from None
    return SavedCheckpoint(
        path=path, iteration=summary["iteration"], state=CheckpointState.from_json(summary["state"], str(path)),
        optimizer=summary.get("optimizer"), sharding_metadata=summary["sharding_metadata"],
        parallel_layout=summary.get("parallel_layout", {}), format_version=summary.get("format_version", 1),
        saved_at=summary.get("saved_at"))
