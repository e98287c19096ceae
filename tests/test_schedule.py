"""Batch-size ramp-up, the WSD learning rate, interleaved pipeline stages and validation during training.

The unit tests check the ramp's layout against hand-worked numbers; one 2-rank launch (tests/schedule_checks.py)
checks the loop: PP=2 x VPP=2 and CP=2 give DP=2's training and validation losses, interleaved chunks save and
resume (also into one chunk per stage), and a ramped run resumed midway repeats the uninterrupted one.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.config import ConfigError, TrainConfig, from_dict, validate

WORKER = Path(__file__).with_name("schedule_checks.py")


def config_of(**sections) -> TrainConfig:
    raw = dict(data=dict(tiny_corpus=True))
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    config = from_dict(TrainConfig, raw, prefix="")
    validate(config)
    return config


# --- the ramp, by hand --------------------------------------------------------------------------------


def test_ramp_batch_sizes_and_data_position_follow_megatron_rule():
    from megatron_ext.training.batches import BatchRamp

    # start 2, +2 per 4 / ((6 - 2) / 2) = 2 samples: consumed 0 -> 2; 2 -> 2 + 2 * int(2 / 2) = 4;
    # 6 > 4 samples -> 6 (the global batch) from then on
    ramp = BatchRamp(config_of(training=dict(global_batch_size=6, rampup_batch_size=[2, 2, 4])))
    assert [ramp.batch_size(i) for i in range(5)] == [2, 4, 6, 6, 6]
    assert [ramp.consumed_samples(i) for i in range(6)] == [0, 2, 6, 12, 18, 24]
    flat = BatchRamp(config_of(training=dict(global_batch_size=6)))
    assert [flat.consumed_samples(i) for i in range(3)] == [0, 6, 12]


class IndexDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, index):
        return {"tokens": torch.tensor([index])}


def test_ramped_micro_batches_take_each_sample_once_and_resume_at_the_same_sample():
    from megatron_ext.training.batches import BatchRamp, RampedMicroBatches

    config = config_of(training=dict(global_batch_size=8, rampup_batch_size=[2, 2, 6]))
    ramp = BatchRamp(config)
    ranks = [RampedMicroBatches(IndexDataset(), ramp, micro_batch_size=1, dp_rank=r, dp_size=2) for r in (0, 1)]
    served = []
    for iteration in range(6):
        assert ranks[0].current_global_batch_size == ramp.batch_size(iteration)
        taken = sorted(int(b["tokens"]) for rank in ranks for b in rank.next_iteration())
        first = ramp.consumed_samples(iteration)
        assert taken == list(range(first, first + ramp.batch_size(iteration)))
        served.append(taken)
    # +2 per 6 / 3 = 2 samples: consumed 0 -> 2, 2 -> 2 + 2 * 1, 6 -> 2 + 2 * 3 = 8 (6 is not past the ramp)
    assert [len(s) for s in served] == [2, 4, 8, 8, 8, 8]
    resumed = [RampedMicroBatches(IndexDataset(), ramp, micro_batch_size=1, dp_rank=r, dp_size=2, start_iteration=3)
               for r in (0, 1)]
    assert sorted(int(b["tokens"]) for rank in resumed for b in rank.next_iteration()) == served[3]


def test_batch_layout_refusals_name_the_setting():
    from megatron_ext.training.batches import check_batch_layout

    ramp = config_of(training=dict(global_batch_size=8, rampup_batch_size=[2, 2, 6]))
    with pytest.raises(ConfigError, match=r"rampup_batch_size reaches a global batch of 2 samples.*micro-batch x DP = 4"):
        check_batch_layout(ramp, dp_size=4)
    check_batch_layout(ramp, dp_size=2)
    interleaved = config_of(model=dict(num_layers=4), training=dict(global_batch_size=6),
                            parallel=dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2))
    with pytest.raises(ConfigError, match=r"virtual_pipeline_model_parallel_size.*groups of PP = 2.*3 micro-batches"):
        check_batch_layout(interleaved, dp_size=2)
    check_batch_layout(interleaved, dp_size=1)


@pytest.mark.parametrize("sections, message", [
    (dict(optimizer=dict(lr_decay_style="WSD")), "lr_wsd_decay_iters"),
    (dict(optimizer=dict(lr_wsd_decay_iters=5)), "read only by optimizer.lr_decay_style=WSD"),
    (dict(training=dict(global_batch_size=8, rampup_batch_size=[3, 2, 100])), "must reach"),
    (dict(training=dict(global_batch_size=8, rampup_batch_size=[2, 2])), r"\[start, increment, samples\]"),
    (dict(training=dict(global_batch_size=8, micro_batch_size=2, rampup_batch_size=[2, 1, 100])), "multiples of"),
    (dict(parallel=dict(virtual_pipeline_model_parallel_size=2)), "pipeline_model_parallel_size >= 2"),
    (dict(model=dict(num_layers=4), parallel=dict(pipeline_model_parallel_size=2,
                                                  virtual_pipeline_model_parallel_size=4)), "must divide model.num_layers"),
    (dict(training=dict(eval_interval=5)), "needs validation data"),
    (dict(training=dict(eval_interval=5), data=dict(split="100,0,0")), "needs validation data"),
    (dict(data=dict(valid_data=["x"])), "read only with training.eval_interval"),
    (dict(training=dict(eval_interval=5), data=dict(split="a,b")), "data.split"),
])
def test_schedule_and_validation_settings_are_refused_by_name(sections, message):
    with pytest.raises(ConfigError, match=message):
        config_of(**sections)


# --- the loop, on two gloo ranks --------------------------------------------------------------------------


def base_config(cache_dir: Path) -> dict:
    """4 layers (2 chunks of 1 layer on each of 2 stages), HARPE + PoSE + GQA, validation on data.split's
    held-out documents every 2 iterations, WSD: warmup 1, stable to 2, linear anneal over the last 2 of 4."""
    return dict(
        model=dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, seq_length=64),
        rope=dict(head_base_strategy="uniform", head_base_params=dict(b_min=1e4, b_max=1e6)),
        pose=dict(enabled=True, target_length=512),
        data=dict(tiny_corpus=True, tiny_corpus_documents=40, tokenizer_vocab_size=400, cache_dir=str(cache_dir),
                  split="90,10,0"),
        training=dict(train_iters=4, micro_batch_size=1, global_batch_size=4, precision="fp32", eval_interval=2,
                      eval_iters=1),
        optimizer=dict(lr=3e-3, min_lr=3e-4, warmup_iters=1, lr_decay_style="WSD", lr_wsd_decay_iters=2,
                       lr_wsd_decay_style="linear"),
        checkpoint=dict(save_interval=3, keep_last=None),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("schedule")
    (work / "base.json").write_text(json.dumps(base_config(work / "cache")))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(WORKER), str(work), str(work / "base.json")],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = {}
    for path in work.glob("*.jsonl"):
        rows[path.stem] = {row["iteration"]: row for row in map(json.loads, path.read_text().splitlines())}
    rows["work"] = work
    return rows


def column(rows: dict, key: str) -> dict:
    return {i: row[key] for i, row in rows.items() if key in row}


def same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    assert [a[i] for i in sorted(a)] == pytest.approx([b[i] for i in sorted(b)], abs=2e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_interleaved_pipeline_trains_and_validates_like_dp2(runs):
    same(column(runs["interleaved"], "loss"), column(runs["dp2"], "loss"))
    same(column(runs["interleaved"], "valid_loss"), column(runs["dp2"], "valid_loss"))
    # each chunk its own DDP (the first bucketed), gradients reduced per chunk, the optimizer sharded over them
    same(column(runs["interleaved_distributed_optimizer"], "loss"), column(runs["dp2"], "loss"))


@pytest.mark.slow
@pytest.mark.distributed
def test_validation_runs_every_eval_interval_and_agrees_across_layouts(runs):
    valid = column(runs["dp2"], "valid_loss")
    assert sorted(valid) == [2, 4]
    assert valid[4] < valid[2]  # held-out loss falls as the model trains
    same(column(runs["cp2"], "valid_loss"), valid)  # reduced over DP x CP like the training loss
    assert column(runs["dp2"], "valid_ppl")[4] == pytest.approx(torch.tensor(valid[4]).exp().item(), rel=1e-6)
    assert (runs["work"] / "dp2_loss.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.distributed
def test_interleaved_chunks_resume_exactly_and_load_into_one_chunk_per_stage(runs):
    first, second = runs["interleaved_resumed"], runs["interleaved_resumed_leg2"]
    assert sorted(first) == [1, 2] and sorted(second) == [3, 4]
    resumed = {**column(first, "loss"), **column(second, "loss")}
    same(resumed, column(runs["interleaved"], "loss"))
    same({**column(first, "valid_loss"), **column(second, "valid_loss")}, column(runs["interleaved"], "valid_loss"))
    # PP=2 x VPP=2's checkpoint of iteration 3, resumed at DP=2 (one chunk per rank): the same iteration 4
    same(column(runs["interleaved_to_dp2"], "loss"), {4: runs["interleaved"][4]["loss"]})


@pytest.mark.slow
@pytest.mark.distributed
def test_rampup_grows_the_batch_and_resumes_at_the_same_samples(runs):
    assert column(runs["ramp"], "global_batch_size") == {1: 2, 2: 2, 3: 4, 4: 4}  # [2, 2, 4]: +2 after 4 samples
    assert runs["ramp"][1]["loss"] != pytest.approx(runs["dp2"][1]["loss"], abs=1e-4)  # half the batch
    resumed = {**column(runs["ramp_resumed"], "loss"), **column(runs["ramp_resumed_leg2"], "loss")}
    same(resumed, column(runs["ramp"], "loss"))
    assert column(runs["ramp_resumed_leg2"], "global_batch_size") == {3: 4, 4: 4}


@pytest.mark.slow
@pytest.mark.distributed
def test_wsd_learning_rate_is_warmup_stable_then_anneal(runs):
    def by_hand(step, peak=3e-3, low=3e-4):  # warmup 1 step, stable up to step 2, linear to low over steps 3-4
        if step <= 1:
            return peak * step
        if step <= 2:
            return peak
        return low + (1 - (step - 2) / 2) * (peak - low)

    # the metrics row of iteration i holds the LR after its scheduler step: megatron's lr at step i
    assert column(runs["dp2"], "lr") == pytest.approx({i: by_hand(i) for i in range(1, 5)})


# --- the planner -------------------------------------------------------------------------------------------


def planned(virtual_stages, pp, layers=32, global_batch_size=32):
    import dataclasses

    from megatron_ext.config.train import ModelConfig
    from megatron_ext.launch.memory import stage_memory
    from megatron_ext.launch.planner import PlanRequest, evaluate, structural_problems
    from megatron_ext.launch.presets import GPUS
    from megatron_ext.launch.workload import Layout, Workload

    model = ModelConfig(num_layers=layers, hidden_size=4096, num_attention_heads=32, seq_length=8192, vocab_size=32000)
    work = Workload("w", model, seq_length=8192, global_batch_size=global_batch_size, position_range=8192,
                    virtual_pipeline_stages=virtual_stages)
    request = PlanRequest(work, dataclasses.replace(GPUS["h100-80gb"]), 8 * pp)
    layout = Layout(tp=8, pp=pp, cp=1, dp=1, micro_batch_size=1, recompute="full")
    first_stage = stage_memory(work, layout, 0).terms["activations"]
    return evaluate(request, layout), structural_problems(request, layout), first_stage


def test_planner_divides_the_bubble_by_the_chunks_and_counts_their_activations():
    """Narayanan et al. 2021 (Sec. 2.2.2): interleaving v chunks cuts the bubble (p - 1) / m to (p - 1) / (v m) and
    makes stage 1 hold 1 + (p - 1) / (p v) times 1F1B's activations (here m = 32 >= the warm-up)."""
    plain, _, plain_activations = planned(None, pp=4)
    for v in (2, 4):
        interleaved, problems, activations = planned(v, pp=4)
        assert problems == []
        assert interleaved.time.pipeline_bubble == pytest.approx(plain.time.pipeline_bubble / v)
        assert interleaved.time.compute == pytest.approx(plain.time.compute)
        assert activations == pytest.approx(plain_activations * (1 + 3 / (4 * v)))


def test_planner_refuses_interleaving_that_megatron_cannot_run():
    assert any("interleaving 2 chunks" in p for p in planned(2, pp=1)[1])
    assert any("interleaving 4 chunks" in p for p in planned(4, pp=4, layers=24)[1])  # 24 % 16
    assert any("interleaving 2 chunks" in p for p in planned(2, pp=4, global_batch_size=6)[1])  # 6 % 4


@pytest.mark.parametrize("section, key, value", [("training", "rampup_batch_size", [4, 4, 64]),
                                                 ("data", "split", "90,10,0")])
def test_resuming_with_another_ramp_or_split_is_refused(tmp_path, section, key, value):
    """Either changes which samples the remaining iterations read (the data position or the training documents)."""
    from test_start import resumable_run, run_config

    from megatron_ext.checkpoint.layout import CheckpointError
    from megatron_ext.training.start import settle_start

    given = resumable_run(tmp_path)
    given[section][key] = value
    with pytest.raises(CheckpointError, match=rf"{section}\.{key}: .* in the checkpoint"):
        settle_start(run_config(given), given)


def test_a_split_part_without_sequences_is_refused_instead_of_hanging(tmp_path):
    """megatron's GPTDataset counts epochs forever for a part without tokens (measured with the tiny corpus and
    data.split=99,1,0: a hang); with 40 sequences a 1% part is sequences 40 to 40."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_ext.training.batches import TRAIN, VALID, check_split_part

    prefix = tmp_path / "docs"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(100))
    for document in range(40):
        builder.add_document(np.arange(5) + document, [5])
    builder.finalize(f"{prefix}.idx")
    with pytest.raises(ConfigError, match=r"data.split=99,1,0 leaves the validation part no sequence of the 40 .* "
                                          r"sequences 40 to 40\): give that part at least 3%"):
        check_split_part([str(prefix)], "99,1,0", VALID)
    check_split_part([str(prefix)], "97,3,0", VALID)  # sequences 39 to 40
    check_split_part([str(prefix)], "99,1,0", TRAIN)
