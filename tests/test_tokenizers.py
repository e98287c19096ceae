"""One tokenizer loader for every kind a real model ships: ids equal those of the kind's own reference
(transformers' AutoTokenizer, tiktoken, sentencepiece) on multilingual text and code; BOS/EOD right for each;
`preprocess` output the same with 1 and 4 workers; bad tokenizers refused by name before any work; a converted
Qwen2 trains with its own byte-level BPE and exports it unchanged. Everything is built locally (offline)."""
import base64
import json
from pathlib import Path

import pytest
import yaml

from megatron_ext.cli import main
from megatron_ext.data import load_tokenizer, preprocess
from megatron_ext.data.tokenizer_files import LLAMA3_PATTERN, llama3_special_tokens
from test_continual import train  # the train command in a subprocess

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
tiktoken = pytest.importorskip("tiktoken")

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_VOCAB = 420

SAMPLES = [
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see 1234567 items.",
    " leading space and  doubled  spaces\nnew line\n\n\ttabbed",
    "Grüße aus Köln: Ärger, Öl und Übermut — naïve café.",
    "Привет, мир! Это тест токенизатора.",
    "你好，世界。这是一个测试。 日本語のテキストもあります。",
    "مرحبا بالعالم 🌍🚀 emoji ✓",
    "def add(a, b):\n    \"\"\"Sum.\"\"\"\n    return a + b  # 42\n\nclass Foo:\n    x = [1, 2, 3]\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * 0x1F; }",
    "   ",
    "",
]
TEXTS = SAMPLES + [text + " " + other for text, other in zip(SAMPLES, reversed(SAMPLES))]
CORPUS = SAMPLES[:-2] * 3 + ["the of and to in is was for on with as by at from " * 4,
                             "import os\nimport sys\n\ndef main():\n    print('hello world')\n" * 3]


def train_byte_level_bpe(pattern: str) -> "tokenizers.Tokenizer":
    """A byte-level BPE in the Llama-3 / Qwen2 style (regex split, then bytes), trained on CORPUS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def save_hf_directory(tokenizer, directory: Path, special: list[str], config: dict) -> Path:
    from tokenizers import AddedToken

    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in special])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def write_tiktoken_file(tokenizer_json: Path, path: Path) -> Path:
    """The BPE's ranks as a tiktoken file: token bytes (byte-level alphabet decoded) and id, no special tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab = json.loads(tokenizer_json.read_text())["model"]["vocab"]
    lines = [f"{base64.b64encode(bytes(byte_of[c] for c in token)).decode()} {rank}"
             for token, rank in sorted(vocab.items(), key=lambda item: item[1])]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """name -> the tokenizer path of that kind, all made here."""
    from megatron_ext.data import build_tiny_corpus, train_sentencepiece

    work = tmp_path_factory.mktemp("tokenizers")
    llama3 = train_byte_level_bpe(LLAMA3_PATTERN)
    num_ranks = llama3.get_vocab_size()
    llama3_dir = save_hf_directory(llama3, work / "llama3", list(llama3_special_tokens(num_ranks)), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>"})
    qwen2_dir = save_hf_directory(train_byte_level_bpe(QWEN2_PATTERN), work / "qwen2", QWEN2_SPECIAL, {
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"})
    tiktoken_dir = work / "llama3-original"
    tiktoken_dir.mkdir()
    tiktoken_file = write_tiktoken_file(llama3_dir / "tokenizer.json", tiktoken_dir / "tokenizer.model")
    # trained on English text and code: the other scripts of TEXTS go through byte fallback
    sentencepiece_model = train_sentencepiece([build_tiny_corpus(work, num_documents=60)], work / "sp", 500)
    return dict(llama3=llama3_dir, qwen2=qwen2_dir, tiktoken=tiktoken_file, sentencepiece=sentencepiece_model,
                num_ranks=num_ranks, work=work)


def auto_ids(directory, texts=TEXTS) -> list[list[int]]:
    auto = transformers.AutoTokenizer.from_pretrained(str(directory))
    return [auto.encode(text, add_special_tokens=False) for text in texts]


# ----------------------------------------------------------------------------- ids equal the references


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_byte_level_bpe_directory_ids_equal_autotokenizers(kinds, name):
    tokenizer = load_tokenizer(kinds[name])
    assert tokenizer.kind == "huggingface"
    ours = [tokenizer.tokenize(text) for text in TEXTS]
    assert ours == auto_ids(kinds[name])
    assert sum(map(len, ours)) > 500  # the sample exercises many merges, not a few bytes
    assert [tokenizer.detokenize(ids) for ids in ours] == TEXTS


def test_tiktoken_file_ids_equal_the_hf_tokenizer_and_tiktoken(kinds):
    tokenizer = load_tokenizer(kinds["tiktoken"])
    assert tokenizer.kind == "tiktoken"
    ours = [tokenizer.tokenize(text) for text in TEXTS]
    assert ours == auto_ids(kinds["llama3"])
    from tiktoken.load import load_tiktoken_bpe

    reference = tiktoken.Encoding("reference", pat_str=LLAMA3_PATTERN, special_tokens={},
                                  mergeable_ranks=load_tiktoken_bpe(str(kinds["tiktoken"])))
    assert ours == [reference.encode_ordinary(text) for text in TEXTS]
    assert [tokenizer.detokenize(ids) for ids in ours] == TEXTS


def test_a_directory_with_only_a_tiktoken_model_is_read_as_tiktoken(kinds):
    assert load_tokenizer(kinds["tiktoken"].parent).kind == "tiktoken"
    assert load_tokenizer(kinds["llama3"] / "tokenizer.json").kind == "huggingface"


def test_sentencepiece_ids_equal_sentencepiece_and_the_exported_tokenizer_json(kinds, tmp_path):
    import sentencepiece

    from megatron_ext.convert.hf_tokenizer import write_hf_tokenizer

    tokenizer = load_tokenizer(kinds["sentencepiece"])
    processor = sentencepiece.SentencePieceProcessor(model_file=str(kinds["sentencepiece"]))
    expected = [processor.encode(text) for text in TEXTS]
    assert tokenizer.kind == "sentencepiece" and [tokenizer.tokenize(text) for text in TEXTS] == expected
    write_hf_tokenizer("sentencepiece", kinds["sentencepiece"], tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert [auto.encode(text, add_special_tokens=False) for text in TEXTS] == expected
    assert auto.encode("hi", add_special_tokens=True)[0] == processor.bos_id()
    assert [auto.decode(ids) for ids in expected] == [processor.decode(ids) for ids in expected]


def test_tiktoken_export_loads_in_transformers_with_equal_ids(kinds, tmp_path):
    from megatron_ext.convert.hf_tokenizer import write_hf_tokenizer

    write_hf_tokenizer("tiktoken", kinds["tiktoken"], tmp_path)
    assert auto_ids(tmp_path) == auto_ids(kinds["llama3"])
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (auto.bos_token_id, auto.eos_token_id) == (kinds["num_ranks"], kinds["num_ranks"] + 1)


def test_bos_and_eod_of_each_kind(kinds):
    n = kinds["num_ranks"]
    found = {name: load_tokenizer(kinds[name]) for name in ("llama3", "tiktoken", "qwen2", "sentencepiece")}
    assert (found["llama3"].bos, found["llama3"].eod) == (n, n + 1)
    assert (found["tiktoken"].bos, found["tiktoken"].eod) == (n, n + 1)
    assert found["llama3"].vocab_size == found["tiktoken"].vocab_size == n + 256
    qwen_vocab = json.loads((kinds["qwen2"] / "tokenizer.json").read_text())
    endoftext = next(t["id"] for t in qwen_vocab["added_tokens"] if t["content"] == "<|endoftext|>")
    assert (found["qwen2"].bos, found["qwen2"].eod) == (-1, endoftext)
    assert (found["sentencepiece"].bos, found["sentencepiece"].eod) == (1, 2)


# ----------------------------------------------------------------------------- preprocess


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama3", "qwen2", "tiktoken", "sentencepiece"])
def test_preprocess_with_one_and_four_workers_writes_the_same_dataset(kinds, name, tmp_path):
    inputs = tmp_path / "docs.jsonl"
    inputs.write_text("".join(json.dumps({"text": text, "source": f"s{i % 3}"}) + "\n"
                              for i, text in enumerate(TEXTS * 3)))
    tokenizer = load_tokenizer(kinds[name])
    one = preprocess([inputs], tmp_path / "one", tokenizer, workers=1, progress=False)
    four = preprocess([inputs], tmp_path / "four", tokenizer, workers=4, progress=False)
    assert one.bin_path.read_bytes() == four.bin_path.read_bytes()
    assert one.idx_path.read_bytes() == four.idx_path.read_bytes()
    assert sum(stats.tokens for stats in one.sources.values()) == 3 * sum(len(tokenizer.tokenize(t)) for t in TEXTS)


def test_cli_preprocess_takes_a_tokenizer_directory(kinds, tmp_path, capsys):
    inputs = tmp_path / "docs.jsonl"
    inputs.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    assert main(["preprocess", "--input", str(inputs), "--output-prefix", str(tmp_path / "d"),
                 "--tokenizer", str(kinds["qwen2"]), "--tokenizer-type", "huggingface", "--workers", "1"]) == 0
    assert (tmp_path / "d.bin").is_file()


# ----------------------------------------------------------------------------- refused before any work


def refused(argv, capsys, command="preprocess") -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"megatron-ext {command}: "), err
    return err


def test_a_tokenizer_directory_with_no_known_file_is_refused(kinds, tmp_path, capsys):
    empty = tmp_path / "tok"
    empty.mkdir()
    (empty / "vocab.txt").write_text("a\nb\n")
    inputs = tmp_path / "docs.jsonl"
    inputs.write_text('{"text": "hello"}\n')
    err = refused(["preprocess", "--input", str(inputs), "--output-prefix", str(tmp_path / "out" / "d"),
                   "--tokenizer", str(empty)], capsys)
    assert "--tokenizer: tokenizer directory" in err and "has no tokenizer.json, tokenizer_config.json or " \
                                                       "tokenizer.model" in err
    assert not (tmp_path / "out").exists()


def test_a_tiktoken_file_whose_special_tokens_cannot_be_placed_is_refused(kinds, tmp_path, capsys):
    lines = kinds["tiktoken"].read_text().splitlines()
    gapped = tmp_path / "tokenizer.model"
    gapped.write_text("\n".join(lines[:300] + lines[301:]) + "\n")  # rank 300 missing
    inputs = tmp_path / "docs.jsonl"
    inputs.write_text('{"text": "hello"}\n')
    err = refused(["preprocess", "--input", str(inputs), "--output-prefix", str(tmp_path / "out" / "d"),
                   "--tokenizer", str(gapped)], capsys)
    assert "ranks are not exactly 0 .. " in err and "special tokens (BOS, end of document) sit cannot be told" in err
    assert not (tmp_path / "out").exists()
    sentencepiece_named = refused(["preprocess", "--input", str(inputs), "--output-prefix", str(tmp_path / "d"),
                                   "--tokenizer-model", str(kinds["tiktoken"])], capsys)
    assert "is a tiktoken file, but the tokenizer type says sentencepiece" in sentencepiece_named


# ----------------------------------------------------------------------------- a converted model, end to end


def make_qwen2(directory: Path, tokenizer_dir: Path, vocab_size: int) -> Path:
    import shutil

    import torch

    config = transformers.Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True, max_position_embeddings=128,
                                      eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_dir / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def converted_qwen2(kinds, single_rank):
    """A Qwen2 whose vocabulary is its byte-level BPE's, converted, with data preprocessed by that tokenizer and
    a config that names no tokenizer."""
    from megatron_ext.convert import hf_to_mcore

    work = kinds["work"] / "e2e"
    vocab_size = load_tokenizer(kinds["qwen2"]).vocab_size
    converted = hf_to_mcore(make_qwen2(work / "qwen2", kinds["qwen2"], vocab_size), work / "converted")
    inputs = work / "docs.jsonl"
    inputs.write_text("".join(json.dumps({"text": text * 4}) + "\n" for text in TEXTS * 4))
    preprocess([inputs], work / "data", load_tokenizer(converted / "tokenizer"), workers=1, progress=False)
    config = extension_config(work, converted, seq_length=64, iters=3, micro_batch=2, global_batch=4)
    return dict(work=work, converted=converted, config=config, vocab_size=vocab_size)


def extension_config(work: Path, pretrained: Path, *, seq_length: int, iters: int, micro_batch: int,
                     global_batch: int) -> Path:
    """work/extend.yaml: train on work/data from `pretrained` (no tokenizer named: the checkpoint's), saving at the end."""
    config = work / "extend.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"seq_length": seq_length},
        "data": {"train_data": [str(work / "data")], "cache_dir": str(work / "cache")},
        "training": {"train_iters": iters, "micro_batch_size": micro_batch, "global_batch_size": global_batch},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_iters": 1},
        "checkpoint": {"dir": str(work / "run"), "save_interval": iters, "pretrained": str(pretrained)},
        "logging": {"tensorboard_dir": None, "metrics_file": str(work / "metrics.jsonl"), "progress_bar": False},
    }))
    return config


@pytest.mark.slow
def test_converted_qwen2_trains_with_its_own_tokenizer_and_exports_it(kinds, converted_qwen2):
    from megatron_ext.checkpoint.state import read_checkpoint
    from megatron_ext.convert import mcore_to_hf

    run = converted_qwen2
    result = train(run["config"])
    logs = result.stderr + result.stdout
    assert result.returncode == 0, logs[-4000:]
    assert f"tokenizer from checkpoint.pretrained: {run['converted'] / 'tokenizer'}" in logs
    saved = read_checkpoint(run["work"] / "run", setting="--ckpt")
    assert saved.iteration == 3 and saved.state.tokenizer_vocab_size == run["vocab_size"]
    exported = mcore_to_hf(saved.path, run["work"] / "exported")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (exported / name).read_bytes() == (kinds["qwen2"] / name).read_bytes()
    assert auto_ids(exported) == auto_ids(kinds["qwen2"])
    model = transformers.AutoModelForCausalLM.from_pretrained(exported)
    assert model.config.vocab_size == run["vocab_size"]


def test_eval_loads_the_converted_checkpoints_tokenizer_directory(kinds, converted_qwen2, single_rank):
    from megatron_ext.eval.models import load_eval_model

    model = load_eval_model(converted_qwen2["converted"])
    assert [model.tokenizer.encode(text) for text in TEXTS] == auto_ids(kinds["qwen2"])
    assert model.tokenizer.vocab_size == model.vocab_size == converted_qwen2["vocab_size"]


def test_a_tokenizer_larger_than_the_checkpoints_embedding_is_refused(kinds, converted_qwen2, capsys):
    other = converted_qwen2["work"] / "other"
    err = refused(["train", "--config", str(converted_qwen2["config"]), "--set", f"data.tokenizer={kinds['llama3']}",
                   "--set", f"checkpoint.dir={other}"], capsys, command="train")
    tokens = load_tokenizer(kinds["llama3"]).vocab_size
    assert f"has {tokens} tokens, but the model of checkpoint.pretrained" in err
    assert f"has a vocabulary of {converted_qwen2['vocab_size']}" in err
    assert not other.exists()
