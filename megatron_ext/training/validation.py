"""Validation loss during training (training.eval_interval, eval_iters; data.valid_data or data.split): the
training forward path without gradients on held-out samples, reduced over data-parallel ranks like the
training loss. Imports nothing of the loop: train.py hands it the function that runs micro-batches.
"""

import logging
import math

import torch

from megatron_ext.config import TrainConfig
from megatron_ext.data.dataset import MicroBatchIterator
from megatron_ext.training.batches import TRAIN, VALID, training_samples

log = logging.getLogger("megatron_ext")


class Validation:
    """Every eval_interval iterations (and after the last one), the loss over eval_iters x global_batch_size
    held-out samples: data.valid_data's, or the validation part of data.split over the training data's documents.

    The same samples every time (megatron-LM reads on through its validation set instead; NeMo, like us,
    starts over), so successive values differ only by the weights, and a resumed run reports the values of an
    uninterrupted one. Each iteration of it runs megatron's schedule forward-only, on every pipeline stage and
    model chunk, with the model in eval mode (no dropout) and no autograd graph; the loss is the sum over every
    token of every DP x CP rank divided by their count, as training's.
    """

    def __init__(self, config: TrainConfig, tokenizer, train_prefixes: list[str]):
        t, data = config.training, config.data
        self.config, self.interval, self.iters = config, t.eval_interval, t.eval_iters
        self.dataset = None
        if self.interval is None:
            return
        prefixes, part = (data.valid_data, TRAIN) if data.valid_data else (train_prefixes, VALID)
        self.dataset = training_samples(config, tokenizer, prefixes, num_samples=t.eval_iters * t.global_batch_size,
                                        part=part, setting="data.valid_data" if data.valid_data else "data.train_data")
        source = f"data.valid_data {prefixes}" if data.valid_data else f"the validation part of data.split={data.split}"
        log.info(f"megatron_ext: validation every {self.interval} iterations on {t.eval_iters} x "
                 f"{t.global_batch_size} samples of {source}")

    def due(self, iteration: int, last: bool) -> bool:
        return self.dataset is not None and (iteration % self.interval == 0 or last)

    def run(self, model: list, forward_losses) -> dict:
        """{"valid_loss", "valid_ppl"}, the same on every rank. `forward_losses(micro_batches)` runs the
        schedule forward-only and returns (loss sum, token count) over all DP x CP ranks."""
        from megatron.core import parallel_state as ps

        t = self.config.training
        batches = MicroBatchIterator(self.dataset, micro_batch_size=t.micro_batch_size,
                                     global_batch_size=t.global_batch_size, dp_rank=ps.get_data_parallel_rank(),
                                     dp_size=ps.get_data_parallel_world_size())
        loss_sum = tokens = 0.0
        for chunk in model:
            chunk.eval()
        try:
            with torch.no_grad():
                for _ in range(self.iters):
                    iteration_sum, iteration_tokens = forward_losses(batches.next_iteration())
                    loss_sum, tokens = loss_sum + iteration_sum, tokens + iteration_tokens
        finally:
            for chunk in model:
                chunk.train()
        loss = loss_sum / tokens if tokens else math.nan
        return dict(valid_loss=loss, valid_ppl=math.exp(min(loss, 700.0)))
