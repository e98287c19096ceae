"""megatron_ext.checkpoint.store on one CPU rank: exact resume, crash safety, keep_last, errors.

The reference for every resume is the same run continued without saving and loading.
Resharding across TP/PP (several ranks) is checked by the training tests.
"""
import json
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_ext.models import LongContextGPTModel, LongContextTransformerConfig, local_layer_spec
from megatron_ext.rope import RopeConfig
from megatron_ext.checkpoint import layout, store
from megatron_ext.checkpoint.store import (
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)

VOCAB, SEQ, MICRO_BATCH = 64, 16, 2
HARPE = RopeConfig(head_base_strategy="uniform", head_base_params={"b_min": 1e4, "b_max": 1e6})
STATE = {"config": {"seq_length": SEQ, "rope": {"head_bases": "uniform"}},
         "head_bases": [1e4, 1e6], "consumed_samples": 4, "tokenizer_model": "/data/tok.model"}


@pytest.fixture(scope="module", autouse=True)
def parallel_state(single_rank):
    return single_rank


# --- a tiny HARPE GPT in megatron DDP + Adam + LR schedule ---------------------------------

def make_config(bf16=False):
    dtype = torch.bfloat16 if bf16 else torch.float32
    return LongContextTransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=48, rope=HARPE, use_cpu_initialization=True,
        bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.1,  # dropout makes the losses depend on the restored torch RNG
        attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False)


def build_model(seed, bf16=False):
    torch.manual_seed(seed)
    return LongContextGPTModel(make_config(bf16), local_layer_spec(), VOCAB, SEQ)


def build_training(seed, *, distributed, bf16=False):
    """[DDP model], megatron Adam, OptimizerParamScheduler (warmup, so the LR changes each step)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module
    model = build_model(seed, bf16)
    if bf16:
        model = Float16Module(model.config, model)
    ddp_model = DistributedDataParallel(
        config=model.config, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                 use_distributed_optimizer=distributed))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, min_lr=1e-3, weight_decay=0.01, clip_grad=1.0,
                        use_distributed_optimizer=distributed, bf16=bf16,
                        params_dtype=model.config.params_dtype), [ddp_model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1e-2, min_lr=1e-3, lr_warmup_steps=3, lr_decay_steps=20,
        lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=20,
        wd_incr_style="constant")
    return [ddp_model], optimizer, scheduler


def batch(index):
    generator = torch.Generator().manual_seed(100 + index)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:], torch.arange(SEQ).expand(MICRO_BATCH, SEQ)


def train_step(model, optimizer, scheduler, index):
    ddp_model, = model
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    tokens, labels, position_ids = batch(index)
    loss = ddp_model(tokens, position_ids, None, labels=labels).float().mean()
    loss.backward()
    ddp_model.finish_grad_sync()
    optimizer.step()
    scheduler.step(increment=1)
    return loss.item()


def parameters(model):
    return {name: p.detach().clone() for name, p in model[0].module.named_parameters()}


def assert_same_parameters(model, expected):
    for name, param in model[0].module.named_parameters():
        assert torch.equal(param.detach(), expected[name]), name


def save(root, iteration, training, **kwargs):
    model, optimizer, scheduler = training
    return save_checkpoint(root, iteration, model=model, optimizer=optimizer, scheduler=scheduler,
                           state=STATE, **kwargs)


# --- exact resume ----------------------------------------------------------------------------

@pytest.mark.parametrize("distributed, bf16", [(False, False), (True, False), (False, True)],
                         ids=["adam", "distributed-adam", "bf16-adam"])
def test_resumed_run_repeats_the_uninterrupted_run_bitwise(tmp_path, distributed, bf16):
    saved = build_training(seed=0, distributed=distributed, bf16=bf16)
    for index in (0, 1):
        train_step(*saved, index)
    path = save(tmp_path, 2, saved)
    at_save = parameters(saved[0])
    uninterrupted = [train_step(*saved, index) for index in (2, 3)]
    at_end = parameters(saved[0])

    resumed = build_training(seed=1, distributed=distributed, bf16=bf16)  # other weights
    info = load_checkpoint(path, model=resumed[0], optimizer=resumed[1], scheduler=resumed[2])
    assert info["iteration"] == 2 and info["state"] == STATE and info["rng_restored"]
    assert_same_parameters(resumed[0], at_save)
    assert resumed[2].num_steps == 2
    assert [train_step(*resumed, index) for index in (2, 3)] == uninterrupted
    assert_same_parameters(resumed[0], at_end)


@pytest.mark.parametrize("distributed", [False, True], ids=["adam", "distributed-adam"])
def test_checkpoint_before_the_first_step_resumes_with_a_fresh_optimizer(tmp_path, distributed):
    saved = build_training(seed=0, distributed=distributed)
    path = save(tmp_path, 0, saved)
    uninterrupted = [train_step(*saved, index) for index in (0, 1)]

    resumed = build_training(seed=1, distributed=distributed)
    load_checkpoint(path, model=resumed[0], optimizer=resumed[1], scheduler=resumed[2])
    assert [train_step(*resumed, index) for index in (0, 1)] == uninterrupted


def test_resume_into_the_other_optimizer_flavour_is_refused_before_loading(tmp_path):
    path = save(tmp_path, 1, build_training(seed=0, distributed=True))
    plain = build_training(seed=1, distributed=False)
    before = parameters(plain[0])
    with pytest.raises(ValueError, match="parallel.use_distributed_optimizer: True"):
        load_checkpoint(path, model=plain[0], optimizer=plain[1])
    assert_same_parameters(plain[0], before)


def test_weights_only_load_into_a_bare_model(tmp_path):
    saved = build_training(seed=0, distributed=True)
    train_step(*saved, 0)
    path = save(tmp_path, 1, saved)
    bare = build_model(seed=1)
    info = load_checkpoint(path, model=[bare])
    for name, param in bare.named_parameters():
        assert torch.equal(param, saved[0][0].module.get_parameter(name)), name
    assert info["state"]["head_bases"] == STATE["head_bases"]


# --- layout and atomicity --------------------------------------------------------------------

def test_layout_latest_and_human_readable_summary(tmp_path):
    training = build_training(seed=0, distributed=False)
    path = save(tmp_path, 10, training)
    assert path == tmp_path / "iter_0000010"
    assert (tmp_path / "latest").read_text().strip() == "iter_0000010"
    assert {"complete", "metadata.json", "common.pt", "megatron_ext.json"} <= set(os.listdir(path))
    assert (path / "rng" / "rank_00000.pt").is_file()
    summary = json.loads((path / "megatron_ext.json").read_text())
    assert summary["iteration"] == 10 and summary["state"] == STATE
    assert summary["scheduler"]["num_steps"] == 0
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def _write_part_then_fail(sharded_state_dict, checkpoint_dir, **kwargs):
    with open(os.path.join(checkpoint_dir, "__0_0.distcp"), "wb") as handle:
        handle.write(b"half a shard")
    raise OSError("disk full (simulated)")


def _fail_on_first_directory_rename(monkeypatch):
    real_replace = os.replace

    def replace(source, destination):
        if os.path.isdir(source):
            raise OSError("killed before the rename (simulated)")
        return real_replace(source, destination)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("crash", ["while-writing-tensors", "before-rename"])
def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, crash):
    from megatron.core import dist_checkpointing
    training = build_training(seed=0, distributed=False)
    train_step(*training, 0)
    good = save(tmp_path, 1, training)
    at_good = parameters(training[0])
    train_step(*training, 1)

    with monkeypatch.context() as patch:
        if crash == "while-writing-tensors":
            patch.setattr(dist_checkpointing, "save", _write_part_then_fail)
        else:
            _fail_on_first_directory_rename(patch)
        with pytest.raises(OSError, match="simulated"):
            save(tmp_path, 2, training)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith("iter_0000002.tmp-")]
    assert len(stale) == 1
    assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
    assert list_checkpoints(tmp_path) == [good]
    assert find_checkpoint(tmp_path, "auto") == good
    with pytest.raises(ValueError, match="checkpoint.resume"):
        find_checkpoint(tmp_path, str(stale[0]))

    restored = build_training(seed=1, distributed=False)
    load_checkpoint(find_checkpoint(tmp_path, "auto"), model=restored[0], optimizer=restored[1],
                    scheduler=restored[2])
    assert_same_parameters(restored[0], at_good)

    save(tmp_path, 3, training)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000003",
                                                          "latest"]
    assert find_checkpoint(tmp_path, "auto") == tmp_path / "iter_0000003"


def test_keep_last_two_keeps_the_two_newest_and_latest_is_complete(tmp_path):
    training = build_training(seed=0, distributed=False)
    for iteration in range(1, 5):
        save(tmp_path, iteration, training, keep_last=2)
        newest = [layout.checkpoint_name(i) for i in range(max(1, iteration - 1), iteration + 1)]
        assert [p.name for p in list_checkpoints(tmp_path)] == newest
        latest = tmp_path / (tmp_path / "latest").read_text().strip()
        assert latest.name == newest[-1] and layout.is_complete_checkpoint(latest)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003", "iter_0000004", "latest"]


def test_saving_an_iteration_again_replaces_it(tmp_path):
    training = build_training(seed=0, distributed=False)
    save(tmp_path, 1, training)
    train_step(*training, 0)
    save(tmp_path, 1, training)
    after_step = parameters(training[0])
    restored = build_training(seed=1, distributed=False)
    load_checkpoint(tmp_path / "iter_0000001", model=restored[0])
    assert_same_parameters(restored[0], after_step)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", "latest"]


def test_auto_falls_back_to_a_scan_when_latest_names_a_missing_checkpoint(tmp_path):
    training = build_training(seed=0, distributed=False)
    save(tmp_path, 1, training)
    save(tmp_path, 2, training)
    (tmp_path / "latest").write_text("iter_0000009\n")
    assert find_checkpoint(tmp_path, "auto") == tmp_path / "iter_0000002"


# --- resume settings and errors ----------------------------------------------------------------

def test_resume_none_and_auto_without_checkpoints_start_fresh(tmp_path):
    assert find_checkpoint(tmp_path, "none") is None
    assert find_checkpoint(tmp_path, "auto") is None
    assert find_checkpoint(tmp_path / "not-created-yet", "auto") is None


def test_resume_from_a_missing_path_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint.resume"):
        find_checkpoint(tmp_path, str(tmp_path / "iter_0000007"))
    with pytest.raises(FileNotFoundError, match="checkpoint.resume"):
        load_checkpoint(tmp_path / "iter_0000007", model=[build_model(0)])


def test_resume_from_an_incomplete_directory_names_the_setting(tmp_path):
    incomplete = tmp_path / "iter_0000005"
    incomplete.mkdir()
    (incomplete / "common.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="checkpoint.resume.*not a complete checkpoint"):
        find_checkpoint(tmp_path, str(incomplete))
    with pytest.raises(ValueError, match="checkpoint.resume"):
        load_checkpoint(incomplete, model=[build_model(0)])


def test_resume_from_the_checkpoint_root_points_at_its_newest(tmp_path):
    save(tmp_path, 3, build_training(seed=0, distributed=False))
    with pytest.raises(ValueError, match="directory of checkpoints.*iter_0000003"):
        find_checkpoint(tmp_path, str(tmp_path))
    assert find_checkpoint(tmp_path, "iter_0000003") == tmp_path / "iter_0000003"


def test_unusable_checkpoint_dir_fails_before_any_work(tmp_path, monkeypatch):
    training = build_training(seed=0, distributed=False)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    with pytest.raises(NotADirectoryError, match="checkpoint.dir"):
        save(a_file / "checkpoints", 1, training)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests run as root
    with pytest.raises(PermissionError, match="checkpoint.dir"):
        save(tmp_path / "checkpoints", 1, training)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_state_that_is_not_json_fails_before_any_work(tmp_path):
    model, optimizer, scheduler = build_training(seed=0, distributed=False)
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler,
                        state={"bases": torch.ones(2)})
    assert os.listdir(tmp_path) == []


# --- RNG -------------------------------------------------------------------------------------

def draws():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_rng_draws_after_load_equal_the_draws_after_save(tmp_path):
    training = build_training(seed=0, distributed=False)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    before_save = random.getstate(), np.random.get_state(), torch.get_rng_state()
    path = save(tmp_path, 1, training)
    after_save = draws()

    random.setstate(before_save[0])
    np.random.set_state(before_save[1])
    torch.set_rng_state(before_save[2])
    assert draws() == after_save  # saving consumed no random numbers

    training = build_training(seed=5, distributed=False)  # reseeds torch
    random.seed(11)
    np.random.seed(12)
    info = load_checkpoint(path, model=training[0], optimizer=training[1])
    assert info["rng_restored"]
    assert draws() == after_save


def test_rng_is_left_alone_when_the_parallel_layout_changed(tmp_path, monkeypatch):
    path = save(tmp_path, 1, build_training(seed=0, distributed=False))
    model = build_model(seed=1)
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    monkeypatch.setattr(store, "_parallel_layout", lambda: {"world_size": 2, "tensor": 2})
    info = load_checkpoint(path, model=[model])
    assert not info["rng_restored"]
    assert torch.equal(torch.rand(3), expected)
