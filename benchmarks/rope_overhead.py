"""What HARPE and PoSE cost over stock megatron RoPE: step time of one small GPT, and the rotary's peak memory.

Run: python benchmarks/rope_overhead.py [--seq-length 2048] [--memory-seq-length 32768] [--repeats 5]
Prints a table and writes docs/results/rope_overhead.json (device named in it).
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_ext.compat import enable_stock_rope_on_cpu, prepare_megatron
from megatron_ext.models import LongContextGPTModel, LongContextTransformerConfig, local_layer_spec
from megatron_ext.rope import RopeConfig, head_bases, pose_position_ids

VOCAB = 1024


def model_config(rope, layers, hidden, heads, groups, dtype):
    return LongContextTransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
        ffn_hidden_size=4 * hidden, use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, rope=rope,
    )


def build_models(args, device, dtype):
    """Stock GPTModel with megatron's RoPE, and LongContextGPTModel with HARPE bases, same weights."""
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_ext.models.core_attention import SDPACoreAttention

    shape = dict(layers=args.layers, hidden=args.hidden, heads=args.heads, groups=args.groups, dtype=dtype)
    stock_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    stock_spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    torch.manual_seed(0)
    stock = GPTModel(model_config(RopeConfig(), **shape), stock_spec, VOCAB, args.seq_length,
                     position_embedding_type="rope", rotary_base=10000)
    harpe_rope = RopeConfig(head_base_strategy="uniform",
                            head_base_params={"b_min": 1e4, "b_max": 5e6, "order": "ascending"})
    torch.manual_seed(0)
    harpe = LongContextGPTModel(model_config(harpe_rope, **shape), local_layer_spec(), VOCAB, args.seq_length)
    torch.manual_seed(0)
    plain = LongContextGPTModel(model_config(RopeConfig(), **shape), local_layer_spec(), VOCAB, args.seq_length)
    return {name: m.to(device) for name, m in dict(stock=stock, harpe=harpe, pose=plain).items()}


def time_step(model, tokens, position_ids, repeats):
    def step():
        loss = model(tokens, position_ids, None, labels=tokens).float().mean()
        loss.backward()
        if tokens.is_cuda:
            torch.cuda.synchronize()

    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


MEMORY_CASES = ("stock megatron", "ours, shared base", "ours, per-head bases (HARPE)")


def rotary_memory_case(case, seq, heads, head_dim):
    """Peak resident-memory growth of one q+k rotary forward+backward (bf16), in this process.

    Run in a fresh process per case: ru_maxrss is a high-water mark, and glibc hands large
    blocks back to the OS on free, so the growth over the baseline is the peak extra memory.
    """
    import resource

    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_ext.rope import apply_rotary_qk

    q = torch.randn(seq, 1, heads, head_dim, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(seq, 1, heads, head_dim, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.ones_like(q)
    positions = torch.arange(seq).unsqueeze(0)
    pairs = torch.arange(0, head_dim, 2).float() / head_dim
    shared = 1.0 / (10000 ** pairs)
    per_head = torch.stack([1.0 / (b ** pairs) for b in head_bases("uniform", heads, b_min=1e4, b_max=5e6).tolist()])
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if case == "stock megatron":
        emb = torch.cat([positions.t()[:, :, None].float() * shared] * 2, -1)[:, :, None, :]  # [s, 1, 1, d]
        outs = (_apply_rotary_pos_emb_bshd(q, emb), _apply_rotary_pos_emb_bshd(k, emb))
    else:
        outs = apply_rotary_qk(q, k, positions, shared if case == "ours, shared base" else per_head)
    torch.autograd.backward(outs, (grad, grad))
    del outs
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline


def rotary_memory(seq, heads, head_dim):
    import subprocess
    import sys

    out = {}
    for case in MEMORY_CASES:
        proc = subprocess.run([sys.executable, __file__, "--memory-case", case, "--memory-seq-length", str(seq),
                               "--memory-heads", str(heads)], capture_output=True, text=True, check=True)
        out[case] = int(proc.stdout.strip().splitlines()[-1])
    out["q itself"] = seq * heads * head_dim * 2
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-seq-length", type=int, default=32768)
    parser.add_argument("--memory-heads", type=int, default=32)
    parser.add_argument("--out", default="docs/results/rope_overhead.json")
    parser.add_argument("--memory-case", choices=MEMORY_CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:  # internal: one measurement in a fresh process
        print(rotary_memory_case(args.memory_case, args.memory_seq_length, args.memory_heads, 128))
        return

    prepare_megatron()
    enable_stock_rope_on_cpu()  # the stock model uses megatron's own RotaryEmbedding
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel()

    models = build_models(args, device, dtype)
    s = args.seq_length
    tokens = torch.randint(0, VOCAB, (1, s), device=device)
    plain_ids = torch.arange(s, device=device).unsqueeze(0)
    pose_ids = pose_position_ids(s, 8 * s, seed=0, sample_index=0).unsqueeze(0).to(device)
    times = {
        "stock megatron RoPE": time_step(models["stock"], tokens, plain_ids, args.repeats),
        "HARPE (per-head bases)": time_step(models["harpe"], tokens, plain_ids, args.repeats),
        "PoSE ids (shared base)": time_step(models["pose"], tokens, pose_ids, args.repeats),
    }
    memory = rotary_memory(args.memory_seq_length, args.memory_heads, 128)

    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    stock = times["stock megatron RoPE"]
    print(f"\nforward+backward, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq {s}, {device_name}")
    print(f"{'model':<28}{'time (ms)':>12}{'vs stock':>10}")
    for name, t in times.items():
        print(f"{name:<28}{1000 * t:>12.1f}{t / stock:>10.3f}")
    print(f"\nrotary q+k forward+backward, peak extra memory (CPU RSS), q and k [s={args.memory_seq_length}, 1, h={args.memory_heads}, d=128] bf16")
    print(f"{'apply':<44}{'MiB':>10}{'x size of q':>14}")
    for name, nbytes in memory.items():
        print(f"{name:<44}{nbytes / 2**20:>10.1f}{nbytes / memory['q itself']:>14.2f}")

    result = dict(
        command="python benchmarks/rope_overhead.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "memory_case")),
        device=device_name, dtype=str(dtype), torch=torch.__version__,
        step_seconds=times, ratio_to_stock={k: v / stock for k, v in times.items()},
        rotary_peak_bytes=memory,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
