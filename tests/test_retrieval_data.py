"""Retrieval training data (megatron_ext.data.passkey_data, megatron_ext.data.retrieval) and how the dataset reads it: passkey prompts of the
evaluation's template, one prompt per sample (`add_extra_token: false`), loss only where the sidecar marks
a target (`answer_only_loss`), and held-out keys."""

import pytest
import torch

from megatron_ext.data.retrieval import loss_mask_prefix
from megatron_ext.data.passkey_data import passkey_documents, write_passkey_dataset
from megatron_ext.data.prompts import PASSKEY_FILLER, filler_tokens, passkey_prompt


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_model):
    from megatron_ext.eval.tokenizers import load_eval_tokenizer

    return load_eval_tokenizer(tiny_tokenizer_model, "sentencepiece")


@pytest.fixture(scope="module")
def tiny_tokenizer_model(tmp_path_factory):
    from megatron_ext.data.tiny import prepare_tiny_dataset

    model, _ = prepare_tiny_dataset(tmp_path_factory.mktemp("tiny"), seed=3, num_documents=60, vocab_size=500)
    return model


def _decode_targets(tokenizer, document):
    return "".join(tokenizer.decode([t]) if m else "|" for t, m in zip(document.tokens, document.targets))


def test_prompts_are_the_evaluation_prompt_plus_the_answer_end(tokenizer):
    documents = passkey_documents(tokenizer, length=240, count=40, seed=1, key_max=50_000)
    filler = filler_tokens(tokenizer, PASSKEY_FILLER)
    for document in documents:
        assert len(document.tokens) == len(document.targets) == 240
        size, phase = document.prompt_length, document.filler_seed
        assert 120 <= size <= 239
        evaluation = passkey_prompt(tokenizer, size, key=document.key, depth=document.depth,
                                    filler=filler[phase:] + filler[:phase])
        assert document.tokens[:size] == evaluation.tokens  # the evaluation's template, token for token
        answer = tokenizer.decode(evaluation.tokens[evaluation.answer_start:])
        assert answer.strip() == str(document.key)
        assert tokenizer.decode([document.tokens[size]]) == "."
        assert set(document.tokens[size + 1:]) <= {tokenizer.eos_id}
        # targets: the key's repetition inside the needle, then the answer and its end, nothing after
        marked = [i for i, m in enumerate(document.targets) if m]
        assert marked[-(size + 1 - evaluation.answer_start):] == list(range(evaluation.answer_start, size + 1))
        needle_start, needle_end = evaluation.needle_spans[0]
        inside = [i for i in marked if needle_start <= i < needle_end]
        assert tokenizer.decode([document.tokens[i] for i in inside]).replace(" ", "") == str(document.key)
        assert len(marked) == len(inside) + size + 1 - evaluation.answer_start
    assert len({d.key for d in documents}) > 30 and len({round(d.depth, 3) for d in documents}) > 30
    assert len({d.prompt_length for d in documents}) > 20  # the answer moves: no fixed position to learn


def test_held_out_keys_never_appear(tokenizer):
    held_out = frozenset(range(1, 40))
    documents = passkey_documents(tokenizer, length=200, count=200, seed=2, key_max=50, held_out_keys=held_out)
    assert {d.key for d in documents} <= set(range(40, 51))
    with pytest.raises(ValueError, match="raise key_max"):
        passkey_documents(tokenizer, length=200, count=5000, seed=2, key_max=50, held_out_keys=held_out)


def test_one_prompt_per_sample_with_the_loss_on_its_targets(tokenizer, tiny_tokenizer_model, tmp_path, single_rank):
    from megatron_ext.data import SentencePieceTokenizer, build_gpt_dataset

    prefix = write_passkey_dataset(tmp_path / "pk", tokenizer, length=224, count=24, seed=5, key_max=50_000)
    documents = passkey_documents(tokenizer, length=224, count=24, seed=5, key_max=50_000)
    by_tokens = {tuple(d.tokens): d for d in documents}
    dataset = build_gpt_dataset([str(prefix)], 224, SentencePieceTokenizer(tiny_tokenizer_model), num_samples=24,
                                seed=1, add_extra_token=False, answer_only_loss=True)
    seen = set()
    for index in range(24):
        sample = dataset[index]
        document = by_tokens[tuple(sample["tokens"].tolist())]  # a whole prompt, from its first token
        seen.add(document.key)
        assert sample["labels"][:-1].tolist() == document.tokens[1:]
        # position i predicts token i + 1: the loss counts it exactly where that token is a target
        assert sample["loss_mask"].tolist() == [float(m) for m in document.targets[1:]] + [0.0]
    assert len(seen) == 24  # every prompt once

    plain = build_gpt_dataset([str(prefix)], 224, SentencePieceTokenizer(tiny_tokenizer_model), num_samples=24,
                              seed=1, add_extra_token=False)
    assert plain[0]["loss_mask"][:-1].bool().all()  # without the sidecar every label counts


def test_the_sidecar_follows_blends_and_is_checked(tokenizer, tiny_tokenizer_model, tmp_path, single_rank):
    from megatron_ext.data import SentencePieceTokenizer, build_gpt_dataset
    from megatron_ext.errors import InputError, MissingFile

    first = write_passkey_dataset(tmp_path / "a", tokenizer, length=192, count=16, seed=1, key_max=50_000)
    second = write_passkey_dataset(tmp_path / "b", tokenizer, length=192, count=16, seed=2, key_max=50_000)
    documents = {tuple(d.tokens): d for seed in (1, 2)
                 for d in passkey_documents(tokenizer, length=192, count=16, seed=seed, key_max=50_000)}
    sp = SentencePieceTokenizer(tiny_tokenizer_model)
    blend = build_gpt_dataset([str(first), str(second)], 192, sp, num_samples=20, seed=3, weights=[0.5, 0.5],
                              add_extra_token=False, answer_only_loss=True)
    for index in range(20):
        sample = blend[index]
        document = documents[tuple(sample["tokens"].tolist())]
        assert torch.equal(sample["loss_mask"], torch.tensor([float(m) for m in document.targets[1:]] + [0.0]))

    other = write_passkey_dataset(tmp_path / "c", tokenizer, length=160, count=16, seed=1, key_max=50_000)
    for suffix in (".bin", ".idx"):  # a sidecar of other documents
        (tmp_path / f"a_loss_mask{suffix}").write_bytes(open(f"{loss_mask_prefix(other)}{suffix}", "rb").read())
    with pytest.raises(InputError, match="does not list the documents of"):
        build_gpt_dataset([str(first)], 192, sp, num_samples=4, seed=3, answer_only_loss=True)
    (tmp_path / "b_loss_mask.idx").unlink()
    with pytest.raises(MissingFile, match="data.answer_only_loss: .*b_loss_mask.bin/.idx .* not found"):
        build_gpt_dataset([str(second)], 192, sp, num_samples=4, seed=3, answer_only_loss=True)


def test_answer_only_loss_with_the_tiny_corpus_is_refused():
    from megatron_ext.config import ConfigError, TrainConfig, from_dict, validate

    raw = dict(model=dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=128),
               data=dict(tiny_corpus=True, answer_only_loss=True))
    with pytest.raises(ConfigError, match="data.answer_only_loss needs data.train_data with loss-mask sidecars"):
        validate(from_dict(TrainConfig, raw, prefix=""), check_files=False)


def test_tiny_corpus_passkey_prompts_need_whole_prompts_and_the_answer_loss():
    from megatron_ext.config import ConfigError, TrainConfig, from_dict, validate

    model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=128)
    good = dict(tiny_corpus=True, tiny_corpus_passkey_prompts=64, add_extra_token=False, answer_only_loss=True)
    validate(from_dict(TrainConfig, dict(model=model, data=good), prefix=""), check_files=False)
    for wrong in (dict(add_extra_token=True), dict(answer_only_loss=False)):
        raw = dict(model=model, data={**good, **wrong})
        with pytest.raises(ConfigError, match=r"data.tiny_corpus_passkey_prompts \(64\) .* needs data.tiny_corpus: "
                                              "true, data.add_extra_token: false and data.answer_only_loss: true"):
            validate(from_dict(TrainConfig, raw, prefix=""), check_files=False)


def test_a_tiny_run_can_train_on_passkey_prompts(tmp_path, single_rank):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ext.config import TrainConfig, from_dict
    from megatron_ext.training.train import prepare_data

    raw = dict(model=dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=200),
               data=dict(tiny_corpus=True, cache_dir=str(tmp_path), tiny_corpus_documents=60, tokenizer_vocab_size=500,
                         tiny_corpus_passkey_prompts=12, add_extra_token=False, answer_only_loss=True))
    _, (prefix,) = prepare_data(from_dict(TrainConfig, raw, prefix=""))
    tokens, marks = IndexedDataset(prefix), IndexedDataset(loss_mask_prefix(prefix))
    assert len(tokens) == 12 and set(tokens.sequence_lengths.tolist()) == {200}
    assert all(3 <= int(marks[i].sum()) <= 15 for i in range(12))  # the key twice and its end, no more
    assert prefix.endswith("passkey12x200")
