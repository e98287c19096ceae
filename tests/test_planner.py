"""The 128k planner: memory term by term against hand computations, published layouts fit, impossible
ones are rejected with the reason, and the ranking does not depend on enumeration order."""

import dataclasses
import random
import re

import pytest

from megatron_ext.cli import main
from megatron_ext.launch.memory import GIB, layer_activations, peak_memory, stage_memory
from megatron_ext.launch.planner import PlanRequest, enumerate_layouts, evaluate, plan
from megatron_ext.launch.presets import GPUS, model_preset
from megatron_ext.launch.timing import step_time
from megatron_ext.launch.workload import Layout, workload_from_preset
from megatron_ext.rope.apply import CHUNK_ELEMENTS
from megatron_ext.config import ModelConfig

H100 = GPUS["h100-80gb"]


def harpe_7b_128k(global_batch_size=32):
    return workload_from_preset("llama2-7b", model_preset("llama2-7b"), 131072, method="harpe",
                                global_batch_size=global_batch_size)


def test_llama2_7b_128k_memory_matches_hand_computation_term_by_term():
    """TP4 PP2 CP8 DP1 on 64 GPUs, micro-batch 1, no recompute, distributed optimizer, flash attention."""
    work, layout = harpe_7b_128k(), Layout(tp=4, pp=2, cp=8, dp=1, micro_batch_size=1, recompute="none")
    # Parameters. One layer: q, k, v, o = 4 * 4096^2; SwiGLU MLP = 3 * 4096 * 11008; split over TP4;
    # two RMSNorm weights (4096 each) replicated. Vocabulary 32000 padded to a multiple of 128 * TP = 512.
    layer = (4 * 4096 * 4096 + 3 * 4096 * 11008) // 4 + 2 * 4096  # 50,601,984
    vocab_shard = 32256 * 4096 // 4
    first = 16 * layer + vocab_shard  # embedding
    last = 16 * layer + 4096 + vocab_shard  # final norm + output layer
    assert (first, last) == (842_661_888, 842_665_984)
    # Activations of one layer: 16384 tokens per CP rank, everything split over TP4 (sequence parallel).
    tokens = 131072 // 8
    per_layer = (
        4 * 2 * tokens * 4096  # two norm inputs, QKV input, FC1 input (bf16)
        + 2 * tokens * 4096  # queries
        + 2 * 2 * tokens * 32 * 128  # keys and values (32 KV heads of 128)
        + 2 * tokens * 4096  # attention output = projection input
        + 2 * tokens * 2 * 11008  # SwiGLU input (gate and up)
        + 2 * tokens * 11008  # FC2 input
        + 4 * tokens * 32  # flash attention's fp32 log-sum-exp per head
    ) / 4
    assert per_layer == 539_492_352
    # Rotation: int64 position ids, and per chunk of c tokens (c * 8 local heads * 64 <= CHUNK_ELEMENTS)
    # angles and cos (fp32) and cos/sin (bf16) for the 8 local KV groups' bases, r/2 = 64.
    chunk = min(tokens, CHUNK_ELEMENTS // (8 * 64))
    rope = chunk * 8 * 64 * (2 * 4 + 2 * 2) + 8 * tokens
    kv_chunk = 2 * 2 * tokens * (32 // 4) * 128
    expected = {
        0: {"weights (bf16)": 2 * first, "gradients (fp32 main grads)": 4 * first,
            "optimizer (fp32 master, Adam m and v)": 12 * first / 8,  # sharded over DP x CP = 8
            "activations": 16 * 2 * per_layer,  # 1F1B: the first of 2 stages holds 2 micro-batches
            "recomputed layer (backward)": 0, "output layer and loss": 0,
            "RoPE tables (transient)": rope, "context-parallel K/V buffers": 4 * kv_chunk},
        1: {"weights (bf16)": 2 * last, "gradients (fp32 main grads)": 4 * last,
            "optimizer (fp32 master, Adam m and v)": 12 * last / 8,
            "activations": 16 * 1 * per_layer, "recomputed layer (backward)": 0,
            # + fp32 logits (the cross entropy's softmax) and the bf16 logits alive next to them
            "output layer and loss": (2 * 2 * tokens * 4096 + (4 + 2) * tokens * 32256) / 4,
            "RoPE tables (transient)": rope, "context-parallel K/V buffers": 4 * kv_chunk,
            # the loss runs after the last layer's forward and is gone before its backward: the peak is
            # all activations + the larger of the two
            "layer transients and the loss never together": -min(
                (2 * 2 * tokens * 4096 + (4 + 2) * tokens * 32256) / 4, rope + 4 * kv_chunk)},
    }
    for stage in (0, 1):
        memory = stage_memory(work, layout, stage)
        assert memory.terms == pytest.approx(expected[stage], rel=1e-12)
    peak = peak_memory(work, layout)
    assert peak.stage == 0 and peak.total == pytest.approx(sum(expected[0].values()), rel=1e-12)


@pytest.mark.parametrize("tp", [1, 8])
def test_gpt_layer_activations_are_korthikanti_formulas(tp):
    """GPT-3 175B, s = 2048 (Korthikanti et al. 2022, Table 2 setting): with TP + SP,
    none = s*b*h*(34 + 5*a*s/h)/t, selective = 34*s*b*h/t, full = 2*s*b*h/t bytes per layer."""
    gpt3 = ModelConfig(num_layers=96, hidden_size=12288, num_attention_heads=96, ffn_hidden_size=4 * 12288,
                       vocab_size=51200, swiglu=False, attention_dropout=0.1, hidden_dropout=0.1)
    work = workload_from_preset("gpt3", gpt3, 2048, method="rope")
    s, b, h, a = 2048, 1, 12288, 96
    none = layer_activations(work, s, b, tp, "none", flash_attention=False)
    assert none == pytest.approx(s * b * h * (34 + 5 * a * s / h) / tp, rel=1e-12)
    assert layer_activations(work, s, b, tp, "selective", flash_attention=False) == pytest.approx(34 * s * b * h / tp)
    assert layer_activations(work, s, b, tp, "full", flash_attention=False) == pytest.approx(2 * s * b * h / tp)
    # Flash attention keeps no s x s matrix: only 4 bytes (fp32 statistics) per head and token.
    flash = layer_activations(work, s, b, tp, "none", flash_attention=True)
    assert flash == pytest.approx((34 * s * b * h + 4 * s * b * a) / tp)


def test_optimizer_bytes_are_18_per_parameter_or_6_plus_12_over_d():
    """Megatron's distributed optimizer docs: bf16 params + fp32 grads = 18 bytes/param, 6 + 12/d sharded."""
    work = harpe_7b_128k()
    layout = Layout(tp=2, pp=1, cp=8, dp=4, micro_batch_size=1, recompute="none")
    for distributed, per_param in ((False, 18), (True, 6 + 12 / 32)):
        memory = stage_memory(work, layout, 0, distributed_optimizer=distributed)
        states = sum(memory.terms[k] for k in ("weights (bf16)", "gradients (fp32 main grads)",
                                                 "optimizer (fp32 master, Adam m and v)"))
        assert states / memory.parameters == pytest.approx(per_param)


def test_pose_activations_are_those_of_its_short_window():
    pose = workload_from_preset("llama2-7b", model_preset("llama2-7b"), 131072, method="pose", pose_window=2048)
    short = workload_from_preset("llama2-7b", model_preset("llama2-7b"), 2048, method="rope")
    full = workload_from_preset("llama2-7b", model_preset("llama2-7b"), 131072, method="rope")
    layout = Layout(tp=1, pp=1, cp=1, dp=8, micro_batch_size=2, recompute="none")
    terms = [stage_memory(w, layout, 0).terms["activations"] for w in (pose, short, full)]
    assert terms[0] == terms[1] and terms[2] == pytest.approx(64 * terms[1], rel=0.01)
    # PoSE's ids differ per sample, so its cos/sin tables are per sample: b' = 2.
    chunk = min(2048, CHUNK_ELEMENTS // (2 * 32 * 64))
    pose_rope = stage_memory(pose, layout, 0).terms["RoPE tables (transient)"]
    assert pose_rope == chunk * 2 * 1 * 64 * (2 * 4 + 2 * 2) + 8 * 2 * 2048


@pytest.mark.parametrize("model, seq, gpus, tp, pp, cp, batch", [
    ("llama3-8b", 16384, 16, 4, 2, 2, 512),  # NeMo/Megatron-Bridge llama3_8b_16k_pretrain_config
    ("llama3-8b", 65536, 32, 4, 2, 4, 512),  # llama3_8b_64k_pretrain_config
    ("llama3-8b", 131072, 64, 4, 2, 8, 512),  # llama3_8b_128k_pretrain_config
    ("llama3-70b", 65536, 256, 8, 4, 8, 512),  # llama3_70b_64k_pretrain_config (at DP 1)
    ("llama2-7b", 131072, 64, 4, 2, 8, 32),  # the same shape class as Llama-3 8B at 128k
])
def test_published_long_context_layouts_fit(model, seq, gpus, tp, pp, cp, batch):
    work = workload_from_preset(model, model_preset(model), seq, method="rope", global_batch_size=batch)
    layout = Layout(tp, pp, cp, gpus // (tp * pp * cp), micro_batch_size=1, recompute="none")
    candidate = evaluate(PlanRequest(work, H100, gpus), layout)
    assert candidate.fits, candidate.problems
    assert candidate.memory.total < 60 * GIB


def test_7b_at_128k_on_one_gpu_without_cp_or_recompute_is_rejected_with_the_reason():
    request = PlanRequest(harpe_7b_128k(), H100, gpus=1)
    candidate = evaluate(request, Layout(1, 1, 1, 1, micro_batch_size=1, recompute="none"))
    assert not candidate.fits
    (reason,) = candidate.problems
    # 32 layers x 131072 tokens x (16h + 6f + 4a = 131,712 bytes per token) of activations alone
    activations = 32 * 131072 * (16 * 4096 + 6 * 11008 + 4 * 32) / GIB
    assert f"largest: activations {activations:.1f} GiB" in reason and "> 71.6 GiB usable" in reason
    assert plan(request).best is None  # nor does any other layout on one GPU


def test_layouts_megatron_cannot_run_are_rejected_naming_the_fix():
    request = PlanRequest(harpe_7b_128k(), H100, gpus=64)
    problems = {layout: evaluate(request, layout).problems for layout in [
        Layout(16, 1, 4, 1, 1, "none"), Layout(4, 3, 1, 1, 1, "none"), Layout(1, 1, 64, 1, 1, "none"),
        Layout(1, 1, 1, 64, 1, "none")]}
    messages = [" ".join(p) for p in problems.values()]
    assert "spans nodes" in messages[0] and "must divide the 32 attention heads" not in messages[0]
    assert "parallel.pipeline_model_parallel_size (3) must divide the 32 layers" in messages[1]
    assert not problems[Layout(1, 1, 64, 1, 1, "none")]  # 131072 divides by 128: CP 64 can run
    assert "training.global_batch_size (32) must be a multiple of micro-batch x DP = 64" in messages[3]


def test_step_time_is_flops_at_the_stated_utilization_plus_bubble():
    work, gpus = harpe_7b_128k(), 64
    layout = Layout(tp=4, pp=2, cp=8, dp=1, micro_batch_size=1, recompute="none")
    n = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008) + 32256 * 4096  # matmul parameters (padded vocabulary)
    model_flops = 32 * 131072 * (6 * n + 12 * 32 * 4096 * 131072)
    time = step_time(work, layout, H100, mfu=0.4, params_per_gpu=842_665_984)
    assert time.model_flops == pytest.approx(model_flops)
    assert time.compute == pytest.approx(model_flops / (64 * 989e12 * 0.4))
    assert time.pipeline_bubble == pytest.approx(time.compute / 32)  # (pp - 1) / micro-batches
    full = step_time(work, dataclasses.replace(layout, recompute="full"), H100, mfu=0.4, params_per_gpu=1)
    extra = 32 * 131072 * (2 * 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008) + 4 * 32 * 4096 * 131072)
    assert full.compute == pytest.approx((model_flops + extra) / (gpus * 989e12 * 0.4))


def test_ranking_is_fastest_first_and_independent_of_enumeration_order():
    request = PlanRequest(harpe_7b_128k(), H100, gpus=64)
    layouts = enumerate_layouts(request, fixed={"micro_batch_size": 1})
    shuffled = layouts[:]
    random.Random(0).shuffle(shuffled)
    first, second = plan(request, layouts=layouts), plan(request, layouts=shuffled)
    assert [c.layout for c in first.ranked] == [c.layout for c in second.ranked]
    times = [c.time.total for c in first.ranked]
    assert times == sorted(times) and len(times) > 50
    published = Layout(4, 2, 8, 1, 1, "none")
    assert published in [c.layout for c in first.ranked]
    assert first.best.time.total <= evaluate(request, published).time.total


def test_plan_command_prints_table_breakdown_and_overrides(capsys):
    assert main(["plan", "--model", "llama2-7b", "--seq-length", "131072", "--gpus", "16", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "GiB/GPU" in out and "optimizer (fp32 master, Adam m and v)" in out
    assert "--set parallel.context_parallel_size=" in out and "\ntraining:\n  micro_batch_size: 1\n" in out
    assert main(["plan", "--model", "llama2-7b", "--seq-length", "131072", "--gpus", "1"]) == 1
    assert "no layout fits" in capsys.readouterr().out


def _listed_layouts(out: str) -> list[tuple[str, float | None]]:
    """(layout, GiB needed or None) of each rejected layout the report lists."""
    rows = re.findall(r"^  (TP\d+ PP\d+ CP\d+ DP\d+, micro-batch \d+, recompute \w+): (.*)$", out, re.M)
    return [(layout, float(m.group(1)) if (m := re.match(r"needs ([\d.]+) GiB", why)) else None)
            for layout, why in rows]


def test_when_nothing_fits_the_closest_layouts_are_listed_with_their_reasons(capsys):
    """Llama 2 70B at 128k on one H100: 18 layouts, none fits. The report lists the least memory first,
    each with its reason, and --show-rejected N lists exactly N."""
    request = PlanRequest(workload_from_preset("llama2-70b", model_preset("llama2-70b"), 131072), H100, gpus=1)
    needed = sorted(evaluate(request, layout).memory.total / GIB for layout in enumerate_layouts(request))
    assert len(needed) == 18 and needed[0] > 71.6
    for flags, count in (([], 5), (["--show-rejected", "3"], 3), (["--show-rejected", "7"], 7)):
        argv = ["plan", "--model", "llama2-70b", "--seq-length", "131072", "--gpus", "1", *flags]
        assert main(argv) == 1
        out = capsys.readouterr().out
        assert f"no layout fits; the closest {count} of 18 rejected:" in out
        listed = _listed_layouts(out)
        assert [gib for _, gib in listed] == pytest.approx([round(g, 1) for g in needed[:count]], abs=0.051)
        assert listed[0][0] == "TP1 PP1 CP1 DP1, micro-batch 1, recompute full"
        assert "> 71.6 GiB usable; largest: optimizer (fp32 master, Adam m and v)" in out


def test_layouts_that_cannot_run_at_all_are_listed_too(capsys):
    """70B on 3 GPUs: 3 divides neither the 64 heads, the 80 layers, 2 x 131072 nor the global batch 32,
    so no layout even reaches the memory estimate; the report still lists N of them with the reason."""
    argv = ["plan", "--model", "llama2-70b", "--seq-length", "131072", "--gpus", "3", "--show-rejected", "4"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "layouts: 72 enumerated, 0 fit, 72 rejected" in out and "the closest 4 of 72 rejected:" in out
    listed = _listed_layouts(out)
    assert len(listed) == 4 and all(gib is None for _, gib in listed)
    assert "training.global_batch_size (32) must be a multiple of micro-batch x DP = 3" in out


def test_show_rejected_lists_the_closest_misses_next_to_the_ranking(capsys):
    argv = ["plan", "--model", "llama2-7b", "--seq-length", "131072", "--gpus", "16", "--show-rejected", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    listed = _listed_layouts(out.split("rejected (the closest 4 of ")[1])
    usable = 71.6
    assert len(listed) == 4 and all(gib > usable for _, gib in listed)
    assert [gib for _, gib in listed] == sorted(gib for _, gib in listed)
    assert main([*argv, "--format", "markdown"]) == 0
    assert _listed_layouts(capsys.readouterr().out) == listed


@pytest.mark.parametrize("flags, message", [
    (["--model", "llama2-7b", "--gpus", "8"], "--model needs --seq-length"),
    (["--model", "llama2-7b", "--seq-length", "4096", "--gpus", "8", "--mfu", "1.5"], "--mfu 1.5: give a fraction"),
    (["--model", "llama2-7b", "--seq-length", "4096", "--gpus", "0"], "--gpus (0) and --gpus-per-node (8)"),
    (["--model", "llama2-7b", "--seq-length", "4096", "--gpus", "8", "--set", "a.b=1"], "--set needs --config"),
    (["--model", "llama2-7b", "--seq-length", "4096", "--gpus", "8", "--recompute", "some"], "--recompute 'some'"),
    (["--model", "llama2-7b", "--seq-length", "4096", "--gpus", "8", "--method", "pose", "--pose-window", "8192"],
     "--pose-window (8192) must be in (0, --seq-length = 4096]"),
])
def test_bad_plan_arguments_are_one_line_errors(capsys, flags, message):
    assert main(["plan", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"megatron-ext plan: {message}") and captured.err.count("\n") == 1
    assert "Traceback" not in captured.err and captured.out == ""


def test_plan_reads_a_training_config(capsys):
    config = "examples/configs/llama2_7b_pose_2k_to_128k.yaml"
    assert main(["plan", "--config", config, "--gpus", "8", "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert "PoSE, 2048-token window with position ids up to 131072" in out and "global batch 64" in out


# --- plan / launch settle the architecture from checkpoint.pretrained as train does ---------------------------

def llama3_8b_record(root):
    """The record `convert hf-to-mcore` writes for Llama-3-8B (megatron_ext.json; plan reads nothing else)."""
    from megatron_ext.config import TrainConfig
    from megatron_ext.rope import RopeConfig
    from test_start import write_checkpoint

    config = TrainConfig()
    m = config.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups = 32, 4096, 32, 8
    m.ffn_hidden_size, m.vocab_size, m.seq_length = 14336, 128256, 8192
    config.rope = RopeConfig(base=500000.0)
    return write_checkpoint(root, config)


def reduced_recipe(tmp_path, pretrained, **model) -> str:
    """The Llama-3 recipe's shape of config with its model block cut to what the user changes."""
    import yaml

    path = tmp_path / "extend.yaml"
    path.write_text(yaml.safe_dump({
        "model": model, "rope": {"head_base_strategy": "uniform", "head_base_params": {"b_min": 1e6, "b_max": 5e6}},
        "data": {"train_data": ["/data/none"]}, "training": {"global_batch_size": 32},
        "checkpoint": {"pretrained": str(pretrained), "dir": str(tmp_path / "run")}}))
    return str(path)


def test_plan_takes_the_architecture_from_checkpoint_pretrained(tmp_path, capsys, caplog):
    import json
    import logging

    pretrained = llama3_8b_record(tmp_path / "llama3_8b_hf")
    config = reduced_recipe(tmp_path, pretrained, seq_length=131072)
    with caplog.at_level(logging.INFO, logger="megatron_ext"):
        assert main(["plan", "--config", config, "--gpus", "64", "--format", "json"]) == 0
    header = json.loads(capsys.readouterr().out)["header"]
    assert "model: 32 layers, hidden 4096, 32 heads in 8 KV groups, FFN 14336, vocabulary 128256" in header
    assert header[0].startswith("workload: extend: 131072 tokens per sample, one RoPE base per KV group (HARPE)")
    assert "model from checkpoint.pretrained: num_layers=32, hidden_size=4096" in caplog.text


def test_plan_takes_the_length_the_checkpoint_records_when_the_config_leaves_it_out(tmp_path, capsys):
    import json

    config = reduced_recipe(tmp_path, llama3_8b_record(tmp_path / "llama3_8b_hf"))
    assert main(["plan", "--config", config, "--gpus", "8", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["header"][0].startswith("workload: extend: 8192 tokens per sample")


def test_plan_refuses_a_model_block_that_contradicts_the_checkpoint(tmp_path, capsys):
    config = reduced_recipe(tmp_path, llama3_8b_record(tmp_path / "llama3_8b_hf"), num_layers=4)
    assert main(["plan", "--config", config, "--gpus", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-ext plan: model.num_layers: the config says 4, the checkpoint "
                          "checkpoint.pretrained") and "says 32" in err


def test_a_checkpoint_not_on_this_machine_needs_the_sizes_in_the_config(tmp_path, capsys):
    config = reduced_recipe(tmp_path, tmp_path / "elsewhere" / "iter_0000000", seq_length=131072)
    assert main(["plan", "--config", config, "--gpus", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-ext plan: checkpoint.pretrained (") and err.count("\n") == 1
    assert "leaves out model.num_layers, model.hidden_size, model.num_attention_heads, model.vocab_size" in err


def test_launch_renders_the_checkpoints_model_not_the_tiny_default(tmp_path, capsys):
    config = reduced_recipe(tmp_path, llama3_8b_record(tmp_path / "llama3_8b_hf"), seq_length=131072)
    assert main(["launch", "--config", config, "--nodes", "8"]) == 0
    script = capsys.readouterr().out
    gib, step = map(float, re.search(r"estimated ([\d.]+) GiB per GPU and ([\d.]+) s per step", script).groups())
    # the plan of the same config on the same 64 GPUs, which tests above show reads the 8B's architecture
    assert main(["plan", "--config", config, "--gpus", "64", "--top", "1"]) == 0
    best = re.search(r"^\s*1\s+\d+\s+\d+\s+\d+\s+\S+\s+\d+\s+\d+\s+\w+\s+([\d.]+)\s+([\d.]+)",
                     capsys.readouterr().out, re.M)
    assert gib == float(best.group(1)) and step == pytest.approx(float(best.group(2)), abs=0.05)
    assert step > 10  # an 8B at 128k: tens of seconds per step, not the tiny model's 0.2 s


@pytest.mark.slow
def test_plan_reports_the_architecture_of_a_converted_tiny_checkpoint(tmp_path, capsys):
    """A real `convert hf-to-mcore` output: plan reads its record and plans its architecture and its context."""
    import json

    import torch
    transformers = pytest.importorskip("transformers")
    from megatron_ext.convert import hf_to_mcore

    hf = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf).save_pretrained(tmp_path / "hf")
    converted = hf_to_mcore(tmp_path / "hf", tmp_path / "converted")
    config = reduced_recipe(tmp_path, converted)
    assert main(["plan", "--config", config, "--gpus", "2", "--format", "json"]) == 0
    header = json.loads(capsys.readouterr().out)["header"]
    assert "model: 2 layers, hidden 64, 4 heads in 2 KV groups, FFN 96, vocabulary 300" in header
    assert header[0].startswith("workload: extend: 2048 tokens per sample")
