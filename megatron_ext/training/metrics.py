"""Where training numbers go: the console (progress bar + a line every log_interval), TensorBoard and W&B.

Imports no megatron. The FLOP and MFU formulas live in megatron_ext/sizes.py.
"""

import logging
import math
import time

log = logging.getLogger("megatron_ext")


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
