"""Evaluation sees what was trained: a megatron_ext checkpoint and its Hugging Face export (`convert mcore-to-hf`)
score the same. The checkpoint's vocabulary is padded for TP=2 (1003 -> 1024 rows, the padding rows non-zero), the
export keeps 1003 rows; a HARPE export (rope_type 'harpe') loads for every task, as --model and as --reference."""

import json
from pathlib import Path

import pytest
import torch

from megatron_ext.eval.models import HFCausalLM, MegatronExtModel, load_eval_model
from megatron_ext.rope import RopeConfig
from test_eval_support import MAX_LENGTH, training_text

pytest_plugins = ["test_eval_support"]

VOCAB = 1003  # the model's vocabulary (more rows than the tokenizer's 600 pieces, as many HF models have)
PADDED = 1024  # megatron's rows for TP=2: a multiple of 128 x 2
HARPE = RopeConfig(head_base_strategy="uniform", head_base_params={"b_min": 1e3, "b_max": 1e5})


def save_padded_checkpoint(root, tokenizer, rope: RopeConfig):
    """A 2-layer GQA model with PADDED vocabulary rows saved as training saves it, and its Hugging Face export.

    The padding rows of the output layer get random weights as large as the real rows': a softmax that reads
    them gives other numbers."""
    from megatron_ext.checkpoint.state import CheckpointState
    from megatron_ext.checkpoint.store import save_checkpoint
    from megatron_ext.config import ModelConfig, TrainConfig
    from megatron_ext.convert import mcore_to_hf
    from megatron_ext.models.builder import build_gpt
    from megatron_ext.sizes import padded_vocab_size

    assert padded_vocab_size(VOCAB, 2) == PADDED
    config = TrainConfig(
        model=ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                          seq_length=MAX_LENGTH, init_method_std=0.1, vocab_size=VOCAB), rope=rope)
    torch.manual_seed(0)
    model = build_gpt(config, PADDED, torch.device("cpu")).eval()
    with torch.no_grad():
        output = model.output_layer.weight  # [PADDED, hidden]
        output[VOCAB:] = output[:VOCAB].std() * torch.randn_like(output[VOCAB:]) + output[:VOCAB].mean(0)
    # the checkpoint carries its tokenizer as training's do (a relative record): exports take it only from inside
    carried = f"tokenizer/{Path(tokenizer.path).name}"
    state = CheckpointState.of_run(config, iteration=5, padded_vocab_size=PADDED, parallel=dict(tp=2, pp=1),
                                   tokenizer_model=carried, tokenizer_vocab_size=tokenizer.vocab_size)
    save_checkpoint(root / "ckpt", 5, model=[model], state=state.to_json(),
                    extra_files={carried: Path(tokenizer.path).read_bytes()})
    return root / "ckpt", mcore_to_hf(root / "ckpt", root / "hf")


@pytest.fixture(scope="module")
def plain(single_rank, sp_tokenizer, tmp_path_factory):
    """(checkpoint, export) of a model with one RoPE base: stock transformers runs the export."""
    return save_padded_checkpoint(tmp_path_factory.mktemp("plain"), sp_tokenizer, RopeConfig())


@pytest.fixture(scope="module")
def harpe(single_rank, sp_tokenizer, tmp_path_factory):
    """(checkpoint, export) of a HARPE model: one base per KV group, rope_type 'harpe' in config.json."""
    return save_padded_checkpoint(tmp_path_factory.mktemp("harpe"), sp_tokenizer, HARPE)


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    lines = training_text()
    path.write_text("".join(json.dumps({"text": " ".join(lines[i:i + 12])}) + "\n" for i in range(5, 60, 12)))
    return path


def test_perplexity_of_a_padded_checkpoint_equals_that_of_its_hf_export(plain, documents):
    """Measured: 1414.00 vs 1387.47 (1.9 %) when the padding rows enter the softmax, 3e-8 relative without."""
    from megatron_ext.eval.perplexity import evaluate_perplexity
    from megatron_ext.eval.settings import PerplexitySettings

    checkpoint, exported = plain
    model = load_eval_model(checkpoint)
    assert json.loads((exported / "config.json").read_text())["vocab_size"] == VOCAB
    assert model.model.output_layer.weight.shape[0] == PADDED
    assert model.model.output_layer.weight[VOCAB:].abs().min() > 0  # padding rows that would change a softmax
    settings = PerplexitySettings(data=[str(documents)], lengths=[64, 160], stride=48, num_documents=4)
    megatron = evaluate_perplexity(model, settings)
    hf = evaluate_perplexity(load_eval_model(exported), settings)
    assert [row.tokens for row in megatron.rows] == [row.tokens for row in hf.rows] and hf.rows[0].tokens > 300
    for ours, theirs in zip(megatron.rows, hf.rows):
        assert ours.perplexity == pytest.approx(theirs.perplexity, rel=1e-4)


def test_logits_cover_the_real_vocabulary_at_every_row(plain):
    """The checkpoint's logits are the export's (transformers), chosen rows included; the argmax of a greedy
    answer can never be a padding row."""
    checkpoint, exported = plain
    megatron, hf = load_eval_model(checkpoint), load_eval_model(exported)
    assert (megatron.vocab_size, hf.vocab_size) == (VOCAB, VOCAB)
    tokens = torch.randint(0, 600, (2, 40), generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([0, 17, 39])
    torch.testing.assert_close(megatron.logits(tokens), hf.logits(tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(megatron.logits(tokens, rows=rows), hf.logits(tokens, rows=rows), rtol=1e-5, atol=1e-5)


def test_a_harpe_export_loads_for_evaluation_with_the_checkpoints_logits(harpe):
    checkpoint, exported = harpe
    assert json.loads((exported / "config.json").read_text())["rope_scaling"]["rope_type"] == "harpe"
    hf, megatron = load_eval_model(exported, name="export"), load_eval_model(checkpoint)
    assert isinstance(hf, HFCausalLM) and isinstance(megatron, MegatronExtModel)
    assert hf.model.config._attn_implementation == "sdpa"
    tokens = torch.randint(0, 600, (2, 96), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(hf.logits(tokens), megatron.logits(tokens), rtol=1e-5, atol=1e-5)


def test_a_harpe_exports_captured_attention_is_the_checkpoints(harpe):
    """The capture wraps transformers' sdpa function: it must see q and k rotated per KV group."""
    checkpoint, exported = harpe
    hf, megatron = load_eval_model(exported), load_eval_model(checkpoint)
    tokens = torch.randint(0, 600, (1, 96), generator=torch.Generator().manual_seed(5))
    rows = torch.tensor([10, 50, 95])
    captured, expected = hf.attention_probs(tokens, rows), megatron.attention_probs(tokens, rows)
    assert len(captured) == len(expected) == 2
    for mine, theirs in zip(captured, expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_an_exports_sentencepiece_tokenizer_tokenizes_as_training_did(plain, sp_tokenizer):
    from megatron_ext.data.prompts import PASSKEY_FILLER

    text = PASSKEY_FILLER + "  The pass key is 12345.\n 0123456789 "  # leading and doubled spaces, a newline
    assert load_eval_model(plain[1]).tokenizer.encode(text) == sp_tokenizer.encode(text)


def test_the_attention_command_takes_a_harpe_export_as_model_and_as_reference(harpe, tmp_path, capsys):
    from megatron_ext.cli import main

    checkpoint, exported = harpe
    for model, reference in [(checkpoint, exported), (exported, checkpoint)]:
        assert main(["eval", "attention", "--model", str(model), "--reference", str(reference), "--lengths", "120",
                     "--trials", "1", "--output-dir", str(tmp_path)]) == 0
        result = json.loads((tmp_path / "attention.json").read_text())
        assert len(result["layers"]) == 2
        assert max(max(layer["js_divergence"]) for layer in result["layers"]) < 1e-9  # the same attention
    capsys.readouterr()
