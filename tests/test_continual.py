"""Continual pretraining keeps the model it starts from, end to end: a Qwen2 with q/k/v biases, tied embeddings
and rope_theta 1e6, converted, trained 3 steps from `checkpoint.pretrained` by a config with no model and no
rope section, resumed for one more step, and exported: transformers' logits of the export equal megatron's,
and the biases, the tying and the base are still there."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megatron_ext.cli import main

pytestmark = pytest.mark.slow  # end to end: real runs in child processes (make test-fast skips them)

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 500  # the tiny corpus tokenizer's size below, so the converted model reads its tokens


def make_qwen2(directory: Path) -> Path:
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                                      max_position_embeddings=128, rms_norm_eps=1e-6,
                                      rope_parameters=dict(rope_type="default", rope_theta=1e6))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():  # every tensor random, biases and norms too
            param.copy_(1 + 0.1 * torch.randn_like(param) if name.endswith("norm.weight") else
                        0.05 * torch.randn_like(param))
    model.save_pretrained(directory)
    return directory


def train(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "megatron_ext.cli", "train", "--config", str(config), *extra],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Convert, train 3 steps from the converted weights, resume to 4; the paths and the train logs."""
    from megatron_ext.convert import hf_to_mcore

    work = tmp_path_factory.mktemp("continual")
    converted = hf_to_mcore(make_qwen2(work / "qwen2"), work / "converted")
    config = work / "extend.yaml"
    config.write_text(yaml.safe_dump({  # no model section but the window, no rope section
        "model": {"seq_length": 64},
        "data": {"tiny_corpus": True, "tiny_corpus_documents": 60, "tokenizer_vocab_size": VOCAB,
                 "cache_dir": str(work / "cache")},
        "training": {"train_iters": 3, "micro_batch_size": 2, "global_batch_size": 4},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_iters": 1},
        "checkpoint": {"dir": str(work / "run"), "save_interval": 1, "pretrained": str(converted)},
        "logging": {"tensorboard_dir": None, "metrics_file": str(work / "metrics.jsonl"), "progress_bar": False},
    }))
    first = train(config)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = train(config, "--set", "training.train_iters=4", "--set", "optimizer.lr=5e-4",
                   "--set", "optimizer.min_lr=5e-4")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return dict(work=work, config=config, converted=converted, logs=first.stderr + first.stdout,
                resumed_logs=second.stderr + second.stdout)


def test_the_run_starts_from_the_converted_weights_with_the_sources_rope(run):
    assert f"starting from the weights of {run['converted']}" in run["logs"]
    assert "RoPE from checkpoint.pretrained: base 1e+06, scaling default" in run["logs"]


def test_a_resume_with_more_iterations_and_another_lr_applies_both(run):
    rows = [json.loads(line) for line in (run["work"] / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4]
    assert rows[-1]["lr"] == pytest.approx(5e-4, rel=1e-9)  # the config's range (5e-4 .. 5e-4), not the checkpoint's
    assert rows[2]["lr"] != pytest.approx(5e-4)
    assert "resuming with changed settings: training.train_iters 3 -> 4; optimizer.lr 0.001 -> 0.0005; " \
           "optimizer.min_lr 0.0001 -> 0.0005" in run["resumed_logs"]


def test_the_trained_model_keeps_biases_tying_and_base_and_exports_with_equal_logits(run):
    from megatron_ext.checkpoint.state import read_checkpoint
    from megatron_ext.convert import mcore_to_hf
    from megatron_ext.distributed import single_process_group
    from megatron_ext.models.builder import load_model

    saved = read_checkpoint(run["work"] / "run", setting="--ckpt")
    model_config = saved.state.config.model
    assert saved.iteration == 4 and model_config.qkv_bias and model_config.tie_embeddings
    assert saved.state.config.rope.base == 1e6

    exported = mcore_to_hf(saved.path, run["work"] / "exported")
    hf_config = json.loads((exported / "config.json").read_text())
    assert hf_config["architectures"] == ["Qwen2ForCausalLM"] and hf_config["tie_word_embeddings"]
    assert hf_config["rope_parameters"]["rope_theta"] == 1e6

    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(3))
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    trained_bias = hf.model.layers[0].self_attn.q_proj.bias.detach()
    source = transformers.AutoModelForCausalLM.from_pretrained(run["work"] / "qwen2", dtype=torch.float32)
    source_bias = source.model.layers[0].self_attn.q_proj.bias.detach()
    assert trained_bias.abs().min() > 0 and not torch.equal(trained_bias, source_bias)  # kept, and trained
    with torch.no_grad():
        expected = hf(tokens).logits
    with single_process_group():
        model, _, _ = load_model(saved.path, torch.device("cpu"))
        with torch.no_grad():
            logits = model(tokens, torch.arange(tokens.size(1)).expand_as(tokens), None)[..., :VOCAB]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_a_config_that_contradicts_the_checkpoint_is_refused_before_any_work(run, capsys):
    code = main(["train", "--config", str(run["config"]), "--set", "model.qkv_bias=false",
                 "--set", f"checkpoint.dir={run['work'] / 'other'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("megatron-ext train: model.qkv_bias: the config says False, the checkpoint "
                          "checkpoint.pretrained") and "says True" in err
    assert not (run["work"] / "other").exists()


def test_resuming_into_the_run_with_another_window_is_refused(run, capsys):
    code = main(["train", "--config", str(run["config"]), "--set", "model.seq_length=128"])
    err = capsys.readouterr().err
    assert code == 2 and "model.seq_length: 64 in the checkpoint, 128 now" in err
