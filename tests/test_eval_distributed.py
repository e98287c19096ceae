"""Evaluation spread over ranks (gloo, CPU): two data-parallel ranks write exactly the JSON of one rank for every
suite task; at CP=2 a prompt's tokens and position ids (plain and PoSE) are split zig-zag as in training and the
logits, chosen rows and attention equal CP=1's, also for a length that 2 x CP does not divide (it is padded), and
on four ranks with TP=2, PP=2 or DP=2 beside it; bad layouts are refused in one line."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from megatron_ext.cli import main
from megatron_ext.eval.models import MegatronExtModel, load_eval_model
from megatron_ext.eval.registry import TASKS
from megatron_ext.eval.suite import load_suite_config, run_suite

from test_eval_models import checkpoint  # noqa: F401  (the saved HARPE checkpoint fixture: 4 heads, 2 KV groups)
from test_eval_parallel_worker import COMBINED_LAYOUTS, combined_settings, counting
from test_eval_support import training_text

pytest_plugins = ["test_eval_support"]

WORKER = Path(__file__).with_name("test_eval_parallel_worker.py")
ROOT = Path(__file__).resolve().parents[1]
SUITE_TASKS = ["perplexity", "passkey", "needle", "ruler", "attention"]  # every built-in task


def suite_yaml(path: Path, root: Path, output_dir: Path) -> Path:
    """Every task, with trial counts that do not split evenly over two ranks (3 prompts, batches of 2)."""
    data = path.parent / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(training_text()[i::7])}) + "\n" for i in range(3)))
    config = dict(
        title="spread", models=[{"path": str(root), "name": "harpe"}],
        tasks=SUITE_TASKS, output_dir=str(output_dir), report="spread.md",
        perplexity=dict(data=[str(data)], lengths=[40, 96], stride=24, num_documents=3, max_document_tokens=160),
        passkey=dict(lengths=[96, 130], trials=3, batch_size=2),
        needle=dict(lengths=[96, 130], depths=[0.0, 0.5, 1.0], trials=3, batch_size=2),
        ruler=dict(lengths=[200], trials=3, num_keys=2, num_values=2, num_hops=2),
        attention=dict(lengths=[96, 130], trials=3),
    )
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def spread(checkpoint, tmp_path_factory):  # noqa: F811
    """One torchrun launch of two gloo ranks: the suite at DP=2, then CP=2 logits (see the worker)."""
    root, _ = checkpoint
    work = tmp_path_factory.mktemp("spread")
    config = suite_yaml(work / "suite.yaml", root, work / "dp2")
    out = work / "spread.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), "spread", str(root), str(config), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return dict(config=config, results=torch.load(out), dp2=work / "dp2" / "spread" / "harpe")


@pytest.mark.distributed
def test_two_data_parallel_ranks_write_the_json_of_one_rank_for_every_task(spread, tmp_path, monkeypatch):
    results = spread["results"]
    assert results["data_parallel_size"] == 2
    forward_passes, counted = counting(MegatronExtModel.logits)
    monkeypatch.setattr(MegatronExtModel, "logits", counted)
    run_suite(load_suite_config(spread["config"], [f"output_dir={tmp_path}"]))  # here: one rank, DP=1
    # the ranks shared the forward passes of one rank, none twice
    assert min(results["passes_per_rank"]) > 0 and sum(results["passes_per_rank"]) == forward_passes["calls"]
    for task in SUITE_TASKS:
        one_rank = json.loads((tmp_path / "spread" / "harpe" / f"{task}.json").read_text())
        two_ranks = json.loads((spread["dp2"] / f"{task}.json").read_text())
        assert two_ranks == one_rank, task
    passkey = json.loads((tmp_path / "spread" / "harpe" / "passkey.json").read_text())
    assert [t["length"] for t in passkey["trials"]] == [96] * 3 + [130] * 3
    assert (spread["dp2"] / "needle_heatmap.png").is_file()


@pytest.mark.distributed
def test_cp2_logits_rows_and_attention_equal_cp1_for_plain_pose_and_padded_prompts(spread, checkpoint):  # noqa: F811
    root, saved = checkpoint
    results = spread["results"]
    assert results["context_parallel_size"] == 2
    single = MegatronExtModel(saved, load_eval_model(root).tokenizer)  # CP=1
    for name, (tokens, position_ids, rows) in results["inputs"].items():
        expected = single.logits(tokens, position_ids, rows)
        assert results["logits"][name].shape == expected.shape, name
        # fp32, logits up to ~10: CP=2 runs SDPA with the zig-zag mask, CP=1 its causal kernel; they round apart
        # by ~1e-6 of the logit scale (a slicing or ordering mistake moves logits by ~1)
        assert (results["logits"][name] - expected).abs().max() < 3e-5, name
    # the PoSE ids reach the rotation: they change the logits as much at CP=2 as at CP=1
    assert (results["logits"]["pose"] - results["logits"]["full"]).abs().max() > 1e-2
    tokens, _, rows = results["inputs"]["odd_pose_rows"]
    for cp2, cp1 in zip(results["attention"], single.attention_probs(tokens, rows), strict=True):
        torch.testing.assert_close(cp2, cp1, rtol=0, atol=5e-6)  # probabilities; measured ~1e-6


@pytest.mark.distributed
def test_cp2_with_tp2_with_pp2_and_with_dp2_on_four_ranks_gives_the_single_rank_logits_and_results(
        checkpoint, tmp_path):  # noqa: F811
    root, _ = checkpoint
    out = tmp_path / "combined.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                           str(WORKER), "combined", str(root), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    combined = torch.load(out)
    single = load_eval_model(root)  # here: TP = PP = CP = DP = 1
    for layout in COMBINED_LAYOUTS:
        case = combined["results"][layout]
        assert case["data_parallel_size"] == 4 // (layout[0] * layout[1] * layout[2])
        for name, logits in case["logits"].items():
            expected = single.logits(*combined["inputs"][name])
            assert logits.shape == expected.shape and (logits - expected).abs().max() < 3e-5, (layout, name)
    spread_out = combined["results"][(1, 1, 2)]  # CP=2 moves logits by ~1e-6 of their scale: no argmax flips here
    for task, settings in combined_settings().items():
        assert spread_out[task] == TASKS[task].evaluate(single, settings).to_json(), task


@pytest.mark.distributed
def test_a_context_parallel_size_that_does_not_divide_the_world_is_refused_naming_the_setting(spread):
    message = spread["results"]["layout_error"]
    assert message == ("2 ranks do not split into model replicas of TP x PP x CP = 1 x 1 x 3 = 3 ranks: launch a "
                       "multiple of 3 ranks or change --tensor/--pipeline/--context-parallel-size (suite: "
                       "tensor_parallel_size, pipeline_parallel_size, context_parallel_size)")


@pytest.mark.parametrize("size, message", [
    ("2", "--model {path} is a Hugging Face directory: it runs on one device; set tensor/pipeline/context parallel "
          "sizes to 1"),
    ("0", "parallel sizes {{'tensor': 1, 'pipeline': 1, 'context': 0}} must all be >= 1: set --tensor/--pipeline/"
          "--context-parallel-size (suite: tensor_parallel_size, pipeline_parallel_size, context_parallel_size)"),
])
def test_context_parallel_with_a_hugging_face_model_or_below_one_is_a_one_line_error(tmp_path, capsys, size, message):
    (tmp_path / "config.json").write_text("{}")
    assert main(["eval", "passkey", "--model", str(tmp_path), "--context-parallel-size", size]) == 2
    assert capsys.readouterr().err == f"megatron-ext eval: {message.format(path=tmp_path)}\n"


def test_a_prompt_split_for_context_parallel_is_padded_at_the_end_and_sliced_zig_zag(single_rank):
    """The slicing helper against the zig-zag written out by hand: 10 tokens, CP=2 -> padded to 12 (the last token
    and its id repeated), chunks of 3, rank 0 keeps chunks 0 and 3, rank 1 chunks 1 and 2."""
    from megatron_ext.eval.distributed import tokens_on_this_cp_rank

    tokens = torch.arange(100, 110)[None]
    position_ids = torch.tensor([[0, 1, 2, 3, 50, 51, 52, 53, 54, 55]])

    def group(rank):  # what the slicing reads of a process group: its size, and this rank's place in it
        return SimpleNamespace(size=lambda: 2, rank=lambda: rank)

    local = [tokens_on_this_cp_rank(tokens, position_ids, group(rank)) for rank in (0, 1)]
    assert local[0][0].tolist() == [[100, 101, 102, 109, 109, 109]]
    assert local[0][1].tolist() == [[0, 1, 2, 55, 55, 55]]
    assert local[1][0].tolist() == [[103, 104, 105, 106, 107, 108]]
    assert local[1][1].tolist() == [[3, 50, 51, 52, 53, 54]]


def test_the_7b_example_runs_passkey_and_ruler_at_128k_as_tp2_cp4_on_the_8_tasks_of_the_eval_script():
    config = load_suite_config(ROOT / "examples" / "configs" / "eval_llama2_7b_128k_suite.yaml")
    script = (ROOT / "examples" / "slurm" / "eval.sbatch").read_text()
    tasks = int(re.search(r"^#SBATCH --ntasks-per-node=(\d+)$", script, re.M).group(1))
    assert config.tasks == ["passkey", "ruler"] and tasks == 8
    assert (config.tensor_parallel_size, config.pipeline_parallel_size, config.context_parallel_size) == (2, 1, 4)
    for task in config.tasks:
        lengths = config.settings[task].lengths
        assert max(lengths) == 131072 and all(n % (2 * config.context_parallel_size) == 0 for n in lengths)
    assert "sbatch examples/slurm/eval.sbatch suite --config examples/configs/eval_llama2_7b_128k_suite.yaml" in script
