"""Data, models and checkpoints agree on their tokenizer (issue 25, cases 4, 5 and 7).

- `preprocess` records the tokenizer next to the data; opening data made with another tokenizer is refused by name,
  and so is an id beyond the vocabulary, before any step (old data without a record: one warning, ids checked).
- One resolution for a tokenizer directory: a directory that also holds a model's config.json (whose model_type
  makes AutoTokenizer pick another class) gives the same ids to preprocess, its workers, the checkpoint's copy and
  AutoTokenizer.
- Checkpoints carry their tokenizer relative to themselves: a moved or copied checkpoint reads its own copy.
Everything is built locally (offline)."""
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.data import load_tokenizer, preprocess
from megatron_ext.data.tokenizer_files import LLAMA3_PATTERN, llama3_special_tokens
from test_tokenizers import (
    CORPUS,
    QWEN2_PATTERN,
    QWEN2_SPECIAL,
    TEXTS,
    auto_ids,
    save_hf_directory,
    train_byte_level_bpe,
    write_tiktoken_file,
)

transformers = pytest.importorskip("transformers")
ASCII_CORPUS = [text for text in CORPUS if text.isascii()]  # a small sentencepiece model needs few characters


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """name -> tokenizer path: Llama-3-style and Qwen2-style byte-level BPE directories (different EOD ids), Llama-3's
    tiktoken file of the same BPE, and a directory of Llama-3-style files holding a Qwen2 model's config.json."""
    work = tmp_path_factory.mktemp("agreement")
    llama3 = train_byte_level_bpe(LLAMA3_PATTERN)
    llama3_dir = save_hf_directory(llama3, work / "llama3", list(llama3_special_tokens(llama3.get_vocab_size())), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>"})
    qwen2_dir = save_hf_directory(train_byte_level_bpe(QWEN2_PATTERN), work / "qwen2", QWEN2_SPECIAL, {
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|endoftext|>"})
    tiktoken_dir = work / "llama3-original"
    tiktoken_dir.mkdir()
    tiktoken_file = write_tiktoken_file(llama3_dir / "tokenizer.json", tiktoken_dir / "tokenizer.model")
    # the case 5: a model directory whose tokenizer_config.json says PreTrainedTokenizerFast and whose
    # config.json says model_type qwen2; AutoTokenizer then loads Qwen2Tokenizer, which rebuilds the pre-tokenizer
    model_dir = save_hf_directory(train_byte_level_bpe(LLAMA3_PATTERN), work / "model", QWEN2_SPECIAL, {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"})
    (model_dir / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    return dict(llama3=llama3_dir, qwen2=qwen2_dir, tiktoken=tiktoken_file, model=model_dir, work=work)


def write_docs(path: Path, texts=TEXTS) -> Path:
    path.write_text("".join(json.dumps({"text": text * 3}) + "\n" for text in texts))
    return path


def open_data(prefix, tokenizer_path, **settings):
    from megatron_ext.data import build_gpt_dataset

    return build_gpt_dataset([str(prefix)], 16, load_tokenizer(tokenizer_path), num_samples=4, seed=0, **settings)


# ----------------------------------------------------------------------------- case 4: the data's tokenizer


def test_preprocess_records_the_tokenizer_next_to_the_data(tokenizers, tmp_path):
    tokenizer = load_tokenizer(tokenizers["qwen2"])
    result = preprocess([write_docs(tmp_path / "docs.jsonl")], tmp_path / "d", tokenizer, workers=1, progress=False,
                        prepend_bos=False)
    record = json.loads((tmp_path / "d.tokenizer.json").read_text())
    endoftext = next(t["id"] for t in json.loads((tokenizers["qwen2"] / "tokenizer.json").read_text())["added_tokens"]
                     if t["content"] == "<|endoftext|>")
    written = np.fromfile(result.bin_path, dtype=np.uint16)  # the dtype preprocess picks for < 65536 ids
    assert record["tokenizer"]["eod"] == endoftext and record["tokenizer"]["bos"] == -1
    assert record["tokenizer"]["vocab_size"] == tokenizer.vocab_size == len(auto_tokenizer(tokenizers["qwen2"]))
    assert record["tokenizer"]["path"] == str(tokenizers["qwen2"].absolute())
    assert record["max_id"] == int(written.max()) and record["bin_bytes"] == result.bin_path.stat().st_size
    assert (record["prepend_bos"], record["append_eod"]) == (False, True)
    # the fingerprint is of the files, not of where they are: a copy of the directory has the same one
    copy = shutil.copytree(tokenizers["qwen2"], tmp_path / "copy")
    assert record["tokenizer"]["fingerprint"] == load_tokenizer(copy).encoder.fingerprint()
    assert record["tokenizer"]["fingerprint"] != load_tokenizer(tokenizers["llama3"]).encoder.fingerprint()


def auto_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(str(path))


def test_data_of_another_tokenizer_is_refused_by_name(tokenizers, tmp_path, single_rank):
    from megatron_ext.errors import UserError

    preprocess([write_docs(tmp_path / "docs.jsonl")], tmp_path / "qwen", load_tokenizer(tokenizers["qwen2"]),
               workers=1, progress=False)
    qwen_eod, llama_eod = load_tokenizer(tokenizers["qwen2"]).eod, load_tokenizer(tokenizers["llama3"]).eod
    with pytest.raises(UserError) as refused:
        open_data(tmp_path / "qwen", tokenizers["llama3"])
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"data.train_data: data prefix '{tmp_path / 'qwen'}'")
    assert f"tokenized with '{tokenizers['qwen2'].absolute()}'" in message
    assert f"the model's tokenizer is '{tokenizers['llama3']}'" in message
    assert f"EOD {qwen_eod} vs {llama_eod}" in message and "BOS none vs" in message
    assert f"re-run `megatron-ext preprocess --tokenizer {tokenizers['llama3']}`" in message
    assert len(open_data(tmp_path / "qwen", tokenizers["qwen2"])) == 4  # its own tokenizer reads it


def test_other_files_with_the_same_ids_are_accepted(tokenizers, tmp_path, single_rank):
    """Llama-3's tiktoken file and its Hugging Face directory: other files, the same ids; not refused."""
    preprocess([write_docs(tmp_path / "docs.jsonl")], tmp_path / "tik", load_tokenizer(tokenizers["tiktoken"]),
               workers=1, progress=False)
    assert load_tokenizer(tokenizers["tiktoken"]).encoder.fingerprint() != \
        load_tokenizer(tokenizers["llama3"]).encoder.fingerprint()
    assert len(open_data(tmp_path / "tik", tokenizers["llama3"])) == 4


def test_ids_beyond_the_vocabulary_are_refused_when_the_data_is_opened(tokenizers, tmp_path, single_rank, caplog):
    """Data without a record (written before preprocess kept one) whose ids reach past the tokenizer: refused before
    any sample is built, naming the largest id (found by a scan of the .bin, checked here with numpy)."""
    from megatron_ext.data import train_sentencepiece
    from megatron_ext.errors import UserError

    small = train_sentencepiece(iter(ASCII_CORPUS * 5), tmp_path / "sp", 360)
    result = preprocess([write_docs(tmp_path / "docs.jsonl")], tmp_path / "big", load_tokenizer(tokenizers["llama3"]),
                        workers=1, progress=False)
    (tmp_path / "big.tokenizer.json").unlink()
    largest = int(np.fromfile(result.bin_path, dtype=np.uint16).max())
    assert largest >= 360
    with caplog.at_level(logging.WARNING, logger="megatron_ext"), pytest.raises(UserError) as refused:
        open_data(tmp_path / "big", small)
    assert f"holds token id {largest}, beyond the 360 ids of tokenizer '{small}'" in str(refused.value)
    assert "has no big.tokenizer.json" in caplog.text


def test_old_data_without_a_record_is_read_with_one_warning(tokenizers, tmp_path, single_rank, caplog):
    preprocess([write_docs(tmp_path / "docs.jsonl")], tmp_path / "old", load_tokenizer(tokenizers["qwen2"]),
               workers=1, progress=False)
    (tmp_path / "old.tokenizer.json").unlink()
    with caplog.at_level(logging.WARNING, logger="megatron_ext"):
        open_data(tmp_path / "old", tokenizers["qwen2"])
        open_data(tmp_path / "old", tokenizers["qwen2"])
    assert caplog.text.count("has no old.tokenizer.json") == 1


def test_a_record_of_other_data_is_not_trusted_for_the_largest_id(tokenizers, tmp_path):
    from megatron_ext.data.tokenizer_record import max_token_id, read_sidecar

    result = preprocess([write_docs(tmp_path / "docs.jsonl")], tmp_path / "d", load_tokenizer(tokenizers["qwen2"]),
                        workers=1, progress=False)
    record = read_sidecar(tmp_path / "d")
    size = result.bin_path.stat().st_size
    assert record["bin_bytes"] == size and record["max_id"] == int(np.fromfile(result.bin_path, np.uint16).max())
    assert max_token_id(tmp_path / "d", {**record, "max_id": 1}) == 1  # the record of this very .bin is used
    # a record of another .bin (another size) is not: the file is scanned
    assert max_token_id(tmp_path / "d", {**record, "max_id": 1, "bin_bytes": size + 2}) == record["max_id"]


def test_a_dataset_replaced_without_a_tokenizer_loses_the_old_record(tokenizers, tmp_path):
    from megatron_ext.data.retrieval import write_with_loss_mask

    preprocess([write_docs(tmp_path / "docs.jsonl")], tmp_path / "d", load_tokenizer(tokenizers["qwen2"]),
               workers=1, progress=False)
    assert (tmp_path / "d.tokenizer.json").is_file()
    write_with_loss_mask(tmp_path / "d", [[1, 2, 3]], [[0, 1, 1]], vocab_size=10)
    assert not (tmp_path / "d.tokenizer.json").exists()


def test_perplexity_on_an_indexed_dataset_refuses_another_tokenizers_data(tokenizers, tmp_path):
    from megatron_ext.data.tokenizer_files import open_encoder
    from megatron_ext.errors import UserError
    from megatron_ext.eval.perplexity import load_documents

    preprocess([write_docs(tmp_path / "docs.jsonl")], tmp_path / "qwen", load_tokenizer(tokenizers["qwen2"]),
               workers=1, progress=False)
    with pytest.raises(UserError, match=r"perplexity.data \(--data\): data prefix .* was tokenized with"):
        load_documents([str(tmp_path / "qwen")], open_encoder(tokenizers["llama3"]), count=2)
    assert len(load_documents([str(tmp_path / "qwen")], open_encoder(tokenizers["qwen2"]), count=2)) == 2


# ----------------------------------------------------------------------------- case 5: one resolution


def test_a_directory_with_a_config_json_gives_the_same_ids_everywhere(tokenizers, tmp_path):
    """preprocess (in-process and in workers), eval's loader, the copy a checkpoint carries and AutoTokenizer."""
    from megatron_ext.data.tokenizer_files import open_encoder
    from megatron_ext.data.tokenizer_record import checkpoint_tokenizer_files

    model_dir = tokenizers["model"]
    reference = auto_ids(model_dir)
    without_config = tmp_path / "files-only"
    without_config.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(model_dir / name, without_config / name)
    assert auto_ids(without_config) != reference  # the config.json decides: the case this test is about

    tokenizer = load_tokenizer(model_dir)
    assert [tokenizer.tokenize(text) for text in TEXTS] == reference
    assert [open_encoder(model_dir).encode(text) for text in TEXTS] == reference
    copy = tmp_path / "checkpoint-copy"
    copy.mkdir()
    for name, contents in checkpoint_tokenizer_files(tokenizer.encoder).items():
        (copy / name).write_bytes(contents)
    assert json.loads((copy / "config.json").read_text()) == {"model_type": "qwen2"}
    assert [load_tokenizer(copy).tokenize(text) for text in TEXTS] == reference
    assert auto_ids(copy) == reference
    assert load_tokenizer(copy).encoder.fingerprint() == tokenizer.encoder.fingerprint()
    docs = write_docs(tmp_path / "docs.jsonl", TEXTS)
    one = preprocess([docs], tmp_path / "one", tokenizer, workers=1, progress=False)
    two = preprocess([docs], tmp_path / "two", load_tokenizer(copy), workers=2, progress=False)
    assert one.bin_path.read_bytes() == two.bin_path.read_bytes()
    expected = [i for text in TEXTS for i in auto_tokenizer(model_dir).encode(text * 3, add_special_tokens=False)
                + [tokenizer.eod]]
    assert np.fromfile(one.bin_path, dtype=np.uint16).tolist() == expected


def test_an_old_sentencepiece_export_directory_reads_as_sentencepiece_everywhere(tmp_path):
    """A directory holding tokenizer.model with a LlamaTokenizer config and no tokenizer.json (how exports looked
    before they had tokenizer.json): preprocess now reads it as evaluation did, with sentencepiece."""
    import sentencepiece

    from megatron_ext.data import train_sentencepiece
    from megatron_ext.data.tokenizer_files import open_encoder

    model = train_sentencepiece(iter(ASCII_CORPUS * 5), tmp_path / "sp", 360)
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy2(model, export / "tokenizer.model")
    (export / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
    texts = [" leading space", "plain"]
    assert load_tokenizer(export).kind == open_encoder(export).kind == "sentencepiece"
    assert [load_tokenizer(export).tokenize(text) for text in texts] == [processor.encode(text) for text in texts]


# ----------------------------------------------------------------------------- case 7: checkpoints carry it


def test_an_absolute_record_into_the_checkpoint_reads_the_checkpoints_own_copy(tmp_path):
    """Checkpoints converted before the record was relative stored /old/place/iter_0000000/tokenizer."""
    from megatron_ext.checkpoint.state import CheckpointState, SavedCheckpoint
    from megatron_ext.config import TrainConfig

    def saved(path, recorded):
        state = CheckpointState.of_run(TrainConfig(), iteration=0, padded_vocab_size=128, tokenizer_model=recorded,
                                       tokenizer_vocab_size=100, parallel={})
        return SavedCheckpoint(path=path, iteration=0, state=state, optimizer=None, sharding_metadata={},
                               parallel_layout={}, format_version=1)

    moved = tmp_path / "moved" / "iter_0000000"
    (moved / "tokenizer").mkdir(parents=True)
    assert saved(moved, "tokenizer").tokenizer_path == moved / "tokenizer"
    assert saved(moved, "/old/place/iter_0000000/tokenizer").tokenizer_path == moved / "tokenizer"
    assert saved(moved, "/data/tok.model").tokenizer_path == Path("/data/tok.model")  # a user's own file
    assert saved(moved, "/old/iter_0000005/tokenizer").tokenizer_path == Path("/old/iter_0000005/tokenizer")
    assert saved(moved, None).tokenizer_path is None


@pytest.fixture(scope="module")
def moved_conversion(tokenizers, single_rank):
    """A Qwen2 model (the case-5 tokenizer directory, config.json included) converted, then moved; the original
    place is gone."""
    from megatron_ext.convert import hf_to_mcore
    from test_tokenizers import make_qwen2

    work = tokenizers["work"] / "moved"
    vocab_size = load_tokenizer(tokenizers["model"]).vocab_size
    hf_dir = make_qwen2(work / "qwen2", tokenizers["model"], vocab_size)
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "qwen2"
    converted = hf_to_mcore(hf_dir, work / "converted")
    shutil.move(work / "converted", work / "elsewhere")
    return dict(work=work, hf=hf_dir, moved=work / "elsewhere" / converted.name, vocab_size=vocab_size)


def test_a_moved_converted_checkpoint_evaluates_and_exports_with_its_own_tokenizer(tokenizers, moved_conversion):
    from megatron_ext.checkpoint.state import read_checkpoint
    from megatron_ext.convert import mcore_to_hf
    from megatron_ext.eval.models import load_eval_model

    moved, hf_dir = moved_conversion["moved"], moved_conversion["hf"]
    assert not (moved_conversion["work"] / "converted").exists()
    saved = read_checkpoint(moved, setting="--model")
    assert saved.state.tokenizer_model == "tokenizer" and saved.tokenizer_path == moved / "tokenizer"
    reference = auto_ids(hf_dir)
    model = load_eval_model(moved)
    assert Path(model.tokenizer.path) == moved / "tokenizer"
    assert [model.tokenizer.encode(text) for text in TEXTS] == reference  # case 5 through the checkpoint too
    exported = mcore_to_hf(moved, moved_conversion["work"] / "exported")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (exported / name).read_bytes() == (hf_dir / name).read_bytes()
    assert auto_ids(exported) == reference


def test_a_copied_checkpoint_does_not_read_the_originals_tokenizer(moved_conversion, tmp_path):
    from megatron_ext.checkpoint.state import read_checkpoint

    copy = shutil.copytree(moved_conversion["moved"].parent, tmp_path / "copy") / moved_conversion["moved"].name
    assert read_checkpoint(copy, setting="--model").tokenizer_path == copy / "tokenizer"


@pytest.mark.slow
def test_training_from_a_moved_checkpoint_uses_and_carries_its_tokenizer(tokenizers, moved_conversion):
    """Train 2 steps from the moved conversion: the copy's tokenizer is used, the trained checkpoint carries the
    tokenizer itself (same fingerprint), and after moving the run its export still has the tokenizer."""
    from megatron_ext.checkpoint.state import read_checkpoint
    from megatron_ext.convert import mcore_to_hf
    from megatron_ext.data.tokenizer_files import open_encoder
    from test_continual import train
    from test_tokenizers import extension_config

    work, moved = moved_conversion["work"], moved_conversion["moved"]
    preprocess([write_docs(work / "docs.jsonl", TEXTS * 4)], work / "data", load_tokenizer(moved / "tokenizer"),
               workers=1, progress=False)
    config = extension_config(work, moved, seq_length=32, iters=2, micro_batch=1, global_batch=2)
    result = train(config)
    assert result.returncode == 0, (result.stderr + result.stdout)[-4000:]
    assert f"tokenizer from checkpoint.pretrained: {moved / 'tokenizer'}" in result.stderr + result.stdout
    shutil.move(work / "run", work / "run-moved")
    trained = read_checkpoint(work / "run-moved", setting="--ckpt")
    assert trained.tokenizer_path == trained.path / "tokenizer"
    assert open_encoder(trained.tokenizer_path).fingerprint() == trained.state.tokenizer_fingerprint == \
        open_encoder(moved / "tokenizer").fingerprint()
    exported = mcore_to_hf(trained.path, work / "trained-export")
    assert auto_ids(exported) == auto_ids(moved_conversion["hf"])

    # data of another tokenizer, into this model: refused in one line before any step
    preprocess([write_docs(work / "docs.jsonl")], work / "qwen-data", load_tokenizer(tokenizers["qwen2"]),
               workers=1, progress=False)
    refused = train(config, "--set", f"data.train_data=[{work / 'qwen-data'}]", "--set",
                    f"checkpoint.dir={work / 'run2'}")
    lines = [line for line in refused.stderr.splitlines() if line.startswith("megatron-ext train:")]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-3000:]
    assert lines[0].startswith("megatron-ext train: data.train_data: data prefix") and "was tokenized with" in lines[0]
    assert "Traceback" not in refused.stderr and not (work / "run2").exists()


@pytest.mark.slow
def test_a_moved_run_resumes_with_the_tokenizer_its_checkpoint_carries(moved_conversion, tmp_path):
    """Train 2 steps from a converted checkpoint, then move the run and remove the converted checkpoint whose
    tokenizer path the run's config recorded: the resume reads the trained checkpoint's own copy (same files,
    another path: accepted) and trains on."""
    from megatron_ext.checkpoint.state import read_checkpoint
    from test_continual import train
    from test_tokenizers import extension_config

    work = tmp_path
    pretrained = shutil.copytree(moved_conversion["moved"].parent, work / "pretrained") / moved_conversion["moved"].name
    preprocess([write_docs(work / "docs.jsonl", TEXTS * 4)], work / "data", load_tokenizer(pretrained / "tokenizer"),
               workers=1, progress=False)
    config = extension_config(work, pretrained, seq_length=32, iters=2, micro_batch=1, global_batch=2)
    first = train(config)
    assert first.returncode == 0, (first.stderr + first.stdout)[-4000:]
    shutil.rmtree(work / "pretrained")
    shutil.move(work / "run", work / "run-moved")
    resumed = train(config, "--set", f"checkpoint.dir={work / 'run-moved'}", "--set", "training.train_iters=3")
    logs = resumed.stderr + resumed.stdout
    assert resumed.returncode == 0, logs[-4000:]
    assert "is gone; reading the copy" in logs and "the same tokenizer files at another path" in logs
    assert read_checkpoint(work / "run-moved", setting="--ckpt").iteration == 3


def test_a_resume_accepts_the_same_tokenizer_files_elsewhere_and_refuses_other_ones(tokenizers, tmp_path):
    import copy

    from megatron_ext.checkpoint.layout import CheckpointError
    from megatron_ext.checkpoint.state import CheckpointState, SavedCheckpoint
    from megatron_ext.config import TrainConfig
    from megatron_ext.training.start import check_resume

    then = TrainConfig()
    then.data.tiny_corpus, then.data.train_data, then.data.tokenizer = False, ["/data/x"], str(tokenizers["qwen2"])
    state = CheckpointState.of_run(then, iteration=2, padded_vocab_size=512, tokenizer_model="tokenizer",
                                   tokenizer_vocab_size=423, parallel={},
                                   tokenizer_fingerprint=load_tokenizer(tokenizers["qwen2"]).encoder.fingerprint())
    saved = SavedCheckpoint(path=tmp_path / "iter_0000002", iteration=2, state=state, optimizer=None,
                            sharding_metadata={}, parallel_layout={}, format_version=1)
    elsewhere = copy.deepcopy(then)
    elsewhere.data.tokenizer = str(shutil.copytree(tokenizers["qwen2"], tmp_path / "moved-tokenizer"))
    check_resume(elsewhere, saved)  # the same files at another path
    other = copy.deepcopy(then)
    other.data.tokenizer = str(tokenizers["llama3"])
    with pytest.raises(CheckpointError, match="was trained with other settings: data.tokenizer"):
        check_resume(other, saved)
