"""Sliding-window attention is dropped on both sides of the conversion, so the export runs as trained.

megatron_ext's model attends to the whole causal context. A source model's window (Mistral v0.1:
4096; Qwen2 with use_sliding_window) is therefore imported as dropped, and an exported config.json
never turns a window on: transformers' logits of the export equal megatron_ext's at every position,
including those beyond the window. Tiny fp32 models, a window of 16 over 64 tokens.
"""

import json
import logging
from pathlib import Path

import pytest
import torch

from megatron_ext.convert import hf_to_mcore, mcore_to_hf
from test_convert import assert_logits_close, hf_logits, megatron_logits

transformers = pytest.importorskip("transformers")

WINDOW, SEQ, VOCAB = 16, 64, 128

# name -> (config class, the fields that turn a window on)
WINDOWED_MODELS = {
    "mistral-v0.1": ("MistralConfig", dict(sliding_window=WINDOW)),
    "qwen2-sliding": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)),
}


def make_windowed_model(directory: Path, config_class: str, window_fields: dict) -> Path:
    config = getattr(transformers, config_class)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, rms_norm_eps=1e-5, **window_fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # large enough weights that attention is far from uniform: the window changes the logits
            param.copy_(1 + 0.1 * torch.randn_like(param) if name.endswith("norm.weight")
                        else 0.2 * torch.randn_like(param))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def converted(tmp_path_factory, single_rank):
    """Each windowed model, its megatron_ext conversion (and the log of it), its export and the logits."""
    root = tmp_path_factory.mktemp("window")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    made = {}
    for name, (config_class, window_fields) in WINDOWED_MODELS.items():
        hf_dir = make_windowed_model(root / name, config_class, window_fields)
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("megatron_ext").addHandler(handler)
        try:
            mcore = hf_to_mcore(hf_dir, root / f"{name}.mcore")
        finally:
            logging.getLogger("megatron_ext").removeHandler(handler)
        exported = mcore_to_hf(mcore, root / f"{name}.back")
        made[name] = dict(hf=hf_dir, mcore=mcore, exported=exported, log=[r.getMessage() for r in records],
                          source_logits=hf_logits(hf_dir, tokens),
                          megatron_logits=megatron_logits(mcore, tokens),
                          exported_logits=hf_logits(exported, tokens))
    return root, made


@pytest.mark.parametrize("name", WINDOWED_MODELS)
def test_the_window_matters_beyond_it_in_the_source_model(converted, name):
    """The premise: inside the window the source equals megatron_ext's full-causal model, beyond it not."""
    run = converted[1][name]
    inside, beyond = slice(0, WINDOW), slice(WINDOW, SEQ)
    assert_logits_close(run["megatron_logits"][:, inside], run["source_logits"][:, inside])
    assert (run["megatron_logits"][:, beyond] - run["source_logits"][:, beyond]).abs().max() > 0.05


@pytest.mark.parametrize("name", WINDOWED_MODELS)
def test_export_runs_as_trained_at_every_position_beyond_the_window_too(converted, name):
    run = converted[1][name]
    assert_logits_close(run["exported_logits"], run["megatron_logits"])


@pytest.mark.parametrize("name", WINDOWED_MODELS)
def test_exported_config_turns_no_window_on(converted, name):
    run = converted[1][name]
    hf = json.loads((run["exported"] / "config.json").read_text())
    assert hf["sliding_window"] is None
    if name.startswith("qwen2"):
        assert hf["use_sliding_window"] is False
        assert set(hf["layer_types"]) == {"full_attention"}


@pytest.mark.parametrize("name", WINDOWED_MODELS)
def test_import_says_in_one_line_that_the_window_is_dropped_and_records_it(converted, name):
    run = converted[1][name]
    lines = [line for line in run["log"] if "sliding_window" in line]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert f"({WINDOW})" in lines[0] and "dropped" in lines[0] and "whole context" in lines[0]
    state = json.loads((run["mcore"] / "megatron_ext.json").read_text())["state"]
    assert state["hf"]["dropped"] == {"sliding_window": WINDOW}
    assert state["hf"]["config"]["sliding_window"] == WINDOW  # the source config, as it was


def test_hf_base_config_with_a_window_is_exported_without_it(converted):
    root, made = converted
    run = made["mistral-v0.1"]
    exported = mcore_to_hf(run["mcore"], root / "with-base", hf_base=run["hf"])
    assert json.loads((exported / "config.json").read_text())["sliding_window"] is None


def test_export_as_mistral_from_a_config_without_the_key_turns_mistrals_default_window_off(converted, tmp_path):
    """MistralConfig's default is a window of 4096: a config.json without the key would turn it on."""
    root, made = converted
    run = made["mistral-v0.1"]
    base = tmp_path / "llama-base"
    base.mkdir()
    hf = json.loads((run["hf"] / "config.json").read_text())
    del hf["sliding_window"]
    (base / "config.json").write_text(json.dumps(dict(hf, architectures=["LlamaForCausalLM"], model_type="llama")))
    exported = mcore_to_hf(run["mcore"], tmp_path / "out", hf_base=base, family="mistral")
    assert json.loads((exported / "config.json").read_text())["sliding_window"] is None


def test_export_as_another_family_keeps_no_window_either(converted):
    root, made = converted
    exported = mcore_to_hf(made["mistral-v0.1"]["mcore"], root / "as-llama", family="llama")
    assert json.loads((exported / "config.json").read_text()).get("sliding_window") is None
