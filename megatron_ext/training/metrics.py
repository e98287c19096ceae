"""Training metrics: model FLOPs per token, TFLOP/s and MFU, and where the numbers go (console, TensorBoard, W&B).

Imports no megatron.

FLOP formula (PaLM, Chowdhery et al. 2022, App. B), for one token of a training step
(forward + backward = 3 x forward):
    flops_per_token = 6 * N + 12 * L * h * s
N: parameters that multiply activations (all but the input embedding table; the output
layer counts), L: layers, h: hidden size, s: sequence length (the trained window). The
second term is attention's QK^T and AV, counted without the causal half, as PaLM and
Megatron do. MFU = achieved model FLOP/s / (peak FLOP/s of one device x devices).
"""

import logging
import math
import time

log = logging.getLogger("megatron_ext")

# dense bf16 peak, TFLOP/s per device (vendor data sheets)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "B200": 2250.0}


def matmul_parameters(num_layers, hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups,
                      vocab_size, swiglu=True) -> int:
    """Parameters in weight matrices that multiply activations (norms and the embedding lookup excluded)."""
    head_dim = hidden_size // num_attention_heads
    kv = num_query_groups * head_dim
    attention = hidden_size * (hidden_size + 2 * kv) + hidden_size * hidden_size
    mlp = hidden_size * ffn_hidden_size * (3 if swiglu else 2)
    return num_layers * (attention + mlp) + vocab_size * hidden_size


def flops_per_token(n_matmul_params, num_layers, hidden_size, seq_length) -> float:
    return 6.0 * n_matmul_params + 12.0 * num_layers * hidden_size * seq_length


def peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in PEAK_TFLOPS.items():
        if key in device_name.upper():
            return value
    return None


class TrainLogger:
    """Console (progress bar + a line every log_interval), TensorBoard and optional W&B, on one rank."""

    def __init__(self, *, enabled: bool, total_iters: int, start_iter: int, log_interval: int,
                 tensorboard_dir: str | None, wandb_project: str | None, progress_bar: bool, run_config: dict):
        self.enabled, self.log_interval = enabled, log_interval
        self.bar = self.tensorboard = self.wandb = None
        self.last_time = time.perf_counter()
        if not enabled:
            return
        if progress_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_iters, initial=start_iter, unit="it", dynamic_ncols=True)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(tensorboard_dir)
            except ImportError:
                log.warning("megatron_ext: tensorboard is not installed; TensorBoard logging is off")
        if wandb_project:
            try:
                import wandb
                self.wandb = wandb.init(project=wandb_project, config=run_config)
            except ImportError:
                log.warning("megatron_ext: logging.wandb_project is set but wandb is not installed; W&B is off")

    def log(self, iteration: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if value is not None and math.isfinite(value):
                    self.tensorboard.add_scalar(f"train/{key}", value, iteration)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in metrics.items() if v is not None}, step=iteration)
        if iteration % self.log_interval == 0:
            parts = [f"iter {iteration}"] + [f"{k} {_fmt(v)}" for k, v in metrics.items() if v is not None]
            message = " | ".join(parts)
            (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
