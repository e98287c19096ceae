"""Training config: YAML -> dataclasses, and bad settings rejected before any work, naming the key."""

from pathlib import Path

import pytest
import yaml

from megatron_ext.config import ConfigError, TrainConfig, load_config

EXAMPLES = Path(__file__).parent.parent / "examples" / "configs"
TINY = dict(data=dict(tiny_corpus=True))


def write(tmp_path, raw):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("name", ["tiny_harpe_cpu.yaml", "tiny_pose_cpu.yaml"])
def test_tiny_examples_load(name):
    config = load_config(EXAMPLES / name)
    assert isinstance(config, TrainConfig) and config.data.tiny_corpus


def test_tiny_harpe_example_gives_one_base_per_head():
    config = load_config(EXAMPLES / "tiny_harpe_cpu.yaml")
    bases = config.rope.group_bases(config.model.num_attention_heads)
    assert bases.tolist() == [10000.0, 173333.33333333334, 336666.6666666667, 500000.0]


@pytest.mark.parametrize("name", ["llama2_7b_harpe_128k.yaml", "llama2_7b_pose_2k_to_128k.yaml"])
def test_real_recipes_are_valid_but_for_the_data_paths(name):
    """Everything checks out; only the dataset files that live on the cluster are missing."""
    with pytest.raises(ConfigError, match=r"data\.train_data: /data/.* not found"):
        load_config(EXAMPLES / name)


def test_overrides_and_defaults(tmp_path):
    config = load_config(write(tmp_path, TINY), ["optimizer.lr=1e-4", "model.num_layers=2"])
    assert config.optimizer.lr == 1e-4 and config.model.num_layers == 2
    assert config.optimizer.min_lr == TrainConfig().optimizer.min_lr


@pytest.mark.parametrize("raw, key", [
    ({"optimizer": {"lrr": 1e-3}}, "optimizer.lrr.*did you mean 'optimizer.lr'"),
    ({"modle": {}}, "unknown key 'modle'.*did you mean 'model'"),
    ({"model": {"num_layers": "four"}}, r"model.num_layers: 'four' \(a string\) is not an integer"),
    ({"model": {"num_layers": 0}}, "model.num_layers: 0 must be >= 1"),
    ({"model": {"hidden_size": 130}}, "model.hidden_size .130. must be divisible"),
    ({"model": {"num_query_groups": 3}}, "model.num_query_groups"),
    ({"parallel": {"tensor_model_parallel_size": 3}}, "parallel.tensor_model_parallel_size .3."),
    ({"parallel": {"pipeline_model_parallel_size": 3}}, "parallel.pipeline_model_parallel_size .3. must divide"),
    ({"parallel": {"context_parallel_size": 3}, "model": {"seq_length": 100}}, "model.seq_length .100."),
    ({"parallel": {"sequence_parallel": True}}, "parallel.sequence_parallel"),
    ({"training": {"global_batch_size": 7, "micro_batch_size": 2}}, "training.global_batch_size .7."),
    ({"training": {"precision": "fp8"}}, "training.precision: 'fp8'"),
    ({"training": {"recompute": "some"}}, "training.recompute"),
    ({"optimizer": {"min_lr": 1.0}}, "optimizer.min_lr"),
    ({"optimizer": {"warmup_iters": 1000}}, "optimizer.warmup_iters .1000."),
    ({"training": {"train_iters": 10}, "optimizer": {"warmup_iters": 10}}, "optimizer.warmup_iters .10. must be in .0, 10."),
    ({"optimizer": {"adam_beta2": 1.5}}, "adam_beta"),
    ({"checkpoint": {"keep_last": 0}}, "checkpoint.keep_last"),
    ({"pose": {"enabled": True, "target_length": 16}}, "pose.target_length .16. must be >= model.seq_length"),
    ({"pose": {"enabled": True, "target_length": 4096, "num_chunks": 3}}, "pose.num_chunks"),
    ({"pose": {"variant": "mine"}}, "pose.variant"),
    ({"rope": {"scaling": "superyarn"}}, "rope:.*superyarn"),
    ({"rope": {"scaling": "linear"}}, "rope:.*factor"),
    ({"rope": {"head_base_strategy": "explicit", "head_base_params": {"bases": [1e4, 2e4]}}}, "rope:"),
    ({"rope": {"head_base_strategy": "uniform", "head_base_params": {"b_min": 5e6, "b_max": 1e6}}}, "rope:.*b_max"),
    ({"data": {"tiny_corpus": False}}, "data: set exactly one"),
    ({"data": {"tiny_corpus": False, "train_data": ["/nope/x"], "tokenizer_model": "/nope/t.model"}},
     r"data.train_data: /nope/x.bin/.idx not found"),
])
def test_bad_settings_are_rejected_naming_the_key(tmp_path, raw, key):
    merged = {**TINY, **raw}
    if "data" in raw:
        merged["data"] = {**TINY["data"], **raw["data"]}
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, merged))


def test_missing_config_file_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_config(tmp_path / "nope.yaml")


def test_numbers_in_exponent_form_are_numbers_everywhere(tmp_path):
    """YAML 1.1 reads 1.0e6 and 1e6 as strings; inside a params mapping no dataclass type coerces them."""
    path = tmp_path / "harpe.yaml"
    path.write_text("rope:\n  head_base_strategy: uniform\n  head_base_params: {b_min: 1.0e6, b_max: 5e6}\n"
                    "data: {tiny_corpus: true}\noptimizer: {lr: 3e-4}\n")
    config = load_config(path, ["rope.base=1e5"])
    assert config.rope.head_base_params == {"b_min": 1e6, "b_max": 5e6} and config.rope.base == 1e5
    assert config.rope.group_bases(4).tolist() == [1e6, 1e6 + 4e6 / 3, 1e6 + 8e6 / 3, 5e6]


def test_a_renamed_setting_still_works_for_a_release_with_one_warning(tmp_path, caplog):
    """rope.head_bases was renamed rope.head_base_strategy: old configs keep training the same model."""
    harpe = {"head_base_params": {"b_min": 1e4, "b_max": 4e4}}
    old = load_config(write(tmp_path, {**TINY, "rope": {"head_bases": "uniform", **harpe}}))
    new = load_config(write(tmp_path, {**TINY, "rope": {"head_base_strategy": "uniform", **harpe}}))
    assert old.rope == new.rope and old.rope.group_bases(4).tolist() == [1e4, 2e4, 3e4, 4e4]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "'rope.head_bases' is renamed 'rope.head_base_strategy'" in warnings[0]


def test_old_and_new_name_of_a_setting_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="'rope.head_bases' and 'rope.head_base_strategy' are both set"):
        load_config(write(tmp_path, {**TINY, "rope": {"head_bases": "uniform", "head_base_strategy": "uniform"}}))


def test_did_you_mean_names_the_new_name_of_a_renamed_setting(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'rope.head_base'.*did you mean 'rope.head_base_strategy'"):
        load_config(write(tmp_path, {**TINY, "rope": {"head_base": "uniform"}}))
