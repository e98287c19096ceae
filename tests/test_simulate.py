"""megatron-ext plan --simulate: one rank of a layout on fake tensors (launch/simulate.py).

- the storage counter itself, on real tensors;
- a tiny model's simulated weights, gradients and optimizer state equal a count made from its shape;
- its simulated activations of one micro-batch equal what a real CPU run of the same config allocates
  (glibc's count of bytes in use, before and after the forward);
- the simulation builds the DDP/optimizer that training builds (the settings are held equal);
- one layer of the Llama-3-8B 128k layout (slow; the time is in benchmarks/memory_simulation.py);
- a CP rank whose tokens are all masked: finite loss equal to CP=1 (slow, gloo).
"""

import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = dict(
    model=dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=384,
               vocab_size=512, seq_length=512),
    rope=dict(head_base_strategy="uniform", head_base_params=dict(b_min=1e4, b_max=5e5, order="ascending")),
    data=dict(tiny_corpus=True, document_mask=True),
    training=dict(micro_batch_size=2, global_batch_size=4, precision="bf16"),
)


def tiny_config(**sections):
    from megatron_ext.config import TrainConfig
    from megatron_ext.config.reader import from_dict
    from megatron_ext.config.train import validate

    raw = {key: dict(value) for key, value in TINY.items()}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    config = from_dict(TrainConfig, raw, prefix="")
    validate(config, check_files=False)
    return config


def tiny_parameters(m) -> tuple[int, int]:
    """(elements, tensors) of the tiny model, from its shape: embedding, per layer two norms, QKV (GQA),
    projection, SwiGLU FC1 (two halves) and FC2, the final norm, the untied output layer."""
    h, a, g = m["hidden_size"], m["num_attention_heads"], m["num_query_groups"]
    f, v = m["ffn_hidden_size"], m["vocab_size"]
    d = h // a
    layer = 2 * h + h * (a + 2 * g) * d + a * d * h + h * 2 * f + f * h
    return v * h + m["num_layers"] * layer + h + v * h, 1 + 6 * m["num_layers"] + 2


# --- the counter -------------------------------------------------------------------------------------


def test_live_storages_count_allocations_frees_and_saved_tensors():
    import torch

    from megatron_ext.launch.live_storage import ACTIVATIONS, PARAMETERS, TEMPORARIES, LiveStorages

    tracker = LiveStorages()
    weight = torch.nn.Parameter(torch.ones(256, 256))
    with tracker.running():
        tracker.assign([weight], PARAMETERS)
        tracker.phase = "forward 0"
        x = torch.ones(128, 256, requires_grad=True)
        y = (x @ weight).relu()  # matmul saves x and weight; relu saves its output
        transient = torch.ones(1024, 1024)
        del transient
        assert tracker.live[PARAMETERS] == 256 * 256 * 4
        assert tracker.live[ACTIVATIONS] == 2 * 128 * 256 * 4  # x and the relu output, not the weight
        assert tracker.peak_total >= tracker.total + 1024 * 1024 * 4  # the transient counted while it lived
        tracker.phase = "backward 0"
        y.sum().backward()
        del y
    assert tracker.live[ACTIVATIONS] == 128 * 256 * 4  # x (alive in this test), the relu output freed
    assert tracker.live[TEMPORARIES] >= 0 and tracker.phase_peaks["forward 0"] > 0


# --- exact counts and a real run ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_simulation():
    """The tiny config at TP=PP=CP=DP=1 with this machine's own layers (SDPA attention with the document
    mask, torch RMSNorm: no stand-ins), so that a real CPU run of it can be compared."""
    from megatron_ext.launch.simulate import simulate
    from megatron_ext.launch.workload import Layout

    return simulate(tiny_config(), Layout(1, 1, 1, 1, 2, "none"), standins=False).stages[0]


def test_tiny_simulated_weights_gradients_optimizer_equal_the_exact_count(tiny_simulation):
    elements, tensors = tiny_parameters(TINY["model"])
    stage = tiny_simulation
    assert stage.parameters == elements
    assert stage.steady["parameters"] == 2 * elements  # bf16 weights in DDP's buffer (no padding at these sizes)
    assert stage.steady["gradients"] == 4 * elements  # fp32 main grads
    # fp32 master weights + Adam m and v, Adam's step (one fp32 scalar per tensor), megatron's unit loss scale
    assert stage.steady["optimizer state"] == 12 * elements + 4 * tensors + 4
    assert stage.split["parameters"] == 2 * elements and stage.split["gradients"] == 4 * elements


def test_tiny_distributed_optimizer_state_is_sharded_over_dp_and_cp():
    from megatron_ext.launch.simulate import simulate
    from megatron_ext.launch.workload import Layout

    elements, _ = tiny_parameters(TINY["model"])
    stage = simulate(tiny_config(), Layout(1, 1, 2, 2, 1, "none")).stages[0]
    assert stage.steady["parameters"] == 2 * elements and stage.steady["gradients"] == 4 * elements
    # 12 bytes per element over DP x CP = 4 shards (+ Adam's step scalars and the unit loss scale)
    assert 12 * elements / 4 <= stage.steady["optimizer state"] <= 12 * elements / 4 + 4 * 20


def test_every_pipeline_stage_is_simulated_under_1f1b():
    from megatron_ext.launch.simulate import simulate
    from megatron_ext.launch.workload import Layout

    elements, _ = tiny_parameters(TINY["model"])
    simulation = simulate(tiny_config(data=dict(document_mask=False)), Layout(1, 2, 1, 2, 1, "selective"))
    first, last = simulation.stages
    assert (first.stage, first.rank, last.stage, last.rank) == (0, 0, 1, 2)  # megatron's order: PP outermost
    assert first.parameters + last.parameters == elements  # embedding + layer 1 | layer 2 + final norm + output
    assert first.steady["parameters"] == 2 * first.parameters and last.steady["gradients"] == 4 * last.parameters
    assert first.micro_batches == last.micro_batches == 2 and simulation.peak.peak > 0


class _MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def bytes_in_use() -> int:
    """glibc's own count of heap bytes in use (small chunks + mmapped large ones): torch's CPU allocator
    takes its tensors from malloc, so this sees every tensor, real and independent of the simulation."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def real_activations_of_one_micro_batch(config) -> int:
    """Bytes a real CPU forward (model + loss, the graph kept for the backward) leaves allocated, after two
    warm-up iterations (first-call caches)."""
    import torch
    from megatron.core.transformer.module import Float16Module

    from megatron_ext.distributed import single_process_group
    from megatron_ext.launch.simulate import gpu_transformer_config, layer_spec
    from megatron_ext.models import LongContextGPTModel

    m, b = config.model, config.training.micro_batch_size
    with single_process_group():
        tc = gpu_transformer_config(config, standins=False)
        model = Float16Module(tc, LongContextGPTModel(tc, layer_spec(config, standins=False), m.vocab_size,
                                                      m.seq_length, pre_process=True, post_process=True))
        tokens = torch.randint(0, m.vocab_size, (b, m.seq_length))
        positions = torch.arange(m.seq_length).expand(b, -1).contiguous()
        documents = (torch.arange(m.seq_length) // 100).expand(b, -1).contiguous()
        mask = torch.ones(b * m.seq_length)
        measured = []
        for _ in range(3):
            gc.collect()
            before = bytes_in_use()
            output = model(tokens, positions, None, labels=tokens, document_ids=documents)
            loss = (output.float().reshape(-1) * mask).sum()
            measured.append(bytes_in_use() - before)
            loss.backward()
            del output, loss
    return measured[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
def test_tiny_simulated_activations_within_15_percent_of_a_real_cpu_run(tiny_simulation):
    from megatron_ext.launch.simulate import layout_config
    from megatron_ext.launch.workload import Layout

    real = real_activations_of_one_micro_batch(layout_config(tiny_config(), Layout(1, 1, 1, 1, 2, "none")))
    simulated = tiny_simulation.activations_per_micro_batch
    assert simulated == pytest.approx(real, rel=0.15), (simulated, real)


def test_plan_simulate_needs_a_config(capsys):
    from megatron_ext.cli import main

    assert main(["plan", "--model", "llama3-8b", "--seq-length", "131072", "--gpus", "64", "--simulate"]) == 2
    assert "--simulate needs --config" in capsys.readouterr().err


def test_plan_simulate_reports_both_columns(tmp_path, capsys):
    import yaml

    from megatron_ext.cli import main

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    assert main(["plan", "--config", str(path), "--gpus", "4", "--tp", "1", "--pp", "1", "--cp", "2",
                 "--micro-batch-size", "1",
                 "--recompute", "none", "--simulate", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    stage = report["simulation"]["stages"][0]
    assert report["simulation"]["fits"] and stage["micro_batches"] == 2
    assert stage["simulated_gib"]["parameters"] == pytest.approx(stage["planner_gib_by_category"]["parameters"])
    assert stage["peak_gib"] == pytest.approx(stage["planner_gib"], rel=0.25)


# --- the 128k layout and the masked CP rank --------------------------------------------------------------


@pytest.mark.slow
def test_one_layer_of_the_llama3_8b_128k_layout_simulates():
    from megatron_ext.launch.memory import GIB
    from megatron_ext.launch.simulate import simulate
    from megatron_ext.launch.workload import Layout, read_train_config

    config = read_train_config(Path(__file__).resolve().parents[1] / "examples/configs/llama3_8b_harpe_128k.yaml")
    simulation = simulate(config, Layout(1, 1, 32, 2, 1, "none"), num_layers=1, usable_bytes=71.6 * GIB)
    stage = simulation.stages[0]
    assert stage.micro_batches == 16 and simulation.fits
    # weights of one layer + embedding + output layer, exactly as the planner counts them (bf16)
    assert stage.steady["parameters"] == pytest.approx(stage.planner.terms["weights (bf16)"], rel=1e-3)
    assert stage.peak == pytest.approx(stage.planner.total, rel=0.10)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_cp_rank_with_every_token_masked_gives_the_cp1_loss(tmp_path):
    out = tmp_path / "masked.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(Path(__file__).with_name("cp_masked_worker.py")), str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for case in json.loads(out.read_text()):
        assert case["cp"] == 2 and case["cp_rank_tokens"][1] == 0 and case["cp_rank_tokens"][0] > 0, case
        assert case["finite"], case
        assert case["loss"] == pytest.approx(case["ref_loss"], rel=1e-6), case
        assert case["max_grad_diff"] <= 1e-6 * max(1.0, case["grad_scale"]), case
