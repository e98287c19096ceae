"""Hugging Face <-> megatron_ext conversion, checked against transformers itself.

Tiny random Llama / Mistral / Qwen2 models are made locally from transformers' config classes
(no downloads), with every weight (norms and biases included) random so that a swapped or
dropped tensor shows. References are independent: transformers' logits and its own RoPE
functions, the source files' bytes, and megatron_ext's logits for models born in megatron_ext.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.convert import ConversionError, hf_to_mcore, mcore_to_hf
from megatron_ext.rope.hf_forms import hf_rope_parameters, rope_from_hf, rope_keys, rope_to_hf
from megatron_ext.rope import RopeConfig

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("convert_checks.py")
BATCH, SEQ, VOCAB = 2, 24, 300  # 300 rows: megatron pads the vocabulary (to 384 at TP=1, 512 at TP=2)
TOKENIZER_FILES = {"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}',
                   "tokenizer_config.json": '{"tokenizer_class": "PreTrainedTokenizerFast"}',
                   "special_tokens_map.json": '{"bos_token": "<s>"}'}

# name -> (config class, config fields, weights dtype, config.json form)
MODELS = {
    "llama-gqa-llama3": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)), torch.float32, "rope_parameters"),
    "mistral-gqa": ("MistralConfig", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="default", rope_theta=1e6)), torch.float32, "rope_parameters"),
    "qwen2-bias-yarn-tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=16)),
        torch.float32, "rope_parameters"),
    # transformers 4.x's form (rope_theta + rope_scaling, torch_dtype), bf16 weights (fp32 norms) in shards
    "llama-mqa-linear-tied-bf16": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)), torch.bfloat16, "rope_scaling"),
    # dynamic NTK is active beyond max_position_embeddings (16 < SEQ)
    "llama-mha-dynamic": ("LlamaConfig", dict(num_key_value_heads=8, max_position_embeddings=16, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0)), torch.float32, "rope_parameters"),
}
PARALLEL_MODELS = ("llama-gqa-llama3", "mistral-gqa", "qwen2-bias-yarn-tied")


def make_hf_model(directory: Path, config_class: str, fields: dict, dtype, form: str, seed: int = 0) -> Path:
    config = getattr(transformers, config_class)(**{
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 8, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, **fields})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = name.endswith("norm.weight")
            param.copy_(1 + 0.1 * torch.randn_like(param) if is_norm else 0.05 * torch.randn_like(param))
    model.to(dtype)
    if dtype == torch.bfloat16:  # as some checkpoints do: norms kept in fp32
        for module_name, module in model.named_modules():
            if module_name.endswith("norm"):
                module.float()
    model.save_pretrained(directory, max_shard_size="40KB" if dtype == torch.bfloat16 else "50MB")
    for name, text in TOKENIZER_FILES.items():
        (directory / name).write_text(text)
    if form == "rope_scaling":  # rewrite config.json as transformers 4.x wrote it
        hf = json.loads((directory / "config.json").read_text())
        rope = hf.pop("rope_parameters")
        hf["rope_theta"] = rope.pop("rope_theta")
        hf["rope_scaling"] = rope
        hf["torch_dtype"] = hf.pop("dtype")
        (directory / "config.json").write_text(json.dumps(hf, indent=2))
    return directory


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def megatron_logits(checkpoint: Path, tokens: torch.Tensor) -> torch.Tensor:
    from megatron_ext.models.builder import load_model

    model, config, _ = load_model(checkpoint, torch.device("cpu"))
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
    return logits[..., : config.model.vocab_size]


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(safetensors_torch.load_file(str(path)))
    return tensors


def assert_logits_close(actual, expected):
    # fp32 on both sides; differences are summation order only
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def models(tmp_path_factory, single_rank):
    """Every HF model, its transformers logits, and its conversion at TP=1 (and TP=2 / PP=2)."""
    root = tmp_path_factory.mktemp("convert")
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, root / "tokens.pt")
    made = {}
    for seed, (name, (config_class, fields, dtype, form)) in enumerate(MODELS.items()):
        hf_dir = make_hf_model(root / name, config_class, fields, dtype, form, seed)
        made[name] = dict(hf=hf_dir, logits=hf_logits(hf_dir, tokens),
                          mcore=hf_to_mcore(hf_dir, root / f"{name}.mcore"))
        if name in PARALLEL_MODELS:
            made[name]["tp2"] = hf_to_mcore(hf_dir, root / f"{name}.tp2", tp=2)
            made[name]["pp2"] = hf_to_mcore(hf_dir, root / f"{name}.pp2", pp=2)
    return root, tokens, made


# --- hf -> mcore: the same logits as transformers ------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_hf_to_mcore_logits_match_transformers_at_tp1(models, name):
    _, tokens, made = models
    assert_logits_close(megatron_logits(made[name]["mcore"], tokens), made[name]["logits"])


@pytest.fixture(scope="module")
def parallel_logits(models):
    """One torchrun launch of two gloo ranks for every multi-rank case."""
    root, _, made = models
    cases = []
    for name in PARALLEL_MODELS:
        cases.append(dict(name=f"{name}.tp2", checkpoint=str(made[name]["tp2"]), tp=2, pp=1))
        cases.append(dict(name=f"{name}.pp2", checkpoint=str(made[name]["pp2"]), tp=1, pp=2))
    # resharding: the TP=1 checkpoint loaded into a TP=2 model
    cases.append(dict(name="reshard.tp1-to-tp2", checkpoint=str(made["llama-gqa-llama3"]["mcore"]), tp=2, pp=1))
    for case in cases:
        case["tokens"] = str(root / "tokens.pt")
    (root / "cases.json").write_text(json.dumps(cases))
    out = root / "parallel"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(root / "cases.json"), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {case["name"]: torch.load(out / f"{case['name']}.pt") for case in cases}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
@pytest.mark.parametrize("name", PARALLEL_MODELS)
def test_hf_to_mcore_logits_match_transformers_at_tp2_and_pp2(models, parallel_logits, name, layout):
    _, _, made = models
    assert_logits_close(parallel_logits[f"{name}.{layout}"][..., :VOCAB], made[name]["logits"])


@pytest.mark.distributed
def test_checkpoint_saved_for_tp1_loads_into_tp2(models, parallel_logits):
    _, _, made = models
    assert_logits_close(parallel_logits["reshard.tp1-to-tp2"][..., :VOCAB], made["llama-gqa-llama3"]["logits"])


def test_checkpoint_records_source_tokenizer_and_layout(models):
    _, _, made = models
    summary = json.loads((made["mistral-gqa"]["tp2"] / "megatron_ext.json").read_text())
    state = summary["state"]
    assert state["parallel"]["tp"] == 2 and state["config"]["parallel"]["tensor_model_parallel_size"] == 2
    assert state["padded_vocab_size"] == 512 and state["config"]["model"]["vocab_size"] == VOCAB
    assert state["hf"]["architecture"] == "MistralForCausalLM"
    assert state["tokenizer_model"] == "tokenizer"  # relative to the checkpoint: valid wherever it is moved
    tokenizer = made["mistral-gqa"]["tp2"] / state["tokenizer_model"]
    assert tokenizer.is_dir()
    for name, text in TOKENIZER_FILES.items():
        assert (tokenizer / name).read_text() == text


# --- hf -> mcore -> hf: the same files ------------------------------------------------------------

@pytest.fixture(scope="module")
def round_trips(models):
    root, _, made = models
    shard_sizes = {"llama-mqa-linear-tied-bf16": "40KB"}  # sharded like its source
    return {name: mcore_to_hf(made[name]["mcore"], root / f"{name}.back", max_shard_size=shard_sizes.get(name, "5GB"))
            for name in MODELS}


@pytest.mark.parametrize("name", MODELS)
def test_round_trip_is_bitwise_with_the_same_config(models, round_trips, name):
    _, _, made = models
    source, back = made[name]["hf"], round_trips[name]
    original, returned = tensors_of(source), tensors_of(back)
    assert sorted(returned) == sorted(original)
    for key, tensor in original.items():
        assert returned[key].dtype == tensor.dtype and torch.equal(returned[key], tensor), key
    source_config = json.loads((source / "config.json").read_text())
    back_config = json.loads((back / "config.json").read_text())
    assert rope_keys(back_config) == rope_keys(source_config)
    # the one change: no sliding window (MistralConfig's default is 4096), as megatron_ext's model has
    # none (tests/test_convert_window.py)
    window_off = {"sliding_window": None} if "sliding_window" in source_config else {}
    assert back_config == {**source_config, **window_off}
    for file in (*TOKENIZER_FILES, "generation_config.json"):
        assert (back / file).read_bytes() == (source / file).read_bytes(), file


def test_round_trip_of_a_sharded_mixed_dtype_model_writes_an_index(models, round_trips):
    source, back = models[2]["llama-mqa-linear-tied-bf16"]["hf"], round_trips["llama-mqa-linear-tied-bf16"]
    assert {t.dtype for t in tensors_of(source).values()} == {torch.bfloat16, torch.float32}  # the test's premise
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in back.glob("model-*-of-*.safetensors")}
    assert "lm_head.weight" not in index["weight_map"]  # tied


def test_exported_model_runs_in_transformers(models, round_trips):
    _, tokens, made = models
    name = "qwen2-bias-yarn-tied"
    assert_logits_close(hf_logits(round_trips[name], tokens), made[name]["logits"])


# --- RoPE settings: the same frequencies as transformers computes ---------------------------------

HF_ROPES = {
    "default": dict(rope_type="default", rope_theta=10000.0),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    "dynamic": dict(rope_type="dynamic", rope_theta=10000.0, factor=4.0),
    "yarn": dict(rope_type="yarn", rope_theta=1e6, factor=8.0, original_max_position_embeddings=512),
    "yarn-betas-mscale": dict(rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=1024,
                              beta_fast=16, beta_slow=2, mscale=0.7, mscale_all_dim=0.5),
    "yarn-attention-factor-no-truncate": dict(rope_type="yarn", rope_theta=1e4, factor=4.0, truncate=False,
                                              original_max_position_embeddings=1024, attention_factor=1.3),
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192),
}


@pytest.mark.parametrize("case", HF_ROPES)
def test_rope_settings_give_transformers_frequencies_in_both_config_forms(case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = dict(HF_ROPES[case])
    config = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=4096,
                                      rope_parameters=dict(params))
    seq_len = 3 * 4096 if params["rope_type"] == "dynamic" else None
    if params["rope_type"] == "default":
        expected, expected_factor = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        expected, expected_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None, seq_len=seq_len)

    new_form = {"max_position_embeddings": 4096, "rope_parameters": dict(params)}
    old_form = {"max_position_embeddings": 4096, "rope_theta": params.pop("rope_theta"), "rope_scaling": params}
    rope = rope_from_hf(new_form)
    assert rope_from_hf(old_form) == rope
    inv_freq, factor = rope.inv_freq(torch.tensor([rope.base]), 128, seq_len=seq_len)
    torch.testing.assert_close(inv_freq[0], expected.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)


@pytest.mark.parametrize("case", HF_ROPES)
def test_rope_settings_survive_rope_config_and_back(case):
    hf = {"max_position_embeddings": 4096, "rope_parameters": dict(HF_ROPES[case])}
    rope = rope_from_hf(hf)
    again = {"max_position_embeddings": 4096, "rope_parameters": rope_to_hf(rope, num_query_groups=4, head_dim=128)}
    assert rope_from_hf(again) == rope


@pytest.mark.parametrize("rope", [RopeConfig(base=10000.0, scaling="ntk", scaling_params={"factor": 4.0}),
                                  RopeConfig(base=10000.0, scaling="abf", scaling_params={"new_base": 5e5})],
                         ids=["ntk", "abf"])
def test_ntk_and_abf_export_as_the_plain_rope_theta_with_the_same_frequencies(rope):
    exported = rope_to_hf(rope, num_query_groups=4, head_dim=128)
    assert exported["rope_type"] == "default"
    theirs = rope_from_hf({"rope_parameters": exported})
    torch.testing.assert_close(theirs.inv_freq(torch.tensor([theirs.base]), 128)[0],
                               rope.inv_freq(torch.tensor([rope.base]), 128)[0], rtol=1e-6, atol=0)


def test_unknown_rope_parameters_are_refused_not_dropped():
    hf = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                              "original_max_position_embeddings": 64, "finetuned": True}}
    with pytest.raises(ConversionError, match="finetuned"):
        rope_from_hf(hf)
    with pytest.raises(ConversionError, match="longrope"):
        rope_from_hf({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}})


# --- HARPE: born in megatron_ext, run in transformers -------------------------------------------------

HARPE = RopeConfig(head_base_strategy="uniform", head_base_params={"b_min": 100.0, "b_max": 1e5},
                   scaling="yarn", scaling_params={"factor": 4.0, "original_max_position_embeddings": 16})


@pytest.fixture(scope="module")
def harpe_model(tmp_path_factory, single_rank):
    """A HARPE + YaRN + GQA model initialised in megatron_ext, saved as training saves, exported to HF."""
    from megatron_ext.data.tokenizer import train_sentencepiece
    from megatron_ext.models.init import layout_independent_init
    from megatron_ext.checkpoint.store import save_checkpoint
    from megatron_ext.config import TrainConfig
    from megatron_ext.models.builder import build_gpt

    root = tmp_path_factory.mktemp("harpe")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(words[i] for i in torch.randint(0, 10, (30,), generator=generator)) for _ in range(300)]
    tokenizer = train_sentencepiece(iter(texts), root / "tok", 300)
    config = TrainConfig()
    config.model.num_layers, config.model.hidden_size, config.model.num_attention_heads = 2, 64, 8
    config.model.num_query_groups, config.model.ffn_hidden_size = 4, 96  # vocab_size: the tokenizer's (300)
    config.rope = HARPE
    config.pose.enabled, config.pose.target_length = True, 1024
    model = build_gpt(config, 384, torch.device("cpu"))
    layout_independent_init(model, seed=3)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # norms: not all ones, so a swapped norm shows
                param.copy_(1 + 0.1 * torch.randn_like(param))
    tokens = torch.randint(0, 300, (BATCH, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(tokens, torch.arange(48).expand(BATCH, 48), None)[..., :300]
    # the checkpoint carries its tokenizer as training's do (a relative record): exports take it only from inside
    carried = f"tokenizer/{tokenizer.name}"
    state = dict(iteration=7, config=config.to_dict(), head_bases=config.rope.group_bases(4).tolist(),
                 padded_vocab_size=384, tokenizer_model=carried, tokenizer_vocab_size=300)
    save_checkpoint(root / "ckpt", 7, model=[model], state=state, extra_files={carried: tokenizer.read_bytes()})
    exported = mcore_to_hf(root / "ckpt", root / "hf")
    return config, tokens, logits, exported, root


def test_harpe_export_runs_in_transformers_with_the_loader(harpe_model):
    from megatron_ext.hf import load_harpe_model

    _, tokens, logits, exported, _ = harpe_model
    model = load_harpe_model(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        assert_logits_close(model(tokens).logits, logits)


def test_harpe_export_as_mistral_runs_with_the_loader_too(harpe_model):
    from megatron_ext.hf import load_harpe_model

    _, tokens, logits, _, root = harpe_model
    exported = mcore_to_hf(root / "ckpt", root / "hf-mistral", family="mistral")
    model = load_harpe_model(exported, dtype=torch.float32).eval()
    assert type(model).__name__ == "MistralForCausalLM"
    with torch.no_grad():
        assert_logits_close(model(tokens).logits, logits)
    with pytest.raises(ConversionError, match="has none: export it as family llama or mistral"):
        mcore_to_hf(root / "ckpt", root / "hf-qwen2", family="qwen2")
    assert not (root / "hf-qwen2").exists()


def test_harpe_config_lists_the_bases_and_strategy(harpe_model):
    config, _, _, exported, _ = harpe_model
    hf = json.loads((exported / "config.json").read_text())
    rope, _ = hf_rope_parameters(hf)
    assert rope["rope_type"] == "harpe" and rope["head_base_strategy"] == "uniform"
    assert rope["head_bases"] == config.rope.group_bases(4).tolist()
    assert rope["scaling"] == "yarn" and rope["scaling_params"] == HARPE.scaling_params
    assert hf["rope_scaling"]["rope_type"] == "harpe"  # the old form says it too (transformers 4.x readers)
    assert hf["megatron_ext"]["pose"]["target_length"] == 1024
    assert hf["vocab_size"] == 300  # the tokenizer's, not megatron's padded 384


def test_export_carries_the_sentencepiece_tokenizer_training_used(harpe_model):
    import sentencepiece

    exported, root = harpe_model[3], harpe_model[4]
    processor = sentencepiece.SentencePieceProcessor(model_file=str(root / "tok.model"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    text = "alpha beta gamma kappa"
    assert tokenizer(text, add_special_tokens=False).input_ids == processor.encode(text)
    hf = json.loads((exported / "config.json").read_text())
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (processor.bos_id(), processor.eos_id())


def test_stock_transformers_refuses_a_harpe_model_instead_of_running_it_wrong(harpe_model):
    exported = harpe_model[3]
    with pytest.raises(KeyError, match="harpe"):
        transformers.AutoModelForCausalLM.from_pretrained(exported)


def test_harpe_model_generates_the_same_with_and_without_kv_cache(harpe_model):
    """Keys are rotated before they enter the cache, at their own positions."""
    from megatron_ext.hf import load_harpe_model

    model = load_harpe_model(harpe_model[3], dtype=torch.float32).eval()
    prompt = harpe_model[1][:1, :10]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_harpe_loader_really_rotates_per_group(harpe_model):
    """Control: the same weights with one base for every head give other logits."""
    from megatron_ext.hf import load_harpe_model, use_per_group_rope

    _, tokens, logits, exported, _ = harpe_model
    model = load_harpe_model(exported, dtype=torch.float32).eval()
    use_per_group_rope(model, RopeConfig(base=100.0, scaling="yarn", scaling_params=HARPE.scaling_params))
    with torch.no_grad():
        assert (model(tokens).logits - logits).abs().max() > 1e-3


def test_harpe_hf_model_converts_back_with_its_bases(harpe_model):
    config, tokens, logits, exported, root = harpe_model
    checkpoint = hf_to_mcore(exported, root / "again")
    state = json.loads((checkpoint / "megatron_ext.json").read_text())["state"]
    assert state["head_bases"] == config.rope.group_bases(4).tolist()
    assert state["config"]["rope"]["head_base_strategy"] == "uniform"
    assert_logits_close(megatron_logits(checkpoint, tokens), logits)


# --- bad input: a clear error, and no output directory --------------------------------------------

def _copy_model(source: Path, destination: Path) -> Path:
    destination.mkdir()
    for path in source.iterdir():
        (destination / path.name).write_bytes(path.read_bytes())
    return destination


def _edit_config(directory: Path, **changes) -> None:
    hf = json.loads((directory / "config.json").read_text())
    hf.update(changes)
    (directory / "config.json").write_text(json.dumps(hf))


def _drop_tensor(directory: Path, name: str) -> None:
    tensors = safetensors_torch.load_file(str(directory / "model.safetensors"))
    del tensors[name]
    safetensors_torch.save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


BAD_INPUTS = {
    "unknown-architecture": (lambda d: _edit_config(d, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox"),
                             {}, "GPTNeoXForCausalLM"),
    "missing-tensor": (lambda d: _drop_tensor(d, "model.layers.1.self_attn.k_proj.weight"),
                       {}, r"model\.layers\.1\.self_attn\.k_proj\.weight is missing"),
    "shape-mismatch": (lambda d: _edit_config(d, intermediate_size=80),
                       {}, r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \[96, 64\].*\[80, 64\]"),
    "tp-not-dividing-kv-heads": (lambda d: None, {"tp": 4}, r"--tp 4 does not divide num_key_value_heads \(2\)"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_named_and_leaves_no_output(models, tmp_path, case):
    _, _, made = models
    break_it, arguments, message = BAD_INPUTS[case]
    source = _copy_model(made["llama-gqa-llama3"]["hf"], tmp_path / "hf")
    break_it(source)
    with pytest.raises(ConversionError, match=message):
        hf_to_mcore(source, tmp_path / "out", **arguments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_mqa_cannot_be_split_over_two_tp_ranks(models, tmp_path):
    _, _, made = models
    with pytest.raises(ConversionError, match=r"--tp 2 does not divide num_key_value_heads \(1\)"):
        hf_to_mcore(made["llama-mqa-linear-tied-bf16"]["hf"], tmp_path / "out", tp=2)
    assert not (tmp_path / "out").exists()


def test_failure_while_writing_leaves_no_output(models, tmp_path, monkeypatch):
    from megatron_ext.convert.hf_io import SafetensorsCheckpoint

    _, _, made = models
    real_read, calls = SafetensorsCheckpoint.read, []

    def read_then_fail(self, name):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk gone (simulated)")
        return real_read(self, name)

    monkeypatch.setattr(SafetensorsCheckpoint, "read", read_then_fail)
    with pytest.raises(OSError, match="disk gone"):
        hf_to_mcore(made["mistral-gqa"]["hf"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten(models, tmp_path):
    _, _, made = models
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        mcore_to_hf(made["mistral-gqa"]["mcore"], tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# --- command line, memory, inspection ------------------------------------------------------------

@pytest.mark.slow
def test_cli_streams_a_sharded_model_in_a_fraction_of_its_size(tmp_path):
    """hf-to-mcore in a fresh process: peak RSS above the imports stays well under the model's size."""
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408,
                                      num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=2)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu")
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20MB")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    del model
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = ["hf-to-mcore", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "mcore"), "--tp", "2",
               "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.cli", "convert", *command],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("peak memory"))
    above_imports = int(line.split("MiB max RSS, ")[1].split(" MiB")[0]) * 2**20
    print(f"\n{line}; model {model_bytes / 2**20:.0f} MiB, largest tensor {largest / 2**20:.1f} MiB")
    # holding the model would cost >= its size; streaming costs a few tensors plus ~30 MiB of bookkeeping
    assert above_imports < 0.4 * model_bytes
    assert (tmp_path / "mcore" / "iter_0000000" / "complete").is_file()


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    from megatron_ext.cli import main

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"]}))
    assert main(["convert", "hf-to-mcore", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-ext convert: ") and err.count("\n") == 1
    assert "unknown architecture FalconForCausalLM" in err


def test_cli_is_wired_as_a_megatron_ext_subcommand():
    import argparse

    from megatron_ext.convert.cli import add_convert_args, run_convert

    parser = argparse.ArgumentParser()
    add_convert_args(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", "mcore-to-hf", "--ckpt", "c", "--out", "o", "--family", "qwen2"])
    assert args.func is run_convert and args.convert_command == "mcore-to-hf" and args.family == "qwen2"


def test_inspect_checkpoint_prints_layout_rope_and_parameter_count(models, harpe_model, capsys):
    import runpy

    inspect = runpy.run_path(str(ROOT / "tools" / "inspect_checkpoint.py"))["main"]
    _, _, made = models
    inspect([str(made["llama-gqa-llama3"]["tp2"].parent)])
    text = capsys.readouterr().out
    assert "config's layout: TP 2, PP 1" in text and "scaling llama3" in text
    hf_params = sum(t.numel() for t in tensors_of(made["llama-gqa-llama3"]["hf"]).values())
    assert f"{hf_params:,} without vocabulary padding" in text
    inspect([str(harpe_model[4] / "ckpt")])
    text = capsys.readouterr().out
    assert "HARPE uniform bases per KV group [100, 33400, 66700, 100000]" in text and "PoSE: on" in text
    inspect([str(harpe_model[3])])
    assert "runs with megatron_ext.hf.load_harpe_model" in capsys.readouterr().out


def test_the_family_choices_of_the_command_are_the_adapters(capsys):
    """`convert mcore-to-hf --family` takes exactly the families ADAPTERS converts (no second list to keep)."""
    import argparse

    from megatron_ext.convert.adapters import ADAPTERS
    from megatron_ext.convert.cli import add_convert_args

    parser = argparse.ArgumentParser(prog="megatron-ext")
    add_convert_args(parser.add_subparsers(dest="command"))
    base = ["convert", "mcore-to-hf", "--ckpt", "c", "--out", "o", "--family"]
    assert [parser.parse_args([*base, family]).family for family in ADAPTERS] == list(ADAPTERS)
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "gpt2"])
    err = capsys.readouterr().err
    assert all(repr(family) in err for family in ADAPTERS), err
