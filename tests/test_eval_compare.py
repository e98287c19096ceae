"""`megatron-ext eval compare` on tiny models converted both ways: a Hugging Face Llama and its megatron_ext
checkpoint (hf-to-mcore), a HARPE checkpoint and its Hugging Face export (mcore-to-hf). The numbers are checked
against logits computed here straight from the two networks; a deliberately wrong export is caught."""

import json
import math
import shutil

import pytest
import torch

from megatron_ext.eval.compare import evaluate_compare
from megatron_ext.eval.settings import CompareSettings, EvalSettingsError
from test_eval_support import network_logits, training_text

pytest_plugins = ["test_eval_support"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("compare") / "text.jsonl"
    lines = training_text()
    path.write_text("".join(json.dumps({"text": " ".join(lines[i:i + 12])}) + "\n" for i in range(0, 60, 12)))
    return path


@pytest.fixture(scope="module")
def llama_checkpoint(llama_dir, single_rank, tmp_path_factory):
    """The tiny Hugging Face Llama converted to a megatron_ext checkpoint."""
    from megatron_ext.convert import hf_to_mcore

    return hf_to_mcore(llama_dir, tmp_path_factory.mktemp("converted") / "llama.mcore", progress=False)


@pytest.fixture(scope="module")
def harpe_export(single_rank, sp_tokenizer, tmp_path_factory):
    """A HARPE checkpoint saved as training saves it (padded vocabulary rows) and its Hugging Face export."""
    from test_eval_vocab import HARPE, save_padded_checkpoint

    return save_padded_checkpoint(tmp_path_factory.mktemp("harpe"), sp_tokenizer, HARPE)


def expected_numbers(model, reference, settings) -> dict:
    """The comparison computed here, all documents at once: the first ones of the file, cut to max_tokens."""
    from megatron_ext.eval.perplexity import load_documents

    bos = [model.tokenizer.bos_id]
    documents = load_documents(settings.data, model.tokenizer, count=settings.num_documents,
                               max_tokens=settings.max_tokens - 1)
    own, other, targets = [], [], []
    for document in documents:
        ids = torch.tensor([bos + document])
        own.append(network_logits(model, ids).double())
        other.append(network_logits(reference, ids).double())
        targets.append(torch.cat([ids[0, 1:], torch.tensor([-1])]))
    own, other, targets = torch.cat(own), torch.cat(other), torch.cat(targets)
    scored = targets >= 0

    def perplexity(logits):
        log_probs = logits.log_softmax(-1)[scored]
        return math.exp(-log_probs.gather(-1, targets[scored, None]).mean().item())

    return dict(max_abs_logit_diff=(own - other).abs().max().item(), positions=own.size(0),
                top1_agreement=(own.argmax(-1) == other.argmax(-1)).double().mean().item(),
                model_perplexity=perplexity(own), reference_perplexity=perplexity(other),
                scored_tokens=int(scored.sum()), documents=len(documents))


def test_a_hugging_face_model_and_its_converted_checkpoint_agree(tiny_llama, llama_checkpoint, text_file):
    from megatron_ext.eval.models import load_eval_model

    checkpoint = load_eval_model(llama_checkpoint, name="llama.mcore")
    settings = CompareSettings(data=[str(text_file)], num_documents=3, max_tokens=64)
    result = evaluate_compare(checkpoint, settings, reference=tiny_llama)
    expected = expected_numbers(checkpoint, tiny_llama, settings)

    assert (result.documents, result.positions, result.scored_tokens) == (
        expected["documents"], expected["positions"], expected["scored_tokens"]) == (3, 3 * 64, 3 * 63)
    assert result.max_abs_logit_diff == pytest.approx(expected["max_abs_logit_diff"], abs=1e-6)
    assert result.max_abs_logit_diff < 1e-4 and result.top1_agreement == 1.0  # fp32: summation order only
    assert result.model_perplexity == pytest.approx(expected["model_perplexity"], rel=1e-6)
    assert result.reference_perplexity == pytest.approx(expected["reference_perplexity"], rel=1e-6)
    assert result.tokenizers_agree and result.tokenizer_difference is None


def test_a_harpe_checkpoint_and_its_export_agree(harpe_export, text_file):
    from megatron_ext.eval.models import load_eval_model

    checkpoint, export = harpe_export
    model, reference = load_eval_model(checkpoint, name="ckpt"), load_eval_model(export, name="hf")
    settings = CompareSettings(data=[str(text_file)], num_documents=2, max_tokens=100)
    result = evaluate_compare(model, settings, reference=reference)
    expected = expected_numbers(model, reference, settings)
    assert result.positions == expected["positions"] == 200
    assert result.max_abs_logit_diff == pytest.approx(expected["max_abs_logit_diff"], abs=1e-6)
    assert result.max_abs_logit_diff < 1e-4 and result.top1_agreement == 1.0
    assert result.model_perplexity == pytest.approx(result.reference_perplexity, rel=1e-5)
    assert result.model_perplexity == pytest.approx(expected["model_perplexity"], rel=1e-6)


def test_an_export_with_the_wrong_rope_base_is_caught(harpe_export, text_file, tmp_path):
    """One wrong number in config.json (every HARPE base x 10) leaves the weights equal and the logits not."""
    from megatron_ext.eval.models import load_eval_model

    checkpoint, export = harpe_export
    broken = shutil.copytree(export, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    for rope in (config[key] for key in ("rope_parameters", "rope_scaling") if isinstance(config.get(key), dict)):
        rope["head_bases"] = [10 * base for base in rope["head_bases"]]
        rope["head_base_params"] = {name: 10 * value for name, value in rope["head_base_params"].items()}
    (broken / "config.json").write_text(json.dumps(config))
    settings = CompareSettings(data=[str(text_file)], num_documents=2, max_tokens=100)
    result = evaluate_compare(load_eval_model(checkpoint), settings, reference=load_eval_model(broken))
    assert result.max_abs_logit_diff > 0.1 and result.max_abs_logit_diff == pytest.approx(
        expected_numbers(load_eval_model(checkpoint), load_eval_model(broken), settings)["max_abs_logit_diff"],
        abs=1e-6)


def test_the_command_prints_the_table_and_writes_json(harpe_export, text_file, tmp_path, capsys):
    from megatron_ext.cli import main

    checkpoint, export = harpe_export
    assert main(["eval", "compare", "--model", str(checkpoint), "--reference", str(export), "--data",
                 str(text_file), "--num-documents", "2", "--max-tokens", "50", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| max abs logit difference |" in out and "| tokenizers give the same ids |" in out
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["task"] == "compare" and saved["positions"] == 100 and saved["max_abs_logit_diff"] < 1e-4


def test_a_missing_reference_or_text_is_refused_before_anything_runs(tiny_megatron, text_file, capsys):
    from megatron_ext.cli import main

    with pytest.raises(EvalSettingsError, match="compare needs a second model: --reference"):
        evaluate_compare(tiny_megatron, CompareSettings(data=[str(text_file)]))
    assert main(["eval", "compare", "--model", "/nonexistent", "--reference", "/nonexistent"]) == 2
    assert "compare.data is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["eval", "compare", "--model", "/nonexistent", "--data", str(text_file)])
    assert stop.value.code == 2 and "the following arguments are required: --reference" in capsys.readouterr().err


def test_a_suite_listing_compare_needs_its_reference():
    from megatron_ext.config import ConfigError
    from megatron_ext.eval.suite import suite_config_from_dict

    raw = dict(models=[{"path": "ckpt"}, {"path": "hf"}], tasks=["compare"], compare=dict(data=["{stdlib}/os.py"]))
    with pytest.raises(ConfigError, match=r"tasks \['compare'\] compare each model with a reference: set "
                                          r"attention_reference"):
        suite_config_from_dict(raw).validate()
    suite_config_from_dict(dict(raw, attention_reference="hf")).validate()


class Ids:
    """A tokenizer stand-in: only its BOS matters to tokenizer_difference."""

    def __init__(self, bos_id):
        self.bos_id = bos_id


def test_a_tokenizer_difference_is_located():
    from megatron_ext.eval.compare import tokenizer_difference

    documents = [[5, 6, 7], [8, 9, 10, 11]]
    assert tokenizer_difference(Ids(1), Ids(1), documents, [[5, 6, 7], [8, 9, 10, 11]]) is None
    assert tokenizer_difference(Ids(1), Ids(None), documents, documents) == "BOS 1 vs None"
    assert tokenizer_difference(Ids(1), Ids(1), documents, [[5, 6, 7], [8, 9, 12, 11]]) == \
        "document 1, token 2: 10 vs 12"
    assert tokenizer_difference(Ids(1), Ids(1), documents, [[5, 6, 7], [8, 9, 10]]) == \
        "document 1, token 3: 11 vs end"
