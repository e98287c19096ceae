"""What a run starts from, settled before any process group exists: the checkpoint to resume or the
pretrained weights, and what they say about the model.

The checkpoint is the source of truth for the architecture: a config may leave the architecture out
(it is taken from the checkpoint) but may not contradict it. RoPE and PoSE are what an extension
changes: a config's `rope` section wins (the change is logged), none keeps the checkpoint's. On a
resume, everything that defines the model, its tokens or its data order must equal the checkpoint's;
what may change (iterations, LR schedule, logging, saving, layout) is applied and listed. A config that
names no tokenizer reads its data with the checkpoint's; a tokenizer with more ids than the model has
embedding rows is refused.
Imports no megatron.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass

from megatron_ext.checkpoint.layout import CheckpointError, find_checkpoint, resolve_checkpoint
from megatron_ext.checkpoint.state import SavedCheckpoint, read_checkpoint
from megatron_ext.config import ModelConfig, TrainConfig
from megatron_ext.sizes import matmul_parameters

log = logging.getLogger("megatron_ext")

# model.<key> -> its effective value (None-valued defaults resolved), compared with the checkpoint's
ARCHITECTURE = {
    "num_layers": lambda m: m.num_layers,
    "hidden_size": lambda m: m.hidden_size,
    "ffn_hidden_size": lambda m: m.ffn_size,
    "num_attention_heads": lambda m: m.num_attention_heads,
    "num_query_groups": lambda m: m.num_query_groups or m.num_attention_heads,
    "vocab_size": lambda m: m.vocab_size,
    "normalization": lambda m: m.normalization,
    "norm_epsilon": lambda m: m.norm_epsilon,
    "swiglu": lambda m: m.swiglu,
    "tie_embeddings": lambda m: m.tie_embeddings,
    "qkv_bias": lambda m: m.qkv_bias,
}

# Settings a resumed run must share with its checkpoint: they define the model, its tokens, the positions
# it sees and the order of its data (`section` = the whole section).
FIXED_ON_RESUME = ("model", "rope", "pose", "data.train_data", "data.train_data_weights", "data.tokenizer",
                   "data.tokenizer_type", "data.tokenizer_model", "data.document_mask", "data.mask_eod_loss",
                   "data.add_extra_token", "data.answer_only_loss",
                   "data.tiny_corpus", "data.tiny_corpus_documents", "data.tiny_corpus_passkey_prompts", "data.tokenizer_vocab_size", "data.upsample",
                   "training.seed", "training.global_batch_size", "training.precision",
                   "optimizer.adam_beta1", "optimizer.adam_beta2", "optimizer.adam_eps")

FROM_SCRATCH_LIMIT = 1e9  # parameters: a model this large is never trained from random weights by accident
CONVERT_HINT = ("make one with `megatron-ext convert hf-to-mcore --hf <Hugging Face model dir> --out <dir>` and set "
                "checkpoint.pretrained: <dir>/iter_0000000")


@dataclass
class Start:
    """Where the run begins: a checkpoint to resume, pretrained weights, or random weights."""

    resume: SavedCheckpoint | None = None
    pretrained: SavedCheckpoint | None = None


def settle_start(config: TrainConfig, given: dict) -> Start:
    """Resolve checkpoint.resume / checkpoint.pretrained and bring `config` in line with the checkpoint.

    `given` is the YAML mapping with the overrides applied: what the user set explicitly. Raises a
    CheckpointError naming the setting and both values on a contradiction; `config` is changed in place.
    """
    found = find_checkpoint(config.checkpoint.dir, config.checkpoint.resume, verify=config.checkpoint.verify)
    if found is not None:
        saved = read_checkpoint(found, setting="checkpoint.resume")
        adopt_model(config, given, saved, "checkpoint.resume")
        adopt_tokenizer(config, saved, "checkpoint.resume")
        check_resume(config, saved)
        return Start(resume=saved)
    if config.checkpoint.pretrained:
        try:
            path = resolve_checkpoint(config.checkpoint.pretrained, setting="checkpoint.pretrained")
        except FileNotFoundError as error:
            raise type(error)(f"{error}; {CONVERT_HINT}") from None
        saved = read_checkpoint(path, setting="checkpoint.pretrained")
        config.checkpoint.pretrained = str(saved.path)
        adopt_model(config, given, saved, "checkpoint.pretrained")
        adopt_tokenizer(config, saved, "checkpoint.pretrained")
        return Start(pretrained=saved)
    check_from_scratch(config)
    return Start()


def adopt_model(config: TrainConfig, given: dict, saved: SavedCheckpoint, setting: str) -> None:
    """Architecture from the checkpoint (a contradicting explicit value is refused); RoPE from the config's
    `rope` section if it has one, else from the checkpoint; the change, if any, logged in one line."""
    source = saved.state.config
    source_model = dataclasses.replace(source.model, vocab_size=source.model.vocab_size
                                       or saved.state.tokenizer_vocab_size)
    # a null (vocab_size, num_query_groups, ffn_hidden_size) means "the size it stands for": not a value given
    explicit = {key: value for key, value in (given.get("model") or {}).items() if value is not None}
    for key, value_of in ARCHITECTURE.items():
        theirs = value_of(source_model)
        if key in explicit and value_of(config.model) != theirs:
            raise CheckpointError(
                f"model.{key}: the config says {value_of(config.model)!r}, the checkpoint {setting} "
                f"({saved.path}) says {theirs!r}: drop model.{key} from the config (the checkpoint's architecture "
                f"is used) or start from another checkpoint")
        setattr(config.model, key, getattr(source_model, key))
    groups = config.model.num_query_groups or config.model.num_attention_heads
    if "rope" not in given:
        config.rope = copy.deepcopy(source.rope)
        log.info(f"megatron_ext: RoPE from {setting}: {config.rope.describe(groups)}")
    elif config.rope != source.rope:
        log.info(f"megatron_ext: RoPE: {source.rope.describe(groups)} -> {config.rope.describe(groups)}")


def adopt_tokenizer(config: TrainConfig, saved: SavedCheckpoint, setting: str) -> None:
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
        elif saved.state.tokenizer_model:
            data.tokenizer = saved.state.tokenizer_model
        else:
            return  # validate asks for one
        log.info(f"megatron_ext: tokenizer from {setting}: {data.tokenizer or data.tokenizer_model}")
    check_tokenizer_fits(config, saved, setting)


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
