"""The training entry point end to end: parallel layouts agree, resume is exact, TP=2 -> TP=1 reshards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("train_checks.py")
ITERS = 4


def base_config(cache_dir: Path) -> dict:
    """Tiny HARPE + PoSE + GQA model, fp32, constant LR (so runs of other lengths share a schedule)."""
    return dict(
        model=dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, seq_length=64),
        rope=dict(head_base_strategy="uniform", head_base_params=dict(b_min=1e4, b_max=1e6)),
        pose=dict(enabled=True, target_length=512),
        data=dict(tiny_corpus=True, tiny_corpus_documents=40, tokenizer_vocab_size=400, cache_dir=str(cache_dir)),
        training=dict(train_iters=ITERS, micro_batch_size=1, global_batch_size=4, precision="fp32"),
        optimizer=dict(lr=3e-3, min_lr=3e-3, warmup_iters=0, lr_decay_style="constant"),
        checkpoint=dict(save_interval=3, keep_last=None),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    base = base_config(work / "cache")
    (work / "base.json").write_text(json.dumps(base))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # the single-process reference, through the command line a user runs
    import yaml
    reference = dict(base, checkpoint=dict(base["checkpoint"], dir=str(work / "single")),
                     logging=dict(metrics_file=str(work / "single.jsonl"), tensorboard_dir=None, progress_bar=False))
    (work / "single.yaml").write_text(yaml.safe_dump(reference))
    single = subprocess.run([sys.executable, "-m", "megatron_ext.cli", "train", "--config", str(work / "single.yaml")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(WORKER), str(work), str(work / "base.json")],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = {name: {int(k): v for k, v in losses.items()}
               for name, losses in json.loads((work / "results.json").read_text()).items()}
    rows = [json.loads(line) for line in (work / "single.jsonl").read_text().splitlines()]
    results["single"] = {row["iteration"]: row["loss"] for row in rows}
    results["single_metrics"] = rows
    return results


def same_losses(a: dict, b: dict, iterations):
    assert [round(a[i], 5) for i in iterations] == pytest.approx([round(b[i], 5) for i in iterations], abs=2e-5)


def test_metrics_file_has_a_row_per_iteration_with_throughput(runs):
    rows = runs["single_metrics"]
    assert [r["iteration"] for r in rows] == list(range(1, ITERS + 1))
    for row in rows:
        assert row["lr"] == pytest.approx(3e-3) and row["grad_norm"] > 0
        # tokens/s is tokens per iteration over the step time; TFLOP/s follows from the FLOP formula
        assert row["tokens_per_s"] == pytest.approx(4 * 64 / row["step_s"], rel=1e-6)
        assert row["tflops_per_device"] > 0 and row["mfu"] is None  # no known peak on a CPU


def test_single_process_run_learns(runs):
    losses = runs["single"]
    assert sorted(losses) == list(range(1, ITERS + 1))
    assert all(l == l and l < 10 for l in losses.values())  # finite
    assert losses[ITERS] < losses[1]


@pytest.mark.parametrize("layout", ["dp2", "tp2", "pp2", "cp2", "dp2_distributed_optimizer", "dp2_full_recompute"])
def test_parallel_layouts_match_the_single_process_run(runs, layout):
    same_losses(runs[layout], runs["single"], range(1, ITERS + 1))


def test_stop_and_resume_reproduces_the_uninterrupted_losses(runs):
    assert sorted(runs["resume_first_leg"]) == [1, 2]
    assert sorted(runs["resume_second_leg"]) == [3, 4]
    resumed = {**runs["resume_first_leg"], **runs["resume_second_leg"]}
    assert [resumed[i] for i in (3, 4)] == pytest.approx([runs["dp2"][i] for i in (3, 4)], abs=1e-6)


def test_tp2_checkpoint_loads_at_tp1_with_the_same_next_loss(runs):
    assert sorted(runs["tp2_to_tp1"]) == [4]
    assert runs["tp2_to_tp1"][4] == pytest.approx(runs["tp2"][4], abs=2e-5)


def test_pretrained_weights_start_a_new_run_at_iteration_one(runs):
    """Weights trained for 3 iterations start a fresh run: iteration 1 again, with a lower loss."""
    assert sorted(runs["pretrained"]) == [1]
    assert runs["pretrained"][1] < runs["single"][1] - 0.05


def test_document_mask_reaches_the_model_and_cp2_agrees(runs):
    """data.document_mask + mask_eod_loss change what is trained once a window holds a document boundary (the
    third iteration here), and CP=2 slices the document ids with the tokens: the losses of DP=2."""
    same_losses(runs["documents_cp2"], runs["documents_dp2"], range(1, 4))
    masked, plain = runs["documents_dp2"], runs["long_dp2"]
    assert [masked[i] for i in (1, 2)] == pytest.approx([plain[i] for i in (1, 2)], abs=2e-6)  # no boundary yet
    assert abs(masked[3] - plain[3]) > 5e-5  # one window of four has a boundary: measured 2e-4
