"""Training data that cannot train is refused when it is opened (issue 30, cases 4 and 5): an index declaring
float token ids, an index whose lengths, pointers or document boundaries do not hold together, negative ids,
data in which no token counts toward the loss; and a micro-batch without loss tokens adds nothing to a step.

The damaged files start from what megatron-core's own IndexedDatasetBuilder writes and are changed at the byte
offsets of its documented layout; the loss references are each sample put through the bare model by hand."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from megatron_ext.data import SentencePieceTokenizer, build_gpt_dataset, preprocess, train_sentencepiece
from megatron_ext.data.tokenizer_record import check_data_tokenizer, check_training_data
from megatron_ext.errors import InputError
from test_data_checks import write_jsonl
from word_tokenizer import write_word_tokenizer

HEADER = 34  # magic (9), version (8), dtype code (1), sequence count (8), boundary count (8)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_hostile")


@pytest.fixture(scope="module")
def tokenizer_model(work) -> Path:
    corpus = write_jsonl(work / "words.jsonl", [f"document {i} says hello world " * (1 + i % 5) for i in range(60)])
    return train_sentencepiece([corpus], work / "tok", 320, seed=0)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_model) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(tokenizer_model)


def preprocessed(work: Path, name: str, texts: list[str], tokenizer) -> str:
    """`texts` through `megatron-ext preprocess`'s function (each document ends in EOD)."""
    preprocess([write_jsonl(work / f"{name}.jsonl", texts)], work / name, tokenizer, workers=1, progress=False)
    return str(work / name)


def megatron_indexed(prefix: Path, documents: list[list], dtype) -> str:
    """An indexed dataset as megatron-core's own builder writes it, one sequence per document."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for document in documents:
        builder.add_document(np.asarray(document, dtype=dtype), [len(document)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


# ----------------------------------------------------------------------------- case 5: the index


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_index_declaring_float_token_ids_is_refused_naming_it(tokenizer, tmp_path, dtype):
    """Issue 30 case 5: float32 ids passed every check and failed in training with numpy's "Cannot cast array
    data from dtype('float32') to dtype('int64')"."""
    prefix = megatron_indexed(tmp_path / "floats", [[5.0, 6.0, 7.0, 2.0]] * 20, dtype)
    message = rf"data.train_data: index file '{prefix}\.idx' declares {np.dtype(dtype).name} token ids.*preprocess"
    with pytest.raises(InputError, match=message):
        check_data_tokenizer(prefix, tokenizer)
    with pytest.raises(InputError, match=message):
        build_gpt_dataset([prefix], 8, tokenizer, num_samples=4, seed=0)


def patched_index(prefix: str, to: Path, patch) -> str:
    """A copy of `prefix` whose index bytes `patch(index: bytearray, sequences: int)` changes in place."""
    index = bytearray(Path(f"{prefix}.idx").read_bytes())
    patch(index, struct.unpack_from("<Q", index, 18)[0])
    Path(f"{to}.idx").write_bytes(bytes(index))
    Path(f"{to}.bin").write_bytes(Path(f"{prefix}.bin").read_bytes())
    return str(to)


def lengths_at(sequences: int) -> int:
    return HEADER


def pointers_at(sequences: int) -> int:
    return HEADER + 4 * sequences


def boundaries_at(sequences: int) -> int:
    return HEADER + 12 * sequences


DAMAGES = {  # name: (patch(index, sequences), what the refusal says)
    "unknown_dtype_code": (lambda b, n: b.__setitem__(17, 9), r"unknown token dtype \(code 9\)"),
    "wrong_magic": (lambda b, n: b.__setitem__(0, ord("X")), r"is not a megatron indexed dataset index"),
    "version_2": (lambda b, n: struct.pack_into("<Q", b, 9, 2), r"is not a megatron indexed dataset index"),
    "huge_sequence_count": (lambda b, n: struct.pack_into("<Q", b, 18, 2**62), r"truncated or damaged"),
    "negative_length": (lambda b, n: struct.pack_into("<i", b, lengths_at(n) + 4 * 3, -5),
                        r"sequence 3 has length -5"),
    "pointer_out_of_place": (lambda b, n: struct.pack_into("<q", b, pointers_at(n) + 8 * 5,
                                                            struct.unpack_from("<q", b, pointers_at(n) + 8 * 5)[0] + 2),
                             r"sequence 5 starts at byte \d+ .*but the sequences before it end at byte"),
    "pointer_far_outside": (lambda b, n: struct.pack_into("<q", b, pointers_at(n) + 8 * 2, 2**62),
                            r"sequence 2 starts at byte 4611686018427387904"),
    "boundaries_decrease": (lambda b, n: struct.pack_into("<q", b, boundaries_at(n) + 8 * 2, n),
                            r"document boundaries do not rise from 0"),
    "boundaries_past_the_count": (lambda b, n: struct.pack_into("<q", b, boundaries_at(n) + 8 * n, n + 1),
                                  r"last document ends at sequence 21, not at its sequence count 20"),
    "first_boundary_not_zero": (lambda b, n: struct.pack_into("<q", b, boundaries_at(n), 1),
                                r"document boundaries do not rise from 0"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_index_is_refused_naming_it(tokenizer, tmp_path, damage):
    """Each damage at the byte offset megatron's layout gives it; refused by name before megatron reads the file
    (negative lengths, misplaced pointers and non-rising boundaries used to pass: only the last entries were
    checked)."""
    patch, says = DAMAGES[damage]
    good = megatron_indexed(tmp_path / "good", [[5, 6, 7, 8, 2]] * 20, np.uint16)
    check_data_tokenizer(good, tokenizer)  # the undamaged original passes
    prefix = patched_index(good, tmp_path / "damaged", patch)
    with pytest.raises(InputError, match=rf"'{prefix}\.idx'.*{says}"):
        check_data_tokenizer(prefix, tokenizer)


def test_data_of_empty_documents_only_is_refused_naming_the_bin(tokenizer, tmp_path):
    """Found by tests/test_fuzz_data.py: an index of empty documents and its empty .bin passed every check, then
    megatron's dataset failed with "cannot mmap an empty file"."""
    prefix = megatron_indexed(tmp_path / "empty", [[], []], np.uint16)
    with pytest.raises(InputError, match=rf"data file '{prefix}\.bin' holds no tokens \(its index lists 2 documents, "
                                         r"all empty\)"):
        build_gpt_dataset([prefix], 8, tokenizer, num_samples=4, seed=0)


def test_negative_token_ids_are_refused_naming_the_data(tokenizer, tmp_path):
    prefix = megatron_indexed(tmp_path / "negative", [[5, 6, -1, 2]] * 10, np.int32)
    with pytest.raises(InputError, match=rf"data.train_data: data prefix '{prefix}' holds token id -1: ids are "
                                         r"never negative"):
        check_data_tokenizer(prefix, tokenizer)


# ----------------------------------------------------------------------------- case 4: no loss tokens


@pytest.fixture(scope="module")
def eod_only(work, tokenizer) -> str:
    """Documents of empty text: each is its EOD alone (the JSONL case of a wrong text key)."""
    return preprocessed(work, "eod_only", [""] * 40, tokenizer)


NO_LOSS = (r"data.train_data: every token of {part}data prefix '{prefix}' is EOD \(id {eod}\) and "
           r"data.mask_eod_loss: true takes the loss off EOD tokens, so no sample has a token to learn from")


def test_data_of_eod_tokens_alone_is_refused_under_mask_eod_loss(eod_only, tokenizer_model, tokenizer):
    """Issue 30 case 4: every sample had zero loss tokens and the run logged loss 0/0."""
    says = NO_LOSS.format(part="", prefix=eod_only, eod=tokenizer.eod)
    with pytest.raises(InputError, match=says):  # what `train` runs before any process starts
        check_training_data([eod_only], "data.tokenizer_model", str(tokenizer_model), "sentencepiece",
                            mask_eod_loss=True)
    with pytest.raises(InputError, match=says):  # what every rank runs when it opens the data
        build_gpt_dataset([eod_only], 8, tokenizer, num_samples=4, seed=0, mask_eod_loss=True)
    # without mask_eod_loss the EOD tokens are the targets: nothing to refuse
    check_training_data([eod_only], "data.tokenizer_model", str(tokenizer_model), "sentencepiece")
    assert len(build_gpt_dataset([eod_only], 8, tokenizer, num_samples=4, seed=0)) == 4


def test_a_split_part_of_eod_tokens_alone_is_refused_by_part(work, tokenizer):
    """30 documents of text, then 10 empty ones: split 75,25,0 gives validation documents 30..39 (megatron's
    round(0.75 x 40)), all EOD; training builds, validation is refused naming its part."""
    prefix = preprocessed(work, "text_then_empty", [f"word {i} and more words" for i in range(30)] + [""] * 10,
                          tokenizer)
    settings = dict(num_samples=4, seed=0, mask_eod_loss=True, split="75,25,0")
    assert len(build_gpt_dataset([prefix], 8, tokenizer, part=0, **settings)) == 4
    with pytest.raises(InputError, match=NO_LOSS.format(part=r"the validation part \(split 75,25,0\) of ",
                                                        prefix=prefix, eod=tokenizer.eod)):
        build_gpt_dataset([prefix], 8, tokenizer, part=1, **settings)


def test_a_loss_mask_sidecar_marking_nothing_is_refused(tokenizer, tmp_path):
    from megatron_ext.data.retrieval import write_with_loss_mask

    documents = [[5, 6, 7, 8, 9, tokenizer.eod]] * 12
    write_with_loss_mask(tmp_path / "unmarked", documents, [[0] * 6] * 12, tokenizer.vocab_size)
    with pytest.raises(InputError, match=rf"the loss-mask sidecar of data prefix '{tmp_path}/unmarked' marks no "
                                         r"target token \(data.answer_only_loss: true"):
        build_gpt_dataset([str(tmp_path / "unmarked")], 6, tokenizer, num_samples=4, seed=0, answer_only_loss=True)
    write_with_loss_mask(tmp_path / "marked", documents, [[0, 0, 0, 1, 1, 0]] * 12, tokenizer.vocab_size)
    build_gpt_dataset([str(tmp_path / "marked")], 6, tokenizer, num_samples=4, seed=0, answer_only_loss=True)


def test_train_refuses_eod_only_data_in_one_line_before_any_process(eod_only, tokenizer_model, tmp_path):
    from fuzz_harness import assert_clean_ending, run_cli_bounded

    config = tmp_path / "eod_only.yaml"
    config.write_text(yaml.safe_dump(dict(
        model=dict(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=16),
        data=dict(train_data=[eod_only], tokenizer_model=str(tokenizer_model), mask_eod_loss=True,
                  cache_dir=str(tmp_path / "cache")),
        training=dict(train_iters=2, micro_batch_size=1, global_batch_size=2, precision="fp32", nonfinite="skip"),
        optimizer=dict(warmup_iters=0),
        checkpoint=dict(dir=str(tmp_path / "checkpoints")),
    )))
    outcome = run_cli_bounded(["train", "--config", config], cwd=tmp_path, seconds=60,
                              stop_before=["megatron_ext.training.train:train"])
    assert_clean_ending(outcome, "train")
    assert outcome.exit_code == 2 and outcome.reached is None, outcome.describe()
    assert outcome.stderr.splitlines()[-1].startswith(
        f"megatron-ext train: data.train_data: every token of data prefix '{eod_only}' is EOD"), outcome.describe()


# ----------------------------------------------------------------------------- a micro-batch without loss tokens


def tiny_run(tmp_path):
    from megatron_ext.config import TrainConfig, from_dict, validate
    from megatron_ext.sizes import padded_vocab_size
    from megatron_ext.training.batches import training_samples
    from megatron_ext.training.train import build_model, build_optimizer, prepare_data

    config = from_dict(TrainConfig, dict(
        model=dict(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=16),
        data=dict(tiny_corpus=True, tiny_corpus_documents=40, tokenizer_vocab_size=400,
                  cache_dir=str(tmp_path / "cache")),
        training=dict(train_iters=4, micro_batch_size=2, global_batch_size=2, precision="fp32"),
        optimizer=dict(lr=1e-3, warmup_iters=0),
    ), prefix="")
    validate(config)
    tokenizer, prefixes = prepare_data(config)
    torch.manual_seed(0)
    model = build_model(config, padded_vocab_size(tokenizer.vocab_size, 1), torch.device("cpu"))
    dataset = training_samples(config, tokenizer, prefixes, num_samples=6)
    micro_batches = [{name: torch.stack([dataset[i][name] for i in (2 * b, 2 * b + 1)]) for name in dataset[0]}
                     for b in range(3)]
    return config, model, build_optimizer(config, model), micro_batches


def gradients(model) -> list[torch.Tensor]:
    return [p.main_grad.clone() for p in model[0].parameters()]


def by_hand(model, micro_batches) -> tuple[float, float]:
    """(sum of the masked per-token losses, their count), each micro-batch through the bare model."""
    bare, loss_sum, tokens = model[0].module, 0.0, 0.0
    with torch.no_grad():
        for batch in micro_batches:
            per_token = bare(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            loss_sum += float((per_token * batch["loss_mask"]).sum())
            tokens += float(batch["loss_mask"].sum())
    return loss_sum, tokens


def test_a_micro_batch_without_loss_tokens_adds_nothing_and_a_step_without_any_is_not_nan(single_rank, tmp_path):
    """Micro-batches [a, none, b] (none: every loss_mask 0) give the loss and the gradients of [a, b]: the token
    mean over a's and b's tokens by hand, gradients equal. A step of micro-batches without any loss token reports
    loss 0 with a zero gradient (it raised ZeroDivisionError: loss 0/0)."""
    from megatron_ext.training.train import forward_losses, train_step

    config, model, (optimizer, scheduler), (a, b, c) = tiny_run(tmp_path)
    none = dict(c, loss_mask=torch.zeros_like(c["loss_mask"]))
    expected_sum, expected_tokens = by_hand(model, [a, b])

    for chunk in model:
        chunk.zero_grad_buffer()
    loss_sum, tokens = forward_losses(model, [a, none, b], forward_only=False)
    with_none = gradients(model)
    assert tokens == expected_tokens == float(a["loss_mask"].sum() + b["loss_mask"].sum())
    assert loss_sum / tokens == pytest.approx(expected_sum / expected_tokens, rel=1e-5)
    assert np.isfinite(loss_sum)

    for chunk in model:
        chunk.zero_grad_buffer()
    forward_losses(model, [a, b], forward_only=False)
    assert all(torch.equal(x, y) for x, y in zip(with_none, gradients(model)))
    assert any(float(g.abs().sum()) > 0 for g in with_none)

    loss, grad_norm, stepped = train_step(model, optimizer, scheduler, [none, dict(none)], config)
    assert (loss, grad_norm, stepped) == (0.0, 0.0, True)
    assert all(float(g.abs().sum()) == 0 for g in gradients(model))


# ----------------------------------------------------------------------------- Hugging Face tokenizer directories


@pytest.fixture
def hf_tokenizer(tmp_path) -> Path:
    """A loadable word-level tokenizer directory."""
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    return write_word_tokenizer(directory, ["<unk>", "<s>", "</s>", "hello", "world"])


def test_a_tokenizer_config_that_is_no_object_is_refused_in_one_line(hf_tokenizer):
    """Found by tests/test_fuzz_data.py: a JSON list as tokenizer_config.json ended in transformers' AttributeError
    traceback ('list' object has no attribute 'get'); now refused when the directory's files are checked
    (data/model_directory.py), before transformers reads them. A special_tokens_map.json of the wrong shape gets
    as far as transformers, whose failure is named in one line."""
    from megatron_ext.data.tokenizer_files import HuggingFaceFiles, TokenizerError

    assert HuggingFaceFiles(hf_tokenizer).encode("hello world") == [3, 4]
    (hf_tokenizer / "tokenizer_config.json").write_text("[]")
    with pytest.raises(TokenizerError, match=rf"{hf_tokenizer}/tokenizer_config.json holds a JSON list, not an "
                                             r"object"):
        HuggingFaceFiles(hf_tokenizer)
    (hf_tokenizer / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (hf_tokenizer / "tokenizer.json").write_text(json.dumps({"model": []}))
    with pytest.raises(TokenizerError, match=rf"tokenizer directory '{hf_tokenizer}' does not load in transformers "
                                             r"\(\w+: .*\): fix the file it names"):
        HuggingFaceFiles(hf_tokenizer)


@pytest.mark.parametrize("where", ["tokenizer_config.json", "config.json"])
def test_a_tokenizer_asking_for_custom_code_is_refused_and_the_code_never_runs(hf_tokenizer, where):
    from megatron_ext.data.tokenizer_files import HuggingFaceFiles, TokenizerError

    (hf_tokenizer / "tokenization_evil.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('EXECUTED').write_text('ran')\n")
    settings = json.loads((hf_tokenizer / "tokenizer_config.json").read_text()) if where != "config.json" else {}
    settings["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (hf_tokenizer / where).write_text(json.dumps(settings))
    with pytest.raises(TokenizerError, match=rf"{hf_tokenizer / where} asks for custom code \(auto_map .*"
                                             r"tokenization_evil.EvilTokenizer.*never runs"):
        HuggingFaceFiles(hf_tokenizer)
    assert not (hf_tokenizer / "EXECUTED").exists()


def test_a_tokenizer_file_linked_out_of_its_directory_is_refused(hf_tokenizer, tmp_path):
    from megatron_ext.data.tokenizer_files import HuggingFaceFiles, TokenizerError

    outside = tmp_path / "elsewhere.json"
    (hf_tokenizer / "tokenizer.json").rename(outside)
    (hf_tokenizer / "tokenizer.json").symlink_to(outside)
    with pytest.raises(TokenizerError, match=rf"{hf_tokenizer}/tokenizer.json is a symlink to {outside}, outside "
                                             r"the tokenizer directory"):
        HuggingFaceFiles(hf_tokenizer)
