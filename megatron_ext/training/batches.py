"""What each iteration trains and validates on: the datasets (megatron's split, PoSE ids, document masks), the
batch-size ramp-up (megatron-core's RampupBatchsizeNumMicroBatchesCalculator) and this rank's micro-batches.

Imports megatron-core inside functions and nothing of the loop (training/train.py and validation.py use it).
"""

import math
from pathlib import Path

from megatron_ext.config import ConfigError, TrainConfig
from megatron_ext.config.train import split_weights
from megatron_ext.data.dataset import MicroBatchIterator

TRAIN, VALID = 0, 1  # megatron's split parts
PART_NAMES = ("training", "validation", "test")


def training_samples(config: TrainConfig, tokenizer, prefixes: list[str], *, num_samples: int, part: int = TRAIN,
                     setting: str = "data.train_data"):
    """`num_samples` samples of `prefixes` as the loop reads them: megatron's GPTDataset over the documents of
    `part` of data.split (all of them without a split), then document masks, loss masks and PoSE ids as the
    config asks. Validation takes the same transforms, so its loss measures the training objective. `setting`
    names where `prefixes` come from (data.train_data, or data.valid_data: every document of those, unweighted)
    in the refusals of data that cannot be used."""
    from megatron_ext.data import PoseDataset, build_gpt_dataset

    t, data = config.training, config.data
    split = "100,0,0"
    if data.split is not None and not data.valid_data:  # valid_data: every document of train_data trains
        split = ",".join(f"{weight:g}" for weight in split_weights(data.split))
        check_split_part(prefixes, split, part)
    weighted = part == TRAIN and setting == "data.train_data"  # data.train_data_weights are train_data's
    dataset = build_gpt_dataset(
        prefixes, config.model.seq_length, tokenizer, num_samples=num_samples, seed=t.seed,
        cache_dir=str(Path(data.cache_dir) / "index"), weights=data.train_data_weights if weighted else None,
        document_mask=data.document_mask, mask_eod_loss=data.mask_eod_loss, add_extra_token=data.add_extra_token,
        answer_only_loss=data.answer_only_loss, split=split, part=part, setting=setting,
    )
    if config.pose.enabled:
        pose = config.pose
        dataset = PoseDataset(dataset, target_length=pose.target_length, seed=t.seed, num_chunks=pose.num_chunks,
                              variant=pose.variant, mask_chunk_boundary=pose.mask_chunk_boundary)
    return dataset


def check_split_part(prefixes: list[str], split: str, part: int) -> None:
    """megatron's builder gives a split part the sequences [round(begin x N), round(end x N)) of each source's N;
    a part with no tokens makes GPTDataset count epochs forever (measured: a hang), so it is refused by name."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    begin, end = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[part]
    for prefix in prefixes:
        indexed = IndexedDataset(str(prefix))  # kept alive: its arrays view a memory map it closes when freed
        lengths = indexed.sequence_lengths
        first, last = int(round(begin * float(len(lengths)))), int(round(end * float(len(lengths))))
        if int(lengths[first:last].sum()) == 0:
            raise ConfigError(
                f"data.split={split} leaves the {PART_NAMES[part]} part no sequence of the {len(lengths)} in {prefix} "
                f"(it would get sequences {first} to {last}): give that part at least "
                f"{math.ceil(100 / max(1, len(lengths)))}% of the weights, or use data.valid_data")


class BatchRamp:
    """training.rampup_batch_size = [start, increment, samples], as megatron-LM ramps: the global batch of an
    iteration is megatron-core's RampupBatchsizeNumMicroBatchesCalculator at the samples consumed before it
    (start + increment per samples / ((global - start) / increment) samples, then global_batch_size).

    The data position of an iteration is the samples all earlier iterations consumed, a function of the
    iteration alone, so a resumed run (any number of restarts) reads the very samples of an uninterrupted one.
    Without a ramp every iteration takes global_batch_size samples.
    """

    def __init__(self, config: TrainConfig):
        t = config.training
        self.global_batch_size = t.global_batch_size
        self.consumed = [0]  # consumed[k]: samples before iteration index k, while the ramp lasts
        self.sizes = []  # sizes[k]: the global batch of iteration index k, while the ramp lasts
        if t.rampup_batch_size is None:
            return
        from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

        start, increment, samples = t.rampup_batch_size
        calculator = RampupBatchsizeNumMicroBatchesCalculator(
            t.global_batch_size, t.micro_batch_size, data_parallel_size=1, decrease_batch_size_if_needed=False,
            rank=-1, start_global_batch_size=start, batch_size_increment=increment, ramup_samples=samples)
        while True:
            calculator.update(self.consumed[-1], consistency_check=False)
            size = calculator.get_current_global_batch_size()
            if size == t.global_batch_size:
                break
            self.sizes.append(size)
            self.consumed.append(self.consumed[-1] + size)

    def batch_size(self, iteration: int) -> int:
        """The global batch of 0-based iteration index `iteration` (the loop's iteration N is index N - 1)."""
        return self.sizes[iteration] if iteration < len(self.sizes) else self.global_batch_size

    def consumed_samples(self, iteration: int) -> int:
        """The samples all iterations before index `iteration` took."""
        ramp = len(self.sizes)
        if iteration <= ramp:
            return self.consumed[iteration]
        return self.consumed[ramp] + (iteration - ramp) * self.global_batch_size

    def batch_sizes(self) -> list[int]:
        """Every global batch size a run takes, ramp first."""
        return sorted(set(self.sizes)) + [self.global_batch_size]


def check_batch_layout(config: TrainConfig, dp_size: int) -> None:
    """The batch rules that need the data-parallel size, before any model is built: every batch of the ramp is
    whole micro-batches on every DP rank, and the interleaved schedule runs them in groups of PP."""
    t, p = config.training, config.parallel
    per_micro_batch = t.micro_batch_size * dp_size
    for size in BatchRamp(config).batch_sizes():
        if size % per_micro_batch:
            raise ConfigError(
                f"training.rampup_batch_size reaches a global batch of {size} samples, not a multiple of "
                f"micro-batch x DP = {per_micro_batch}: pick start and increment as multiples of {per_micro_batch}")
        micro_batches = size // per_micro_batch
        pp = p.pipeline_model_parallel_size
        if p.virtual_pipeline_model_parallel_size is not None and micro_batches % pp:
            raise ConfigError(
                f"parallel.virtual_pipeline_model_parallel_size: megatron's interleaved schedule runs micro-batches "
                f"in groups of PP = {pp}, but a global batch of {size} samples is {micro_batches} micro-batches per "
                f"DP rank (micro-batch x DP = {per_micro_batch}): make every global batch a multiple of "
                f"{per_micro_batch * pp} samples")


class RampedMicroBatches(MicroBatchIterator):
    """MicroBatchIterator whose iterations take BatchRamp's global batch: iteration index i covers samples
    [consumed(i), consumed(i) + batch(i)), laid out over micro-batches and DP ranks as without a ramp."""

    def __init__(self, dataset, ramp: BatchRamp, *, micro_batch_size: int, dp_rank: int, dp_size: int,
                 start_iteration: int = 0):
        super().__init__(dataset, micro_batch_size=micro_batch_size, global_batch_size=ramp.global_batch_size,
                         dp_rank=dp_rank, dp_size=dp_size, start_iteration=start_iteration)
        self.ramp = ramp

    @property
    def current_global_batch_size(self) -> int:
        """The global batch of the next iteration."""
        return self.ramp.batch_size(self.iteration)

    def next_iteration(self):
        size, first = self.ramp.batch_size(self.iteration), self.ramp.consumed_samples(self.iteration)
        step = self.micro_batch_size * self.dp_size
        batches = [self._stacked(list(range(first + start + self.dp_rank * self.micro_batch_size,
                                            first + start + (self.dp_rank + 1) * self.micro_batch_size)))
                   for start in range(0, size, step)]
        self.iteration += 1
        return batches

    def __next__(self):
        raise TypeError("RampedMicroBatches serves whole iterations: call next_iteration()")


def micro_batches(config: TrainConfig, dataset, *, start_iteration: int):
    """This DP rank's micro-batches of `dataset` from `start_iteration` on (with the ramp when there is one)."""
    from megatron.core import parallel_state as ps

    t = config.training
    layout = dict(micro_batch_size=t.micro_batch_size, dp_rank=ps.get_data_parallel_rank(),
                  dp_size=ps.get_data_parallel_world_size(), start_iteration=start_iteration)
    if t.rampup_batch_size is None:
        return MicroBatchIterator(dataset, global_batch_size=t.global_batch_size, **layout)
    return RampedMicroBatches(dataset, BatchRamp(config), **layout)
