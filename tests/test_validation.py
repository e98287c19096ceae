"""Validation during training: the loss it reports is the token mean of the held-out samples through the model,
the curves plot from the metrics file, and 'did you mean' only names a key the unknown one is a slip of.
(The multi-rank agreement of validation losses is in tests/test_schedule.py.)"""

import json
from functools import partial

import pytest
import torch

from megatron_ext.config import ConfigError, TrainConfig, from_dict, validate


# --- 'did you mean' ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, suggestion", [
    ("eval_intervl", "training.eval_interval"),  # one letter dropped
    ("eval_iter", "training.eval_iters"),
    ("trian_iters", "training.train_iters"),  # two letters swapped
    ("rampup", "training.rampup_batch_size"),  # cut short
])
def test_a_slip_of_a_known_key_is_named(key, suggestion):
    with pytest.raises(ConfigError, match=f"unknown key 'training.{key}': did you mean '{suggestion}'"):
        from_dict(TrainConfig, {"training": {key: 1}}, prefix="")


@pytest.mark.parametrize("key", ["test_interval", "save_interval", "train_samples", "eval_batch_size"])
def test_a_merely_similar_other_setting_is_not_suggested(key):
    """difflib's closest matches were exit_interval (which stops the run) for test_interval and for
    checkpoint.save_interval put under training, train_iters (iterations, not samples) for train_samples,
    global_batch_size for eval_batch_size; the error lists the keys instead of proposing a setting that
    would silently do something else."""
    with pytest.raises(ConfigError) as error:
        from_dict(TrainConfig, {"training": {key: 1}}, prefix="")
    assert "did you mean" not in str(error.value)
    assert "known keys:" in str(error.value) and "eval_interval" in str(error.value)


def test_megatron_lm_names_of_the_new_settings_are_known():
    config = from_dict(TrainConfig, {"training": {"eval_interval": 5, "eval_iters": 2},
                                     "data": {"tiny_corpus": True, "split": "98,2,0"}}, prefix="")
    validate(config)
    assert (config.training.eval_interval, config.training.eval_iters, config.data.split) == (5, 2, "98,2,0")


# --- the curves -------------------------------------------------------------------------------------------


def test_loss_plot_reads_the_last_row_of_each_iteration_and_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from megatron_ext.training.loss_plot import loss_plot_path, plot_losses, read_losses

    rows = [dict(iteration=1, loss=6.0), dict(iteration=2, loss=5.5, valid_loss=5.9),
            dict(iteration=3, loss=9.9),  # the stopped run's last row, iteration 3 again after the resume:
            dict(iteration=3, loss=5.2), dict(iteration=4, loss=5.0, valid_loss=5.4)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    train, valid = read_losses(metrics)
    assert train == {1: 6.0, 2: 5.5, 3: 5.2, 4: 5.0} and valid == {2: 5.9, 4: 5.4}
    path = plot_losses(metrics)
    assert path == loss_plot_path(metrics) == tmp_path / "metrics_loss.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_metrics_go_under_their_own_tensorboard_tag():
    from megatron_ext.training.metrics import metric_tag

    assert (metric_tag("valid_loss"), metric_tag("valid_ppl"), metric_tag("loss")) == \
        ("valid/loss", "valid/ppl", "train/loss")


# --- the value --------------------------------------------------------------------------------------------


def loss_by_hand(model: list, dataset, samples: int) -> float:
    """Each sample through the bare model one by one: the sum of its masked per-token losses over their count."""
    bare = model[0].module
    bare.eval()
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for index in range(samples):
            sample = {name: value[None] for name, value in dataset[index].items()}
            per_token = bare(sample["tokens"], sample["position_ids"], None, labels=sample["labels"],
                             document_ids=sample["document_ids"])
            loss_sum += float((per_token * sample["loss_mask"]).sum())
            tokens += float(sample["loss_mask"].sum())
    bare.train()
    return loss_sum / tokens


@pytest.mark.slow
def test_validation_loss_is_the_token_mean_of_the_held_out_samples(single_rank, tmp_path):
    """Validation.run through megatron's forward-only schedule equals each held-out sample put through the bare
    model by hand (sum of masked per-token losses / tokens), leaves no gradient, and returns the model to
    training mode; the held-out samples are data.split's validation documents, none of the training ones."""
    from megatron_ext.sizes import padded_vocab_size
    from megatron_ext.training.batches import training_samples
    from megatron_ext.training.train import build_model, forward_losses, prepare_data
    from megatron_ext.training.validation import Validation

    config = from_dict(TrainConfig, dict(
        model=dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32),
        data=dict(tiny_corpus=True, tiny_corpus_documents=40, tokenizer_vocab_size=400,
                  cache_dir=str(tmp_path / "cache"), split="80,20,0", document_mask=True, mask_eod_loss=True),
        training=dict(train_iters=20, micro_batch_size=2, global_batch_size=4, precision="fp32", eval_interval=1,
                      eval_iters=2),
    ), prefix="")
    validate(config)
    tokenizer, prefixes = prepare_data(config)
    torch.manual_seed(0)
    model = build_model(config, padded_vocab_size(tokenizer.vocab_size, 1), torch.device("cpu"))
    validation = Validation(config, tokenizer, prefixes)
    got = validation.run(model, partial(forward_losses, model, forward_only=True))
    assert all(module.training for module in model[0].modules())  # back in training mode
    expected = loss_by_hand(model, validation.dataset, config.training.eval_iters * config.training.global_batch_size)
    assert got["valid_loss"] == pytest.approx(expected, rel=1e-5)
    assert got["valid_ppl"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)
    assert all(float(p.main_grad.abs().sum()) == 0 for p in model[0].parameters())

    # data.valid_data instead: every document of those prefixes
    config.data.split, config.data.valid_data = None, list(prefixes)
    validate(config)
    whole = Validation(config, tokenizer, prefixes)
    got = whole.run(model, partial(forward_losses, model, forward_only=True))
    assert got["valid_loss"] == pytest.approx(loss_by_hand(model, whole.dataset, 8), rel=1e-5)
    config.data.split, config.data.valid_data = "80,20,0", []

    # the validation documents are not trained on: no validation window occurs among the training windows
    train = training_samples(config, tokenizer, prefixes, num_samples=200)
    trained = {tuple(train[i]["tokens"].tolist()) for i in range(len(train))}
    held_out = [tuple(validation.dataset[i]["tokens"].tolist()) for i in range(len(validation.dataset))]
    assert not trained.intersection(held_out)


# --- data.valid_data's own refusals -----------------------------------------------------------------------


def test_refusals_of_validation_data_name_data_valid_data_and_train_weights_stay_with_train_data(tmp_path):
    """data.valid_data of EOD tokens alone under data.mask_eod_loss was refused as 'data.train_data: ...' (the
    setting not at fault), both by `train` before any process and on the ranks; and data.train_data_weights (one per
    training prefix) were handed to the validation prefixes' blend, which refused their count."""
    from megatron_ext.data import SentencePieceTokenizer, preprocess, train_sentencepiece
    from megatron_ext.errors import InputError
    from megatron_ext.training.cli import check_data
    from megatron_ext.training.validation import Validation
    from test_data_checks import write_jsonl

    texts = [f"document {i} says hello world " * (1 + i % 5) for i in range(40)]
    model = train_sentencepiece([write_jsonl(tmp_path / "words.jsonl", texts)], tmp_path / "tok", 320, seed=0)
    tokenizer = SentencePieceTokenizer(model)
    prefixes = {}
    for name, documents in (("a", texts[:20]), ("b", texts[20:]), ("held_out", texts[::3]), ("eod_only", [""] * 40)):
        preprocess([write_jsonl(tmp_path / f"{name}.jsonl", documents)], tmp_path / name, tokenizer, workers=1,
                   progress=False)
        prefixes[name] = str(tmp_path / name)
    config = from_dict(TrainConfig, dict(
        model=dict(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=16),
        data=dict(train_data=[prefixes["a"], prefixes["b"]], train_data_weights=[1, 3], tokenizer_model=str(model),
                  valid_data=[prefixes["held_out"]], mask_eod_loss=True, cache_dir=str(tmp_path / "cache")),
        training=dict(train_iters=4, micro_batch_size=1, global_batch_size=2, eval_interval=2, eval_iters=2),
        optimizer=dict(warmup_iters=0),
    ), prefix="")
    validate(config)
    check_data(config)
    assert len(Validation(config, tokenizer, config.data.train_data).dataset) == 4  # unweighted: one prefix

    config.data.valid_data = [prefixes["eod_only"]]
    says = rf"data.valid_data: every token of data prefix '{prefixes['eod_only']}' is EOD"
    with pytest.raises(InputError, match=says):  # `train`, before any process starts
        check_data(config)
    with pytest.raises(InputError, match=says):  # every rank, when it opens the data
        Validation(config, tokenizer, config.data.train_data)
