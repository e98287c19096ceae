"""What a run starts from, settled before any process group exists: the checkpoint to resume or the
pretrained weights, and what they say about the model.

The architecture, the sequence length and the RoPE setup follow megatron_ext/checkpoint/inherit.py (shared with
`plan` and `launch`): the checkpoint's architecture wins (a contradiction is refused), a length left out is the
checkpoint's, a `rope` section changes only the keys it names. On a resume, everything that defines the model,
its tokens or its data order must equal the checkpoint's; what may change (iterations, LR schedule, logging,
saving, layout) is applied and listed. A config that names no tokenizer reads its data with the checkpoint's; a
tokenizer with more ids than the model has embedding rows is refused. What the run took from where is logged
once, as one block (`Start.log_settings`).
Imports no megatron.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ext.checkpoint.inherit import (
    ARCHITECTURE,
    CONVERT_HINT,
    Settled,
    adopt_model,
    pretrained_checkpoint,
)
from megatron_ext.checkpoint.layout import CheckpointError, find_checkpoint
from megatron_ext.checkpoint.state import SavedCheckpoint, read_checkpoint
from megatron_ext.config import ModelConfig, TrainConfig
from megatron_ext.config.train import fixed_on_resume
from megatron_ext.sizes import matmul_parameters

log = logging.getLogger("megatron_ext")

# Settings a resumed run must share with its checkpoint: they define the model, its tokens, the positions it sees
# and the order of its data (`section` = the whole section); each config section declares which of its fields are.
FIXED_ON_RESUME = fixed_on_resume()

# Where the tokenizer is, not which it is: a resume may name another path to the same files (check_resume)
TOKENIZER_SETTINGS = ("data.tokenizer", "data.tokenizer_type", "data.tokenizer_model")

FROM_SCRATCH_LIMIT = 1e9  # parameters: a model this large is never trained from random weights by accident


@dataclass
class Start:
    """Where the run begins: a checkpoint to resume, pretrained weights, or random weights; and where each
    setting that was not the config's own came from (`settled`)."""

    resume: SavedCheckpoint | None = None
    pretrained: SavedCheckpoint | None = None
    settled: Settled = field(default_factory=Settled)

    def log_settings(self) -> None:
        """One block: the sequence length and every setting taken from the checkpoint, each with its source."""
        where = ("resuming " + str(self.resume.path) if self.resume else
                 "from the weights of " + str(self.pretrained.path) if self.pretrained else "from random weights")
        log.info(f"megatron_ext: starting {where} with\n" + "\n".join(self.settled.lines()))


def settle_start(config: TrainConfig, given: dict, *, log_settings: bool = True) -> Start:
    """Resolve checkpoint.resume / checkpoint.pretrained and bring `config` in line with the checkpoint.

    `given` is the YAML mapping with the overrides applied: what the user set explicitly. Raises a
    CheckpointError naming the setting and both values on a contradiction; `config` is changed in place.
    log_settings=False leaves the start block to another process (the `train` command logs it on rank 0 only).
    """
    start = _settle(config, given)
    if log_settings:
        start.log_settings()
    return start


def _settle(config: TrainConfig, given: dict) -> Start:
    found = find_checkpoint(config.checkpoint.dir, config.checkpoint.resume, verify=config.checkpoint.verify)
    if found is not None:
        saved = read_checkpoint(found, setting="checkpoint.resume")
        settled = adopt_model(config, given, saved, "checkpoint.resume")
        adopt_tokenizer(config, saved, "checkpoint.resume", settled)
        check_resume(config, saved)
        return Start(resume=saved, settled=settled)
    if config.checkpoint.pretrained:
        saved = pretrained_checkpoint(config)
        settled = adopt_model(config, given, saved, "checkpoint.pretrained")
        adopt_tokenizer(config, saved, "checkpoint.pretrained", settled)
        return Start(pretrained=saved, settled=settled)
    check_from_scratch(config)
    settled = Settled()
    length_given = (given.get("model") or {}).get("seq_length") is not None
    settled.add("model.seq_length", "the config" if length_given else "the default (model.seq_length)",
                config.model.seq_length)
    return Start(settled=settled)


def adopt_tokenizer(config: TrainConfig, saved: SavedCheckpoint, setting: str, settled: Settled) -> None:
    """A config naming no tokenizer (and not the tiny corpus, which trains its own) takes the checkpoint's: a
    resume its run's settings, pretrained weights the tokenizer they record (a converted model's own files).
    Then the tokenizer must fit the model's embedding."""
    data = config.data
    if data.tiny_corpus:
        return
    if data.tokenizer is None and data.tokenizer_model is None:
        recorded = saved.state.config.data
        if setting == "checkpoint.resume" and (recorded.tokenizer or recorded.tokenizer_model):
            data.tokenizer, data.tokenizer_model = recorded.tokenizer, recorded.tokenizer_model
            data.tokenizer_type = recorded.tokenizer_type
            _own_copy_if_gone(config, saved)
        elif saved.tokenizer_path is not None:
            data.tokenizer = str(saved.tokenizer_path)  # its own copy, wherever the checkpoint now lies
        else:
            return  # validate asks for one
        settled.add("tokenizer", setting, data.tokenizer or data.tokenizer_model)
    check_tokenizer_fits(config, saved, setting)


def _own_copy_if_gone(config: TrainConfig, saved: SavedCheckpoint) -> None:
    """A resumed run whose recorded tokenizer path is gone (the run was moved) reads the copy its checkpoint
    carries; check_resume accepts the other path because the files are the same (the fingerprint)."""
    _, path, _ = config.data.tokenizer_source()
    own = saved.tokenizer_path
    if path is not None and not Path(path).exists() and own is not None and own.exists():
        log.info(f"megatron_ext: the run's tokenizer {path} is gone; reading the copy {own} its checkpoint carries")
        config.data.tokenizer, config.data.tokenizer_model, config.data.tokenizer_type = str(own), None, None


def _same_tokenizer_files(config: TrainConfig, saved: SavedCheckpoint) -> bool:
    """Whether the run's tokenizer has the files the checkpoint recorded (its fingerprint), wherever they are."""
    from megatron_ext.data.tokenizer_files import open_encoder

    name, path, kind = config.data.tokenizer_source()
    recorded = saved.state.tokenizer_fingerprint
    return recorded is not None and path is not None and open_encoder(path, kind, setting=name).fingerprint() == recorded


def check_tokenizer_fits(config: TrainConfig, saved: SavedCheckpoint, setting: str) -> None:
    """Refuse a tokenizer whose ids reach past the model's vocabulary (the embedding rows it was trained with)."""
    from megatron_ext.data.tokenizer_files import TokenizerError, open_encoder

    name, path, kind = config.data.tokenizer_source()
    tokens = open_encoder(path, kind, setting=name).vocab_size
    rows = config.model.vocab_size or saved.state.padded_vocab_size
    if tokens > rows:
        raise TokenizerError(
            f"{name} ({path}) has {tokens} tokens, but the model of {setting} ({saved.path}) has a vocabulary of "
            f"{rows} (model.vocab_size; {saved.state.padded_vocab_size} padded embedding rows): its ids would index "
            f"past the embedding; use the tokenizer the model was trained with (leave {name} out to take the "
            f"checkpoint's)")


def check_resume(config: TrainConfig, saved: SavedCheckpoint) -> None:
    """Refuse a resume whose fixed settings differ from the checkpoint's; log the settings that changed."""
    vocab = saved.state.tokenizer_vocab_size
    now, then = _flat(config, vocab), _flat(saved.state.config, vocab)
    fixed = [key for key in now if any(key == f or key.startswith(f + ".") for f in FIXED_ON_RESUME)]
    differing = [key for key in fixed if now[key] != then.get(key)]
    tokenizer_paths = [key for key in differing if key in TOKENIZER_SETTINGS]
    if tokenizer_paths and _same_tokenizer_files(config, saved):  # the same tokenizer, at another path
        differing = [key for key in differing if key not in tokenizer_paths]
        log.info("megatron_ext: resuming with the same tokenizer files at another path: " + "; ".join(
            f"{key} {then.get(key)!r} -> {now[key]!r}" for key in tokenizer_paths))
    if differing:
        shown = "; ".join(f"{key}: {then.get(key)!r} in the checkpoint, {now[key]!r} now" for key in differing[:4])
        more = f" (and {len(differing) - 4} more)" if len(differing) > 4 else ""
        raise CheckpointError(
            f"checkpoint.resume ({saved.path}) was trained with other settings: {shown}{more}. These define the "
            f"model, its tokens or its data order; resume with the checkpoint's values, or start a new run "
            f"(--resume none, or a new checkpoint.dir)")
    changed = [f"{key} {then.get(key)!r} -> {now[key]!r}" for key in now
               if key not in fixed and key in then and now[key] != then[key]]
    if changed:
        log.info("megatron_ext: resuming with changed settings: " + "; ".join(changed))


def check_from_scratch(config: TrainConfig) -> None:
    """A model of FROM_SCRATCH_LIMIT parameters or more starts from random weights only when asked to."""
    parameters = model_parameters(config.model)
    if parameters >= FROM_SCRATCH_LIMIT and not config.checkpoint.from_scratch:
        raise CheckpointError(
            f"checkpoint.pretrained is not set and this {parameters / 1e9:.1f}B-parameter model would start from "
            f"random weights: set checkpoint.pretrained to the model to extend ({CONVERT_HINT}), or set "
            f"checkpoint.from_scratch: true to train from random weights")


def model_parameters(model: ModelConfig) -> int:
    """All parameters: those that multiply activations, the input embedding when untied, the norms."""
    groups = model.num_query_groups or model.num_attention_heads
    vocab = model.vocab_size or 0
    parameters = matmul_parameters(model.num_layers, model.hidden_size, model.ffn_size, model.num_attention_heads,
                                   groups, vocab, model.swiglu)
    embedding = 0 if model.tie_embeddings else vocab * model.hidden_size
    return parameters + embedding + (2 * model.num_layers + 1) * model.hidden_size


def _flat(config: TrainConfig, tokenizer_vocab_size: int | None) -> dict:
    """{'model.num_layers': 4, 'rope.base': 10000.0, ...} with the model's defaults resolved (None-valued
    sizes become the sizes they stand for); nested dicts stay whole values."""
    flat = {f"{section}.{key}": value for section, values in config.to_dict().items() for key, value in values.items()}
    model = dataclasses.replace(config.model, vocab_size=config.model.vocab_size or tokenizer_vocab_size)
    flat.update({f"model.{key}": value_of(model) for key, value_of in ARCHITECTURE.items()})
    return flat
