"""The typed checkpoint record (megatron_ext/checkpoint/state.py) and the one resolver of checkpoint arguments.

No tensors are written: a checkpoint here is an iter_ directory with its `complete` marker and a
megatron_ext.json, which is all the resolver and the reader look at.
"""
import json

import pytest

from megatron_ext.checkpoint.layout import CheckpointError, CheckpointNotFound, resolve_checkpoint
from megatron_ext.checkpoint.state import CheckpointState, read_checkpoint
from megatron_ext.config import TrainConfig
from megatron_ext.errors import UserError
from megatron_ext.rope import RopeConfig


def harpe_config() -> TrainConfig:
    config = TrainConfig()
    config.model.num_attention_heads, config.model.num_query_groups = 8, 2
    config.rope = RopeConfig(head_base_strategy="uniform", head_base_params={"b_min": 1e4, "b_max": 1e6})
    config.training.global_batch_size = 16
    return config


def write_checkpoint(root, iteration: int, state: dict, latest: bool = True):
    path = root / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    (path / "complete").write_text(path.name + "\n")
    summary = {"format_version": 1, "iteration": iteration, "optimizer": None, "scheduler": None,
               "sharding_metadata": {"distrib_optim_sharding_type": "fully_reshardable"},
               "parallel_layout": {"world_size": 1, "tensor": 1, "pipeline": 1}, "state": state,
               "saved_at": "2026-12-01T12:00:00+0000"}
    (path / "megatron_ext.json").write_text(json.dumps(summary))
    if latest:
        (root / "latest").write_text(path.name + "\n")
    return path


def test_state_of_a_run_records_one_base_per_kv_group_and_the_data_position():
    state = CheckpointState.of_run(harpe_config(), iteration=30, padded_vocab_size=2048, tokenizer_model="/t.model",
                                   tokenizer_vocab_size=2000, parallel=dict(tp=2, pp=1, cp=1, dp=4))
    assert state.head_bases == [1e4, 1e6]  # uniform over 2 KV groups: b_min and b_max
    assert state.consumed_samples == 30 * 16
    assert state.context_window == TrainConfig().model.seq_length


def test_state_round_trips_through_json():
    state = CheckpointState.of_run(harpe_config(), iteration=3, padded_vocab_size=512, tokenizer_model=None,
                                   tokenizer_vocab_size=None, parallel=dict(tp=1, pp=1, cp=1, dp=1),
                                   hf=dict(architecture="LlamaForCausalLM"))
    back = CheckpointState.from_json(json.loads(json.dumps(state.to_json())))
    assert back == state


def test_a_format_1_checkpoint_naming_the_strategy_head_bases_still_reads():
    raw = CheckpointState.of_run(harpe_config(), iteration=1, padded_vocab_size=512, tokenizer_model=None,
                                 tokenizer_vocab_size=None, parallel={}).to_json()
    rope = raw["config"]["rope"]
    rope["head_bases"] = rope.pop("head_base_strategy")  # how format 1 wrote it
    back = CheckpointState.from_json(raw)
    assert back.config.rope.head_base_strategy == "uniform" and back.head_bases == [1e4, 1e6]


@pytest.mark.parametrize("given", ["iter", "root", "latest", "run"])
def test_one_resolver_takes_an_iter_dir_a_root_its_latest_or_a_run_dir(tmp_path, given):
    root = tmp_path / "run" / "checkpoints"
    state = CheckpointState.of_run(TrainConfig(), iteration=0, padded_vocab_size=256, tokenizer_model=None,
                                   tokenizer_vocab_size=None, parallel={}).to_json()
    write_checkpoint(root, 10, state, latest=False)
    newest = write_checkpoint(root, 20, state)
    argument = dict(iter=newest, root=root, latest=root / "latest", run=tmp_path / "run")[given]
    assert resolve_checkpoint(argument, setting="--model") == newest
    assert read_checkpoint(argument, setting="--model").iteration == 20


@pytest.mark.parametrize("setting", ["--model", "--ckpt", "checkpoint.pretrained"])
def test_errors_name_the_setting_in_use(tmp_path, setting):
    with pytest.raises(CheckpointNotFound, match=f"^{setting} .* does not exist"):
        resolve_checkpoint(tmp_path / "gone", setting=setting)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"^{setting} .* holds no complete megatron_ext checkpoint"):
        resolve_checkpoint(tmp_path / "empty", setting=setting)


def test_a_checkpoint_without_our_record_is_refused_by_name(tmp_path):
    foreign = tmp_path / "iter_0000005"
    foreign.mkdir()
    (foreign / "metadata.json").write_text("{}")  # megatron's marker alone no longer makes it complete
    with pytest.raises(CheckpointError, match="--ckpt .* is not a complete checkpoint") as caught:
        read_checkpoint(foreign, setting="--ckpt")
    assert isinstance(caught.value, UserError)
    (foreign / "complete").write_text(foreign.name)
    with pytest.raises(CheckpointError, match="--ckpt .* has no megatron_ext.json") as caught:
        read_checkpoint(foreign, setting="--ckpt")
    assert isinstance(caught.value, UserError)
