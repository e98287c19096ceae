"""Layout mistakes are refused by `train` before any process starts, by the rules `plan` uses
(megatron_ext/config/layout.py): ranks TP x PP x CP does not divide, more data-parallel replicas than the global
batch has samples, TP not dividing the KV groups. One sentence each, naming the setting and its value."""
from pathlib import Path

import pytest

from megatron_ext.cli import main
from megatron_ext.config import TrainConfig
from megatron_ext.config.layout import config_layout_problems

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "configs" / "tiny_harpe_cpu.yaml"  # 4 layers, 4 heads, micro-batch 2, global batch 8


def tiny(tp=1, pp=1, cp=1, groups=None, global_batch_size=8, micro_batch_size=2) -> TrainConfig:
    config = TrainConfig()
    config.model.num_query_groups = groups
    config.parallel.tensor_model_parallel_size = tp
    config.parallel.pipeline_model_parallel_size = pp
    config.parallel.context_parallel_size = cp
    config.training.global_batch_size, config.training.micro_batch_size = global_batch_size, micro_batch_size
    return config


def test_three_ranks_cannot_hold_tp2():
    assert config_layout_problems(tiny(tp=2), ranks=3) == [
        "TP x PP x CP = 2 x 1 x 1 = 2 does not divide the 3 ranks: start a multiple of 2 ranks, or change "
        "parallel.tensor_model_parallel_size / pipeline_model_parallel_size / context_parallel_size"]
    assert config_layout_problems(tiny(tp=2), ranks=4) == []


def test_more_replicas_than_the_global_batch_splits_into_is_refused():
    # 8 ranks at TP=1 are 8 replicas of micro-batch 2: 16 samples a step, more than the 8 of the global batch
    assert config_layout_problems(tiny(), ranks=8) == [
        "training.global_batch_size (8) must be a multiple of micro-batch x DP = 16 (training.micro_batch_size 2 x "
        "8 data-parallel replicas)"]
    assert config_layout_problems(tiny(), ranks=4) == []


def test_tp_must_divide_the_kv_groups():
    assert config_layout_problems(tiny(tp=4, groups=2), ranks=4) == [
        "parallel.tensor_model_parallel_size (4) must divide the 2 KV groups (model.num_query_groups): every TP rank "
        "holds whole KV groups, each with its RoPE base"]


def test_the_planner_rejects_the_same_layout_with_the_same_sentence():
    from megatron_ext.launch.planner import PlanRequest, evaluate
    from megatron_ext.launch.presets import GPUS
    from megatron_ext.launch.workload import Layout, workload_from_config

    config = tiny(tp=4, groups=2)
    config.model.vocab_size = 1000
    request = PlanRequest(workload_from_config(config, "tiny"), GPUS["h100-80gb"], gpus=4)
    problems = evaluate(request, Layout(4, 1, 1, 1, 2, "none")).problems
    assert problems == config_layout_problems(config, ranks=4)


@pytest.mark.parametrize("flags, message", [
    (["--nproc-per-node", "3", "--set", "parallel.tensor_model_parallel_size=2"],
     "TP x PP x CP = 2 x 1 x 1 = 2 does not divide the 3 ranks: start a multiple of 2 ranks, or change "
     "parallel.tensor_model_parallel_size / pipeline_model_parallel_size / context_parallel_size "
     "(ranks: --nproc-per-node 3)"),
    (["--nproc-per-node", "8"],
     "training.global_batch_size (8) must be a multiple of micro-batch x DP = 16 (training.micro_batch_size 2 x 8 "
     "data-parallel replicas) (ranks: --nproc-per-node 8)"),
    (["--nproc-per-node", "4", "--set", "parallel.tensor_model_parallel_size=4", "--set", "model.num_query_groups=2"],
     "parallel.tensor_model_parallel_size (4) must divide the 2 KV groups (model.num_query_groups): every TP rank "
     "holds whole KV groups, each with its RoPE base"),
])
def test_train_refuses_a_layout_before_any_process_starts(flags, message, tmp_path, capsys, monkeypatch):
    import megatron_ext.training.cli as train_cli

    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(train_cli, "relaunch", lambda *a: pytest.fail("ranks were started"))
    code = main(["train", "--config", str(TINY), "--set", f"checkpoint.dir={tmp_path / 'run'}", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"megatron-ext train: {message}")
    assert not (tmp_path / "run").exists()


def assert_tp2_refused_on_3_ranks(tmp_path, capsys, ranks_from: str) -> None:
    """`train` at TP=2 where the environment says 3 ranks: one line naming where the rank count came from."""
    code = main(["train", "--config", str(TINY), "--set", f"checkpoint.dir={tmp_path / 'run'}",
                 "--set", "parallel.tensor_model_parallel_size=2"])
    assert code == 2
    assert capsys.readouterr().err.rstrip().endswith("does not divide the 3 ranks: start a multiple of 2 ranks, or "
                                                     "change parallel.tensor_model_parallel_size / "
                                                     "pipeline_model_parallel_size / context_parallel_size "
                                                     f"(ranks: {ranks_from})")


def test_under_torchrun_the_world_size_is_the_one_checked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    assert_tp2_refused_on_3_ranks(tmp_path, capsys, "WORLD_SIZE")


def test_ranks_this_command_starts_are_counted_even_with_a_stale_world_size(tmp_path, capsys, monkeypatch):
    import megatron_ext.training.cli as train_cli

    monkeypatch.setenv("WORLD_SIZE", "1")  # e.g. left by a one-process group earlier in the same script
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(train_cli, "relaunch", lambda *a: pytest.fail("ranks were started"))
    code = main(["train", "--config", str(TINY), "--set", f"checkpoint.dir={tmp_path / 'run'}",
                 "--nproc-per-node", "3", "--set", "parallel.tensor_model_parallel_size=2"])
    assert code == 2 and "does not divide the 3 ranks" in capsys.readouterr().err


def test_srun_tasks_are_the_ranks_checked(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "3")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "3")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu-node-01")
    assert_tp2_refused_on_3_ranks(tmp_path, capsys, "the srun tasks")
