"""An export's max_position_embeddings is the context the checkpoint was trained for, whatever the config.json
it starts from says, and the export says where the number comes from. A continual-pretraining run that leaves
model.seq_length out trains at (and so exports) the context its pretrained checkpoint records, not the 256-token
default."""
import json
import logging

import pytest
import torch

from megatron_ext.config import TrainConfig
from megatron_ext.convert.adapters import adapter_for_family, exported_context
from megatron_ext.rope import RopeConfig


def llama(seq_length: int) -> TrainConfig:
    config = TrainConfig()
    m = config.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups = 2, 64, 4, 2
    m.ffn_hidden_size, m.vocab_size, m.seq_length = 96, 300, seq_length
    return config


def config_json(config: TrainConfig, source: dict | None = None) -> dict:
    return adapter_for_family("llama").hf_config(config, vocab_size=300, dtype=torch.float32, source=source,
                                                 rope_form=None, special_tokens={})


def test_an_extended_model_exports_its_trained_length_over_its_base_configs():
    base = config_json(llama(4096))  # the Llama-2-shaped model the extension started from, passed as --hf-base
    assert base["max_position_embeddings"] == 4096
    assert config_json(llama(32768), source=base)["max_position_embeddings"] == 32768


def test_pose_exports_its_target_and_dynamic_ntk_its_original_length():
    pose = llama(256)
    pose.pose.enabled, pose.pose.target_length = True, 4096
    assert exported_context(pose) == (4096, "pose.target_length (PoSE trained positions up to it in 256-token "
                                            "windows)")
    dynamic = llama(8192)
    dynamic.rope = RopeConfig(scaling="dynamic", scaling_params={"factor": 2.0, "original_max_position_embeddings": 2048})
    assert config_json(dynamic)["max_position_embeddings"] == 2048  # transformers reads the original length there


def test_continual_pretraining_without_a_length_exports_the_converted_context(tmp_path):
    from test_start import write_checkpoint

    from megatron_ext.config import from_dict
    from megatron_ext.training.start import settle_start

    converted = write_checkpoint(tmp_path / "converted", llama(131072))  # as hf-to-mcore records Llama-3.1
    given = {"checkpoint": {"dir": str(tmp_path / "run"), "pretrained": str(converted)}}  # no model.seq_length
    trained = from_dict(TrainConfig, json.loads(json.dumps(given)), prefix="")
    settle_start(trained, given)
    assert trained.model.seq_length == 131072
    assert config_json(trained)["max_position_embeddings"] == 131072


@pytest.mark.slow
def test_mcore_to_hf_writes_and_names_the_trained_context(tmp_path, single_rank, caplog):
    """A checkpoint trained at 1024 from a model whose config.json said 128: the export says 1024, and why."""
    from megatron_ext.checkpoint.store import save_checkpoint
    from megatron_ext.convert import mcore_to_hf
    from megatron_ext.models.builder import build_gpt
    from megatron_ext.models.init import layout_independent_init

    config = llama(1024)
    model = build_gpt(config, 384, torch.device("cpu"))
    layout_independent_init(model, seed=0)
    source = config_json(llama(128))
    state = dict(iteration=3, config=config.to_dict(), head_bases=config.rope.group_bases(2).tolist(),
                 padded_vocab_size=384, tokenizer_model=None, tokenizer_vocab_size=300)
    save_checkpoint(tmp_path / "ckpt", 3, model=[model], state=state)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(source))
    with caplog.at_level(logging.INFO, logger="megatron_ext"):
        exported = mcore_to_hf(tmp_path / "ckpt", tmp_path / "hf", hf_base=tmp_path / "base")
    assert json.loads((exported / "config.json").read_text())["max_position_embeddings"] == 1024
    assert ("max_position_embeddings 1024: model.seq_length (the length it was trained at) of "
            f"{tmp_path / 'ckpt' / 'iter_0000003'}; the source config.json said 128") in caplog.text
