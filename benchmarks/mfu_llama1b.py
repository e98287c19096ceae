"""Model FLOPs utilisation of a Llama-shaped ~1B model, one GPU, long sequences: stock megatron RoPE vs HARPE.

Run: python benchmarks/mfu_llama1b.py [--seq-lengths 16384 32768 65536] [--recompute auto|none|selective|full]
Model (GPU default): TinyLlama-1.1B's shape: 22 layers, hidden 2048, 32 heads, 4 KV groups, SwiGLU ffn 5632,
vocab 32000, untied output layer; bf16 (Float16Module), megatron DDP and Adam (fp32 main weights). The
timed step is a whole training step: forward, backward, gradient finalisation and optimizer step, one
sequence per step.
  stock  megatron's GPTModel, position_embedding_type='rope' (TE's fused RoPE when TE is installed)
  HARPE  LongContextGPTModel, one base per KV group (uniform 1e4..5e6), the Triton rotary on CUDA
FLOPs (PaLM, App. B; megatron_ext.sizes): per token 6 N + 12 L h s, N = weights that multiply
activations (all but the input embedding), attention's QK^T and AV counted in full (no causal halving),
recompute not counted. MFU = FLOPs per step / step time / the device's dense bf16 peak.
recompute auto: none up to 16k, full above (activations of 22 layers at 32k+ do not fit in 80 GB otherwise).
CPU defaults (a functional check, not a GPU proxy): 4 layers, hidden 256, 8 heads, 4 groups, ffn 688,
vocab 1024, fp32, s = 1k, 2k. Prints a table and writes docs/results/mfu_llama1b.json.
"""

import argparse

import torch
import torch.nn.functional as F

from layer_step import setup_megatron, stock_layer_spec
from rotary_bandwidth import device_name, save_results, seconds_each

from megatron_ext.sizes import flops_per_token, matmul_parameters, peak_tflops

CASES = ("stock megatron RoPE", "HARPE (per-head bases)")
GPU_SHAPE = dict(layers=22, hidden=2048, heads=32, groups=4, ffn=5632, vocab=32000)
CPU_SHAPE = dict(layers=4, hidden=256, heads=8, groups=4, ffn=688, vocab=1024)


def recompute_options(mode, seq_length):
    if mode == "auto":
        mode = "none" if seq_length <= 16384 else "full"
    options = dict(none={}, selective=dict(recompute_granularity="selective"),
                   full=dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1))
    return mode, options[mode]


def model_config(case, shape, dtype, use_te, recompute):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.models import LongContextTransformerConfig
    from megatron_ext.rope import RopeConfig

    common = dict(
        num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
        num_query_groups=shape["groups"], ffn_hidden_size=shape["ffn"],
        use_cpu_initialization=not torch.cuda.is_available(), params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=use_te,
        bias_dropout_fusion=use_te, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, calculate_per_token_loss=True, **recompute,
    )
    if case == CASES[0]:
        return TransformerConfig(apply_rope_fusion=use_te, **common)
    rope = RopeConfig(head_base_strategy="uniform", head_base_params={"b_min": 1e4, "b_max": 5e6})
    return LongContextTransformerConfig(apply_rope_fusion=False, rope=rope, **common)


def build(case, shape, seq_length, device, dtype, use_te, recompute):
    """(DDP model, optimizer) for one case, with the same initial weights in both cases."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module

    from megatron_ext.models import LongContextGPTModel, layer_spec

    config = model_config(case, shape, dtype, use_te, recompute)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    if case == CASES[0]:
        model = GPTModel(config, stock_layer_spec(use_te), shape["vocab"], seq_length, position_embedding_type="rope",
                         rotary_base=10000, share_embeddings_and_output_weights=False)
    else:
        model = LongContextGPTModel(config, layer_spec(use_transformer_engine=use_te), shape["vocab"], seq_length,
                                    share_embeddings_and_output_weights=False)
    model = model.to(device)
    if config.bf16:
        model = Float16Module(config, model)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-5, bf16=config.bf16, params_dtype=dtype, clip_grad=1.0), [model])
    return model, optimizer


def step_function(model, optimizer, shape, seq_length, device):
    generator = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, shape["vocab"], (1, seq_length), device=device, generator=generator)
    position_ids = torch.arange(seq_length, device=device).unsqueeze(0)

    def step():
        model.zero_grad_buffer()
        optimizer.zero_grad()
        loss = model(tokens, position_ids, None, labels=tokens)  # per-token loss [1, s]
        (loss.float().sum() / seq_length).backward()
        model.finish_grad_sync()
        optimizer.step()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lengths", type=int, nargs="+")
    parser.add_argument("--recompute", choices=("auto", "none", "selective", "full"), default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--out", default="docs/results/mfu_llama1b.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    from megatron_ext.compat.extras import transformer_engine_available

    use_te = device == "cuda" and transformer_engine_available()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = GPU_SHAPE if device == "cuda" else CPU_SHAPE
    seq_lengths = args.seq_lengths or ([16384, 32768, 65536] if device == "cuda" else [1024, 2048])
    setup_megatron(device)
    name = device_name(device)
    peak = peak_tflops(name) if device == "cuda" else None
    n_matmul = matmul_parameters(shape["layers"], shape["hidden"], shape["ffn"], shape["heads"], shape["groups"],
                                 shape["vocab"])
    print(f"Llama-shaped model {shape}, {n_matmul / 1e6:.1f} M matmul weights, {dtype}, "
          f"{'TE' if use_te else 'local + SDPA'} layers, {name}"
          + (f", peak {peak:.0f} TFLOP/s" if peak else ", no peak known: MFU n/a"))
    print(f"{'case':<26}{'s':>7}{'recompute':>11}{'step s':>9}{'tokens/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'vs stock':>10}{'peak GiB':>10}")
    rows = []
    for seq in seq_lengths:
        mode, recompute = recompute_options(args.recompute, seq)
        flops = flops_per_token(n_matmul, shape["layers"], shape["hidden"], seq) * seq  # one sequence a step
        steps, memory = {}, {}
        for case in CASES:
            model, optimizer = build(case, shape, seq, device, dtype, use_te, recompute)
            steps[case] = step_function(model, optimizer, shape, seq, device)
        seconds = seconds_each(steps, device, args.repeats)
        for case in CASES:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                steps[case]()
                torch.cuda.synchronize()
                memory[case] = torch.cuda.max_memory_allocated()
            tflops = flops / seconds[case] / 1e12
            row = dict(case=case, seq_length=seq, recompute=mode, step_s=seconds[case],
                       tokens_per_s=seq / seconds[case],
                       model_flops_per_step=flops, tflops=tflops, mfu=tflops / peak if peak else None,
                       time_vs_stock=seconds[case] / seconds[CASES[0]], peak_bytes=memory.get(case))
            rows.append(row)
            mfu = f"{row['mfu']:.3f}" if peak else "n/a"
            gib = f"{memory[case] / 2**30:.1f}" if case in memory else "n/a"
            print(f"{case:<26}{seq:>7}{mode:>11}{row['step_s']:>9.3f}{row['tokens_per_s']:>10.0f}{tflops:>9.3f}"
                  f"{mfu:>7}{row['time_vs_stock']:>10.3f}{gib:>10}")
        del steps
        if device == "cuda":
            torch.cuda.empty_cache()

    save_results(args, dict(
        device=name, dtype=str(dtype), torch=torch.__version__, layers="TE" if use_te else "local + SDPA",
        shape=shape, matmul_parameters=n_matmul, peak_tflops=peak,
        flop_formula="per token 6*N + 12*L*h*s (PaLM App. B), x s tokens per step; recompute not counted",
        step="forward + backward + finish_grad_sync + Adam step, one sequence", rows=rows,
    ), "mfu_llama1b.py")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
