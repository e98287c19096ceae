"""Rotary alone: time and achieved bandwidth of stock megatron apply, our torch path and the Triton kernel.

Run: python benchmarks/rotary_bandwidth.py [--seq-lengths 1024 2048 ...] [--dtypes bf16 fp32]
q [s, 1, h, d] and k [s, 1, g, d] are rotated forward, and forward + backward. Achieved bandwidth
is the bytes of q and k read and written (forward: read q, k, write the outputs; backward: the
same again for the gradients) over the time, and its fraction of the device's copy bandwidth
(measured here: a large tensor copy) and, on known GPUs, of the nominal peak.
Cases: megatron's _apply_rotary_pos_emb_bshd with its fp32 table [s, 1, 1, d] (shared) or [s, 1, h, d]
(per head; the table is built outside the timing, as GPTModel builds it once per step), our torch
path (apply.py), and on CUDA the Triton kernel (triton_rotary.py).
Defaults: CPU s = 1k-16k, GPU s = 4k-128k; h = g = 32, d = 128 (HARPE without GQA: one base a head,
the largest per-head table). Timing: median of --repeats, cases round-robin; on CPU this process's
CPU time on --threads threads (robust to other load). Prints a table and writes
docs/results/rotary_bandwidth.json.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NOMINAL_GB_S = {"H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800,
                "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555,
                "L40S": 864, "L4": 300, "RTX 4090": 1008}


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def save_results(args, result, script, internal=("out",)):
    """Write result (with the command that reproduces it first) to args.out as JSON."""
    options = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                       for k, v in vars(args).items() if k not in internal and v is not None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(command=f"python benchmarks/{script} {options}", **result), indent=1))
    print(f"\nwrote {args.out}")


def nominal_bandwidth(name):
    """Nominal peak memory bandwidth in bytes/s of a known GPU, else None."""
    matches = [gb for key, gb in NOMINAL_GB_S.items() if key in name]
    return max(matches) * 1e9 if matches else None


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def clock(device):
    """Wall time on a GPU; this process's CPU time on CPU, which other load on a shared machine
    does not inflate (with one thread it is the wall time of an idle machine)."""
    return time.perf_counter() if device == "cuda" else time.process_time()


def seconds_each(functions, device, repeats):
    """name -> median seconds of each callable, timed round-robin so that drift hits all alike."""
    for fn in functions.values():
        fn()  # warm-up (and Triton compilation)
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            synchronize(device)
            start = clock(device)
            fn()
            synchronize(device)
            times[name].append(clock(device) - start)
    return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(device, repeats):
    """Bytes/s of a device-to-device copy of a tensor much larger than the caches (read + write)."""
    nbytes = (2 << 30) if device == "cuda" else (512 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / seconds_each({"copy": lambda: dst.copy_(src)}, device, repeats)["copy"]


def inv_freq_for(bases, head_dim):
    pairs = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return torch.stack([1.0 / (base ** pairs) for base in bases])  # [bases, d/2]


def cases(device):
    """name -> (kind, per_head): what to rotate with; the kernel only where CUDA is."""
    out = {"megatron, shared table": ("megatron", False), "megatron, per-head table": ("megatron", True),
           "ours torch, shared base": ("torch", False), "ours torch, per-head bases": ("torch", True)}
    if device == "cuda":
        out.update({"ours triton, shared base": ("triton", False), "ours triton, per-head bases": ("triton", True)})
    return out


def make_rotation(kind, per_head, q, k, position_ids, inv_freq):
    """A callable q, k -> rotated (q, k). inv_freq [g, d/2]: row 0 is the shared base."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_ext.rope.apply import apply_rotary_qk

    if kind == "megatron":
        # What megatron's unfused bshd path is given: emb = cat(freqs, freqs) in fp32, built
        # once per model forward (not timed), [s, 1, 1, d] shared or [s, 1, h, d] per head.
        rows = inv_freq if per_head else inv_freq[:1]
        freqs = position_ids.t()[:, :, None, None].float() * rows.float()  # [s, 1, h or 1, d/2]
        emb_q = torch.cat([freqs, freqs], dim=-1)
        emb_k = emb_q[:, :, :: q.shape[2] // k.shape[2]] if per_head else emb_q
        return lambda a, b: (_apply_rotary_pos_emb_bshd(a, emb_q), _apply_rotary_pos_emb_bshd(b, emb_k))
    freq = inv_freq if per_head else inv_freq[0]
    return lambda a, b: apply_rotary_qk(a, b, position_ids, freq, backend=kind)


def measure(seq, heads, kv_heads, head_dim, dtype, device, repeats):
    """case -> forward and forward+backward seconds and bytes/s, all cases on the same q and k."""
    from megatron_ext.rope import head_bases

    q = torch.randn(seq, 1, heads, head_dim, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(seq, 1, kv_heads, head_dim, dtype=dtype, device=device, requires_grad=True)
    grads = (torch.randn_like(q), torch.randn_like(k))
    position_ids = torch.arange(seq, device=device).unsqueeze(0)
    bases = head_bases("uniform", kv_heads, b_min=1e4, b_max=5e6).tolist()
    inv_freq = inv_freq_for(bases, head_dim).to(device)  # [g, d/2]
    per_query_head = inv_freq.repeat_interleave(heads // kv_heads, dim=0)  # megatron's table: a row a head
    functions = {}
    for case, (kind, per_head) in cases(device).items():
        rotate = make_rotation(kind, per_head, q, k, position_ids, per_query_head if kind == "megatron" else inv_freq)
        functions[case, "forward"] = torch.no_grad()(lambda rotate=rotate: rotate(q, k))
        functions[case, "forward_backward"] = lambda rotate=rotate: torch.autograd.grad(rotate(q, k), (q, k), grads)
    seconds = seconds_each(functions, device, repeats)
    qk_bytes = 2 * (q.numel() + k.numel()) * q.element_size()  # read + write q and k, once
    return {case: dict(forward_s=seconds[case, "forward"], forward_backward_s=seconds[case, "forward_backward"],
                       forward_bytes_per_s=qk_bytes / seconds[case, "forward"],
                       forward_backward_bytes_per_s=2 * qk_bytes / seconds[case, "forward_backward"])
            for case in cases(device)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lengths", type=int, nargs="+")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=DTYPES)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--out", default="docs/results/rotary_bandwidth.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    default_lengths = [4096 << i for i in range(6)] if device == "cuda" else [1024 << i for i in range(5)]
    seq_lengths = args.seq_lengths or default_lengths
    name = device_name(device)
    copy = copy_bandwidth(device, args.repeats)
    nominal = nominal_bandwidth(name) if device == "cuda" else None

    rows = []
    for dtype_name in args.dtypes:
        for seq in seq_lengths:
            results = measure(seq, args.heads, args.kv_heads, args.head_dim, DTYPES[dtype_name], device,
                              args.repeats)
            for case, result in results.items():
                rows.append(dict(case=case, dtype=dtype_name, seq_length=seq, **result))
                print_row(rows[-1], rows, copy, nominal, header=len(rows) == 1, device=name, args=args)

    save_results(args, dict(
        device=name, torch=torch.__version__, seq_lengths=seq_lengths, heads=args.heads,
        kv_heads=args.kv_heads, head_dim=args.head_dim, copy_bytes_per_s=copy, nominal_bytes_per_s=nominal,
        rows=rows,
    ), "rotary_bandwidth.py")


def print_row(row, rows, copy, nominal, *, header, device, args):
    if header:
        print(f"q [s, 1, {args.heads}, {args.head_dim}], k [s, 1, {args.kv_heads}, {args.head_dim}], {device}; "
              f"copy bandwidth {copy / 1e9:.1f} GB/s" + (f", nominal {nominal / 1e9:.0f} GB/s" if nominal else ""))
        print(f"{'case':<30}{'dtype':>6}{'s':>8}{'fwd ms':>10}{'GB/s':>8}{'of copy':>9}"
              f"{'f+b ms':>10}{'GB/s':>8}{'of copy':>9}" + (f"{'of peak':>9}" if nominal else "")
              + f"{'f+b vs megatron shared':>24}")
    stock = next(r for r in rows if r["case"] == "megatron, shared table"
                 and r["dtype"] == row["dtype"] and r["seq_length"] == row["seq_length"])
    print(f"{row['case']:<30}{row['dtype']:>6}{row['seq_length']:>8}"
          f"{1e3 * row['forward_s']:>10.2f}{row['forward_bytes_per_s'] / 1e9:>8.1f}"
          f"{row['forward_bytes_per_s'] / copy:>9.2f}"
          f"{1e3 * row['forward_backward_s']:>10.2f}{row['forward_backward_bytes_per_s'] / 1e9:>8.1f}"
          f"{row['forward_backward_bytes_per_s'] / copy:>9.2f}"
          + (f"{row['forward_backward_bytes_per_s'] / nominal:>9.2f}" if nominal else "")
          + f"{row['forward_backward_s'] / stock['forward_backward_s']:>24.2f}")


if __name__ == "__main__":
    main()
