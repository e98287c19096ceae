"""What a run starts from (megatron_ext/training/start.py): the checkpoint's architecture wins, a contradiction is
refused by name, RoPE follows the config's `rope` section or else the checkpoint, a resume keeps what defines the
model and its data, and a large model never starts from random weights by accident.

Checkpoints here are their records only (an iter_ directory with `complete` and megatron_ext.json): the decisions
are made from those before any tensor is read.
"""
import json
import logging
from pathlib import Path

import pytest

from megatron_ext.checkpoint.layout import CheckpointError
from megatron_ext.checkpoint.state import CheckpointState
from megatron_ext.cli import main
from megatron_ext.config import TrainConfig, from_dict
from megatron_ext.rope import RopeConfig
from megatron_ext.training.start import check_from_scratch, model_parameters, settle_start

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "examples" / "configs").glob("*_128k.yaml"))  # the 7B/8B recipes


def qwen2_like() -> TrainConfig:
    """What `convert hf-to-mcore` records for a small Qwen2: q/k/v biases, tied embeddings, rope_theta 1e6."""
    config = TrainConfig()
    m = config.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups = 2, 64, 8, 2
    m.ffn_hidden_size, m.vocab_size, m.norm_epsilon = 96, 500, 1e-6
    m.qkv_bias, m.tie_embeddings = True, True
    config.rope = RopeConfig(base=1e6)
    return config


def write_checkpoint(root: Path, config: TrainConfig, iteration: int = 0) -> Path:
    state = CheckpointState.of_run(config, iteration=iteration, padded_vocab_size=512, tokenizer_model=None,
                                   tokenizer_vocab_size=config.model.vocab_size, parallel={})
    path = root / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    (path / "complete").write_text(path.name)
    (path / "megatron_ext.json").write_text(json.dumps({
        "format_version": 1, "iteration": iteration, "optimizer": None, "sharding_metadata": {},
        "parallel_layout": {"world_size": 1}, "state": state.to_json()}))
    (root / "latest").write_text(path.name)
    return path


def run_config(given: dict) -> TrainConfig:
    return from_dict(TrainConfig, json.loads(json.dumps(given)), prefix="")


@pytest.fixture
def pretrained(tmp_path):
    return write_checkpoint(tmp_path / "converted", qwen2_like())


def test_a_config_without_a_model_section_takes_the_checkpoints_architecture_and_rope(tmp_path, pretrained):
    given = {"model": {"seq_length": 128}, "checkpoint": {"dir": str(tmp_path / "run"), "pretrained": str(pretrained)}}
    config = run_config(given)
    start = settle_start(config, given)
    source = qwen2_like()
    assert start.pretrained.path == pretrained and start.resume is None
    assert (config.model.qkv_bias, config.model.tie_embeddings, config.model.norm_epsilon) == (True, True, 1e-6)
    assert (config.model.num_query_groups, config.model.ffn_hidden_size, config.model.vocab_size) == (2, 96, 500)
    assert config.model.seq_length == 128  # the training window is the run's own
    assert config.rope == source.rope and config.rope.base == 1e6  # no rope section: the source's, not 10000


def test_an_explicit_value_that_contradicts_the_checkpoint_is_refused_naming_both(tmp_path, pretrained):
    given = {"model": {"qkv_bias": False}, "checkpoint": {"dir": str(tmp_path / "run"), "pretrained": str(pretrained)}}
    with pytest.raises(CheckpointError, match=r"^model\.qkv_bias: the config says False, the checkpoint "
                                              r"checkpoint\.pretrained \(.*\) says True"):
        settle_start(run_config(given), given)


def test_an_explicit_value_that_agrees_is_accepted(tmp_path, pretrained):
    given = {"model": {"num_layers": 2, "qkv_bias": True, "vocab_size": 500},
             "checkpoint": {"dir": str(tmp_path / "run"), "pretrained": str(pretrained)}}
    config = run_config(given)
    settle_start(config, given)
    assert config.model.tie_embeddings


LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


@pytest.fixture
def llama31(tmp_path):
    """A converted Llama-3.1-shaped checkpoint: base 500000 with llama3 scaling, a 131072-token context."""
    source = qwen2_like()
    source.model.seq_length = 131072
    source.rope = RopeConfig(base=500000.0, scaling="llama3", scaling_params=dict(LLAMA3_SCALING))
    return write_checkpoint(tmp_path / "llama31", source), source


def settled_from(tmp_path, checkpoint, **sections) -> TrainConfig:
    given = {**sections, "checkpoint": {"dir": str(tmp_path / "run"), "pretrained": str(checkpoint)}}
    config = run_config(given)
    settle_start(config, given)
    return config


def test_a_config_without_a_rope_section_keeps_the_checkpoints_rope(tmp_path, llama31):
    path, source = llama31
    assert settled_from(tmp_path, path).rope == source.rope


def test_harpe_keys_alone_keep_the_checkpoints_llama3_scaling_and_base(tmp_path, llama31, caplog):
    path, source = llama31
    harpe = {"head_base_strategy": "uniform", "head_base_params": {"b_min": 1e6, "b_max": 5e6}}
    with caplog.at_level(logging.INFO, logger="megatron_ext"):
        config = settled_from(tmp_path, path, rope=harpe)
    assert config.rope == RopeConfig(base=500000.0, scaling="llama3", scaling_params=LLAMA3_SCALING, **harpe)
    assert config.rope.group_bases(2).tolist() == [1e6, 5e6]
    assert ("RoPE from checkpoint.pretrained with rope.head_base_params, rope.head_base_strategy of the config: "
            "base 500000, scaling llama3 factor=8.0") in caplog.text
    assert "HARPE uniform bases per KV group [1e+06, 5e+06] (was: base 500000, scaling llama3" in caplog.text


def test_dropping_the_scaling_takes_saying_so(tmp_path, llama31):
    path, _ = llama31
    config = settled_from(tmp_path, path, rope={"scaling": "default", "head_base_strategy": "uniform",
                                                "head_base_params": {"b_min": 1e6, "b_max": 5e6}})
    assert (config.rope.scaling, config.rope.scaling_params, config.rope.base) == ("default", {}, 500000.0)


def test_another_scaling_takes_none_of_the_checkpoints_scaling_parameters(tmp_path, llama31):
    path, _ = llama31
    config = settled_from(tmp_path, path, rope={"scaling": "yarn", "scaling_params": {
        "factor": 4.0, "original_max_position_embeddings": 131072}})
    assert config.rope.scaling_params == {"factor": 4.0, "original_max_position_embeddings": 131072}
    with pytest.raises(ValueError, match="factor"):  # yarn without parameters: llama3's are not yarn's
        settled_from(tmp_path, path, rope={"scaling": "yarn"}).rope.validate(num_attention_heads=8)


def test_a_length_left_out_is_the_context_the_pretrained_checkpoint_records(tmp_path, llama31, caplog):
    path, _ = llama31
    with caplog.at_level(logging.INFO, logger="megatron_ext"):
        config = settled_from(tmp_path, path)
    assert config.model.seq_length == 131072  # not the dataclass default, 256
    assert "model.seq_length from checkpoint.pretrained: 131072 (the context it records" in caplog.text
    assert settled_from(tmp_path, path, model={"seq_length": 8192}).model.seq_length == 8192


def test_a_pose_trained_checkpoint_records_its_target_as_its_context(tmp_path):
    source = qwen2_like()
    source.model.seq_length, source.pose.enabled, source.pose.target_length = 128, True, 1024
    path = write_checkpoint(tmp_path / "pose", source)
    assert settled_from(tmp_path, path).model.seq_length == 1024


def test_the_start_block_lists_every_setting_taken_from_the_checkpoint_with_its_source(tmp_path, pretrained, caplog):
    given = {"model": {"num_layers": 2, "seq_length": 64}, "data": {"tokenizer": None},
             "checkpoint": {"dir": str(tmp_path / "run"), "pretrained": str(pretrained)}}
    with caplog.at_level(logging.INFO, logger="megatron_ext"):
        settle_start(run_config(given), given)
    block = [r.getMessage() for r in caplog.records if r.getMessage().startswith("megatron_ext: starting")]
    assert len(block) == 1
    lines = block[0].splitlines()
    assert lines[0] == f"megatron_ext: starting from the weights of {pretrained} with"
    assert lines[1] == ("  model from checkpoint.pretrained: hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, "
                        "num_query_groups=2, vocab_size=500, normalization=RMSNorm, norm_epsilon=1e-06, swiglu=True, "
                        "tie_embeddings=True, qkv_bias=True")
    assert lines[2] == "  model from the config (as checkpoint.pretrained says): num_layers=2"
    assert lines[3] == "  model.seq_length from the config: 64 (checkpoint.pretrained records a context of 256)"
    assert lines[4] == "  RoPE from checkpoint.pretrained: base 1e+06, scaling default"


def test_a_run_from_scratch_says_where_its_length_comes_from(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="megatron_ext"):
        settle_start(run_config({"checkpoint": {"dir": str(tmp_path)}}), {})
    assert "megatron_ext: starting from random weights with\n  model.seq_length from the default " \
           "(model.seq_length): 256" in caplog.text


def resumable_run(tmp_path) -> dict:
    config = qwen2_like()
    config.model.seq_length = 128
    config.checkpoint.dir = str(tmp_path / "run")
    config.training.train_iters = 10
    write_checkpoint(tmp_path / "run", config, iteration=10)
    return config.to_dict()


def test_a_resume_that_leaves_the_length_out_keeps_its_runs_length(tmp_path):
    given = resumable_run(tmp_path)
    del given["model"]["seq_length"]
    config = run_config(given)
    settle_start(config, given)
    assert config.model.seq_length == 128


def test_resuming_with_another_training_window_is_refused(tmp_path):
    given = resumable_run(tmp_path)
    given["model"]["seq_length"] = 512
    with pytest.raises(CheckpointError, match=r"model\.seq_length: 128 in the checkpoint, 512 now.*--resume none"):
        settle_start(run_config(given), given)


def test_resuming_with_other_rope_bases_is_refused(tmp_path):
    given = resumable_run(tmp_path)
    given["rope"]["base"] = 10000.0
    with pytest.raises(CheckpointError, match=r"rope\.base: 1000000\.0 in the checkpoint, 10000\.0 now"):
        settle_start(run_config(given), given)


def test_resuming_with_more_iterations_goes_on_and_says_what_changed(tmp_path, caplog):
    given = resumable_run(tmp_path)
    given["training"]["train_iters"] = 20
    config = run_config(given)
    with caplog.at_level(logging.INFO, logger="megatron_ext"):
        start = settle_start(config, given)
    assert start.resume.iteration == 10 and config.training.train_iters == 20
    assert "resuming with changed settings: training.train_iters 10 -> 20" in caplog.text


def test_a_7b_model_needs_pretrained_weights_or_an_explicit_from_scratch():
    config = TrainConfig()
    m = config.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size, m.vocab_size = 32, 4096, 32, 11008, 32000
    assert model_parameters(m) == 6_738_415_616  # Llama-2-7B's published count
    with pytest.raises(CheckpointError, match=r"6\.7B-parameter model would start from random weights: set "
                                              r"checkpoint\.pretrained .*megatron-ext convert hf-to-mcore.*"
                                              r"checkpoint\.from_scratch: true"):
        check_from_scratch(config)
    config.checkpoint.from_scratch = True
    check_from_scratch(config)


def test_a_tiny_model_starts_from_scratch_without_the_flag():
    check_from_scratch(TrainConfig())  # 4 layers x 128: well under 1B


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_each_7b_recipe_without_its_converted_checkpoint_is_refused_before_any_work(recipe, capsys, tmp_path):
    import yaml

    pretrained = yaml.safe_load(recipe.read_text())["checkpoint"]["pretrained"]
    code = main(["train", "--config", str(recipe), "--set", f"checkpoint.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"megatron-ext train: checkpoint.pretrained ('{pretrained}') does not exist")
    assert "megatron-ext convert hf-to-mcore --hf" in err
    assert not (tmp_path / "run").exists()


def test_a_config_given_whole_checks_its_architecture_and_lets_null_sizes_stand_for_the_checkpoints(tmp_path):
    """`train(config)` called from Python counts every setting as given: nulls stand for derived sizes."""
    source = qwen2_like()
    source.model.vocab_size = None  # recorded as the tokenizer's (500)
    path = write_checkpoint(tmp_path / "converted", source)
    config = qwen2_like()
    config.model.vocab_size, config.checkpoint.pretrained = None, str(path)
    config.checkpoint.dir = str(tmp_path / "run")
    settle_start(config, config.to_dict())
    assert config.model.vocab_size is None
    config.model.num_layers = 3
    with pytest.raises(CheckpointError, match="model.num_layers: the config says 3, .* says 2"):
        settle_start(config, config.to_dict())


def test_every_setting_says_whether_a_resume_may_change_it():
    """Each config section declares its resume class: the whole section (ON_RESUME) or every field in exactly one
    of FIXED_ON_RESUME / FREE_ON_RESUME. A new field without a class fails here, not silently on a resume."""
    import dataclasses

    from megatron_ext.config.train import FIXED, FREE

    for section in dataclasses.fields(TrainConfig):
        kind = section.default_factory
        names = {f.name for f in dataclasses.fields(kind)}
        if getattr(kind, "ON_RESUME", None) in (FIXED, FREE):
            assert not hasattr(kind, "FIXED_ON_RESUME") and not hasattr(kind, "FREE_ON_RESUME"), section.name
            continue
        fixed, free = set(kind.FIXED_ON_RESUME), set(kind.FREE_ON_RESUME)
        assert not fixed & free, f"{section.name}: {sorted(fixed & free)} are both fixed and free"
        assert fixed | free == names, f"{section.name}: no resume class for {sorted(names - fixed - free)}"


def test_the_fixed_settings_are_those_that_define_the_model_its_tokens_and_its_data_order():
    from megatron_ext.training.start import FIXED_ON_RESUME

    assert set(FIXED_ON_RESUME) == {
        "model", "rope", "pose", "data.train_data", "data.train_data_weights", "data.tokenizer",
        "data.tokenizer_type", "data.tokenizer_model", "data.document_mask", "data.mask_eod_loss",
        "data.add_extra_token", "data.answer_only_loss", "data.tiny_corpus", "data.tiny_corpus_documents",
        "data.tiny_corpus_passkey_prompts", "data.tokenizer_vocab_size", "data.upsample", "data.split",
        "training.seed", "training.global_batch_size", "training.rampup_batch_size", "training.precision",
        "optimizer.adam_beta1", "optimizer.adam_beta2", "optimizer.adam_eps"}


def test_every_model_field_is_architecture_or_how_the_run_trains():
    """ModelConfig.ARCHITECTURE (fixed by a checkpoint's weights) and ModelConfig.TRAINING split its fields: a new
    field without a side fails here instead of being silently left out of the checkpoint comparison."""
    import dataclasses

    from megatron_ext.config import ModelConfig

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    architecture, training = set(ModelConfig.ARCHITECTURE), set(ModelConfig.TRAINING)
    assert not architecture & training and architecture | training == names
    model = ModelConfig(hidden_size=576, num_attention_heads=9, num_query_groups=None, ffn_hidden_size=None)
    assert model.architecture()["num_query_groups"] == 9 and model.architecture()["ffn_hidden_size"] == 1536
