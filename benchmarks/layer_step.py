"""One transformer layer, forward + backward: stock megatron RoPE vs HARPE per-head bases vs PoSE ids.

Run: python benchmarks/layer_step.py [--seq-lengths ...] [--recompute none|selective]
The three layers have the same weights and the same attention and MLP; only the rotation differs:
  stock  megatron's SelfAttention + RotaryEmbedding table [s, 1, 1, d] (TE's fused RoPE when TE is
         installed, as a stock megatron run would use)
  HARPE  our PositionIdSelfAttention, one base per KV group (uniform 1e4..5e6), positions 0..s-1
  PoSE   our PositionIdSelfAttention, one shared base, PoSE position ids skipping up to 8 s
Layer spec: Transformer Engine when it imports on a GPU, else megatron-core local layers + torch SDPA.
GPU defaults: bf16, Llama-2-7B layer (hidden 4096, 32 heads, ffn 11008), s = 8k, 32k, 64k.
CPU defaults: fp32, hidden 256, 8 heads, ffn 688, s = 1k, 2k, 4k; peak memory from a fresh process (Linux).
Prints a table and writes docs/results/layer_step.json.
"""

import argparse
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from rotary_bandwidth import device_name, save_results, seconds_each

CASES = ("stock megatron RoPE", "HARPE (per-head bases)", "PoSE ids (shared base)")


def setup_megatron(device):
    from megatron.core import parallel_state

    from megatron_ext.compat import enable_stock_rope_on_cpu, prepare_megatron

    prepare_megatron()
    enable_stock_rope_on_cpu()  # the stock case builds megatron's own RotaryEmbedding
    if not torch.distributed.is_initialized():
        with socket.socket() as probe:  # a free port: memory measurements run in child processes
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo",
                                             init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()


def layer_config(case, args, dtype, use_te):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.models import LongContextTransformerConfig
    from megatron_ext.rope import RopeConfig

    common = dict(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=args.heads, num_query_groups=args.groups,
        ffn_hidden_size=args.ffn, kv_channels=args.hidden // args.heads,
        use_cpu_initialization=not torch.cuda.is_available(), params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=use_te,
        bias_dropout_fusion=use_te, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **(dict(recompute_granularity="selective") if args.recompute == "selective" else {}),
    )
    if case == CASES[0]:
        return TransformerConfig(apply_rope_fusion=use_te, **common)
    rope = RopeConfig(head_base_strategy="uniform", head_base_params={"b_min": 1e4, "b_max": 5e6}) \
        if case == CASES[1] else RopeConfig()
    return LongContextTransformerConfig(apply_rope_fusion=False, rope=rope, **common)


def stock_layer_spec(use_te):
    """megatron's own layer spec: Transformer Engine, or local layers with our SDPA core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from megatron_ext.models.core_attention import SDPACoreAttention

    if use_te:
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def build_layer(case, args, device, dtype, use_te):
    """The layer and the `rotary_pos_emb` it is given, for one case; weights seeded identically."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module

    from megatron_ext.models import layer_spec
    from megatron_ext.rope import pose_position_ids

    config = layer_config(case, args, dtype, use_te)
    s = args.seq_length
    if case == CASES[0]:
        spec = stock_layer_spec(use_te)
        rope = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0, rotary_base=10000,
                               use_cpu_initialization=device == "cpu")
        rotary = rope(s).to(device)  # [s, 1, 1, d] fp32, built once per model forward in GPTModel
    else:
        spec = layer_spec(use_transformer_engine=use_te, normalization="RMSNorm")
        positions = torch.arange(s) if case == CASES[1] else pose_position_ids(s, 8 * s, seed=0, sample_index=0)
        rotary = positions.unsqueeze(0).to(device)  # [1, s]: what LongContextGPTModel passes every layer
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)  # megatron initializes GPU weights under its RNG tracker
    layer = build_module(spec, config=config, layer_number=1).to(device=device, dtype=dtype)
    return layer, rotary


def step_function(layer, rotary, args, device, dtype):
    generator = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(args.seq_length, 1, args.hidden, device=device, dtype=dtype, generator=generator,
                         requires_grad=True)
    grad = torch.randn(hidden.shape, device=device, dtype=dtype, generator=generator)

    def step():
        out, _ = layer(hidden, attention_mask=None, rotary_pos_emb=rotary)
        out.backward(grad)
        hidden.grad = None
        for p in layer.parameters():
            p.grad = None

    return step


def peak_memory_gpu(step):
    """Peak bytes allocated during one step beyond what was allocated before it (weights, inputs)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def peak_memory_cpu_subprocess(case, args):
    """Peak resident-memory growth of one step, in a fresh process (its heap holds nothing from other cases)."""
    command = [sys.executable, __file__, "--memory-case", case, "--seq-lengths", str(args.seq_length),
               "--hidden", str(args.hidden), "--heads", str(args.heads), "--groups", str(args.groups),
               "--ffn", str(args.ffn), "--recompute", args.recompute]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def memory_case(args):
    """Print the peak resident-memory growth of one step (the caller runs this in a fresh process)."""
    setup_megatron("cpu")
    layer, rotary = build_layer(args.memory_case, args, "cpu", torch.float32, use_te=False)
    step = step_function(layer, rotary, args, "cpu", torch.float32)
    Path("/proc/self/clear_refs").write_text("5")  # restart the high-water mark (VmHWM) here
    baseline = _proc_status_kib("VmRSS")
    step()
    print((_proc_status_kib("VmHWM") - baseline) * 1024)


def _proc_status_kib(field):
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1])


def attention_backend(device, use_te):
    if use_te:
        return "Transformer Engine DotProductAttention"
    if device != "cuda":
        return "torch SDPA (CPU)"
    return "torch SDPA (flash/cuDNN/efficient chosen by torch)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lengths", type=int, nargs="+")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--groups", type=int)
    parser.add_argument("--ffn", type=int)
    parser.add_argument("--recompute", choices=("none", "selective"), default="none")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--out", default="docs/results/layer_step.json")
    parser.add_argument("--memory-case", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu_shape, cpu_shape = (4096, 32, 32, 11008), (256, 8, 8, 688)
    for name, value in zip(("hidden", "heads", "groups", "ffn"), gpu_shape if device == "cuda" else cpu_shape):
        if getattr(args, name) is None:
            setattr(args, name, value)
    seq_lengths = args.seq_lengths or ([8192, 32768, 65536] if device == "cuda" else [1024, 2048, 4096])
    if args.memory_case:  # internal: one memory measurement in a fresh CPU process
        args.seq_length = seq_lengths[0]
        memory_case(args)
        return
    if device == "cpu":
        torch.set_num_threads(args.threads)
    from megatron_ext.compat.extras import transformer_engine_available

    use_te = device == "cuda" and transformer_engine_available()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    setup_megatron(device)
    name = device_name(device)
    backend = attention_backend(device, use_te)
    print(f"one layer fwd+bwd, hidden {args.hidden}, {args.heads} heads / {args.groups} KV groups, ffn {args.ffn}, "
          f"{dtype}, recompute {args.recompute}, {backend}, {name}")
    print(f"{'case':<26}{'s':>8}{'step ms':>10}{'vs stock':>10}{'peak MiB':>11}{'vs stock':>10}")
    rows = []
    for seq in seq_lengths:
        args.seq_length = seq
        steps = {}
        for case in CASES:
            layer, rotary = build_layer(case, args, device, dtype, use_te)
            steps[case] = step_function(layer, rotary, args, device, dtype)
        seconds = seconds_each(steps, device, args.repeats)
        memory = {case: peak_memory_gpu(steps[case]) if device == "cuda" else peak_memory_cpu_subprocess(case, args)
                  for case in CASES}
        del steps
        for case in CASES:
            row = dict(case=case, seq_length=seq, step_s=seconds[case], peak_bytes=memory[case],
                       time_vs_stock=seconds[case] / seconds[CASES[0]], memory_vs_stock=memory[case] / memory[CASES[0]])
            rows.append(row)
            print(f"{case:<26}{seq:>8}{1e3 * row['step_s']:>10.1f}{row['time_vs_stock']:>10.3f}"
                  f"{row['peak_bytes'] / 2**20:>11.1f}{row['memory_vs_stock']:>10.3f}")
        if device == "cuda":
            torch.cuda.empty_cache()

    save_results(args, dict(
        device=name, dtype=str(dtype), torch=torch.__version__, attention=backend, seq_lengths=seq_lengths,
        hidden=args.hidden, heads=args.heads, groups=args.groups, ffn=args.ffn, recompute=args.recompute,
        memory_measure="torch.cuda.max_memory_allocated over one step" if device == "cuda"
        else "VmHWM - VmRSS over one step (Linux), fresh process per case", rows=rows,
    ), "layer_step.py", internal=("out", "memory_case", "seq_length"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
