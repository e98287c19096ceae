"""Where training numbers go: the console (progress bar + a line every log_interval), TensorBoard and W&B;
the per-rank step times behind the straggler columns; the profiler trace and the NVTX ranges of a run.

Imports no megatron. The FLOP and MFU formulas live in megatron_ext/sizes.py.
"""

import contextlib
import logging
import math
import statistics
import time
from pathlib import Path

import torch

log = logging.getLogger("megatron_ext")

# the straggler columns: each rank's step time outside the gradient reduction, over all ranks
RANK_STEP_KEYS = ("rank_step_s_min", "rank_step_s_median", "rank_step_s_max", "slowest_rank")


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
                    self.tensorboard.add_scalar(metric_tag(key), value, iteration)
        if self.wandb is not None:
            self.wandb.log({metric_tag(k): v for k, v in metrics.items() if v is not None}, step=iteration)
        if iteration % self.log_interval == 0 or "valid_loss" in metrics:
            parts = [f"iter {iteration}"] + [f"{k} {_fmt(v)}" for k, v in metrics.items()
                                              if v is not None and k not in RANK_STEP_KEYS]
            if "slowest_rank" in metrics:
                parts.append("rank step_s min/median/max " + "/".join(_fmt(metrics[k]) for k in RANK_STEP_KEYS[:3])
                             + f" (slowest: rank {metrics['slowest_rank']})")
            message = " | ".join(parts)
            (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def metric_tag(key: str) -> str:
    """TensorBoard / W&B tag: valid_loss -> valid/loss (validation, training.eval_interval), loss -> train/loss."""
    return f"valid/{key[len('valid_'):]}" if key.startswith("valid_") else f"train/{key}"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class TimedCalls:
    """A function that adds up the seconds spent in it; `take` returns them and starts again from zero."""

    def __init__(self, function):
        self.function, self.seconds = function, 0.0

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.function(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class RankStepTimes:
    """Straggler columns: every rank's mean step time over a log interval, all-gathered, as min / median / max
    and the slowest rank.

    A rank's time leaves out what it spent in the gradient reduction: there a fast rank waits for the slow
    one, so the plain wall time of a step is the same on every data-parallel rank. What remains is the
    rank's own work (under pipeline parallelism it includes waiting for the neighbouring stages). A
    collective over all ranks: call `gather` at the same iterations everywhere (one process: no columns).
    """

    def __init__(self, device):
        self.device, self.seconds, self.steps = device, 0.0, 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1

    def gather(self) -> dict:
        mine = torch.tensor([self.seconds / max(1, self.steps)], dtype=torch.float64, device=self.device)
        self.seconds, self.steps = 0.0, 0
        if torch.distributed.get_world_size() == 1:
            return {}
        everyone = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(everyone, mine)
        times = [t.item() for t in everyone]
        slowest = max(range(len(times)), key=times.__getitem__)
        return dict(zip(RANK_STEP_KEYS, (min(times), statistics.median(times), times[slowest], slowest)))


@contextlib.contextmanager
def phase(name: str):
    """A named range: a torch.profiler event (in `logging.profile` traces) and, with CUDA, an NVTX range for
    Nsight Systems (`nsys profile --trace=cuda,nvtx`)."""
    with torch.profiler.record_function(name):
        if not torch.cuda.is_available():
            yield
            return
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()


class ProfileRecorder:
    """`logging.profile`: a torch.profiler trace of iterations start_iter..end_iter on the chosen ranks, written
    as Chrome trace JSON to `{profile_dir}/iter{start}-{end}/rank{r}.pt.trace.json` (chrome://tracing,
    Perfetto, or TensorBoard's torch-tb-profiler plugin with --logdir profile_dir). The profiler runs only
    inside the window, so the trace holds those iterations and nothing else."""

    def __init__(self, window, directory: str, rank: int):
        self.window, self.rank = window, rank
        self.profiler = None
        self.path = None
        if window is not None:
            self.path = Path(directory) / f"iter{window.start_iter}-{window.end_iter}" / f"rank{rank}.pt.trace.json"

    @contextlib.contextmanager
    def iteration(self, iteration: int):
        """The iteration as the range `iteration N`, traced when the window covers it."""
        if self.profiler is None and self.window is not None and self.window.covers(iteration, self.rank):
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()
        with phase(f"iteration {iteration}"):
            yield
        if self.profiler is not None and iteration >= self.window.end_iter:
            self.close()

    def close(self) -> None:
        """Stop and write the trace (also when the run ends inside the window)."""
        if self.profiler is None:
            return
        self.profiler.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.profiler.export_chrome_trace(str(self.path))
        self.profiler = None
        log.info(f"megatron_ext: profiler trace of rank {self.rank} written to {self.path}")
