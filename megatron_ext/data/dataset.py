"""Training samples: megatron-core GPTDataset over indexed datasets, document masking, PoSE position ids, the
layout of global samples over iterations, micro-batches and data-parallel ranks (a context-parallel rank's share
of a batch: megatron_ext/context_parallel.py).
Imports megatron-core inside functions only: `megatron_ext.data` must stay cheap to import."""

import contextlib
import hashlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from megatron_ext.context_parallel import DOCUMENT_IDS
from megatron_ext.rope.pose import pose_chunks, pose_document_position_ids, pose_position_ids
from megatron_ext.data.indexed_file import check_loss_tokens, every_token_is
from megatron_ext.data.tokenizer_record import check_data_tokenizer
from megatron_ext.errors import InputError, MissingFile

TRAINING_FIELDS = ("tokens", "labels", "loss_mask", "position_ids")

# megatron-core reads path_to_cache=None as "next to the data" (`{prefix}/cache/...`) and an empty path as
# "build in memory, write nothing".
_IN_MEMORY = ""
# Samples built per source beyond its share of a blend, as megatron's builder does (mid_level_dataset_surplus):
# the blend's greedy draw may take one sample more than a source's exact share.
_BLEND_SURPLUS = 0.005


# ----------------------------------------------------------------------------- GPTDataset


def build_gpt_dataset(
    data_prefixes: list[str],
    seq_length: int,
    tokenizer,
    *,
    num_samples: int,
    seed: int,
    cache_dir: str | None = None,
    weights: list[float] | None = None,
    document_mask: bool = False,
    mask_eod_loss: bool = False,
    add_extra_token: bool = True,
    answer_only_loss: bool = False,
    split: str = "100,0,0",
    part: int = 0,
    setting: str = "data.train_data",
) -> torch.utils.data.Dataset:
    """`num_samples` samples of `seq_length` tokens from megatron-core's GPTDataset over the indexed datasets
    `data_prefixes` (`{prefix}.bin/.idx`, as `preprocess` writes them).

    Each item is a dict of tensors: tokens [L] int64, labels [L] int64 (tokens shifted by one), loss_mask [L]
    float (all ones), position_ids [L] int64 (0 .. L-1). GPTDataset packs documents (each ending in EOD)
    back to back and shuffles documents and samples with `seed`; the same arguments give the same samples.
    `len()` is exactly `num_samples`. Several prefixes are blended by `weights` (normalized; None: in proportion
    to their token counts); one prefix ignores them.

    `document_mask=True` keeps each packed document apart: position_ids restart at 0 after every EOD token and
    each item gains `document_ids` [L] int64 (0 for the tokens up to and including the first EOD, then 1, ...),
    from which the model's attention builds its block-causal mask. `mask_eod_loss=True` zeroes loss_mask where
    the token is EOD (megatron's eod_mask_loss: the prediction made from an EOD crosses into the next document).

    `add_extra_token=False` (megatron's add_extra_token_to_sequence) reads `seq_length` tokens per sample, not
    `seq_length + 1`, and the last position has no label (no loss): samples then tile the token stream without
    overlap, so documents of exactly `seq_length` tokens come one per sample. `answer_only_loss=True` keeps the
    loss only where each prefix's loss-mask sidecar (`{prefix}_loss_mask.bin/.idx`, same documents, 1 = this
    token is a target; `megatron_ext.data.passkey_data` writes one) marks the label, read with the very sample
    layout of the tokens.

    `split` is megatron's "train,valid,test" weights over each source's documents (contiguous ranges of its
    document index); `part` (0 train, 1 valid, 2 test) picks the range the samples come from.

    Before any work, each prefix's `.idx` must be whole and its `.bin` hold exactly the tokens it lists
    (`data/indexed_file.py`), and it must have been made with `tokenizer`, no id beyond its vocabulary
    (`check_data_tokenizer`; `setting` names where the prefixes came from in the refusal). A source whose
    documents in `part` hold no token the loss counts (all EOD under `mask_eod_loss`, none marked under
    `answer_only_loss`) is refused once its indices are built.

    Ranks: every rank builds its own copy (megatron's `is_built_on_rank` is always true here), so every TP,
    PP and CP rank can read its data locally. With torch.distributed initialized the call is collective (it
    holds barriers over the world group): every rank must call it with the same arguments.
    - `cache_dir=None`: every rank builds the index arrays in memory and writes nothing; global rank 0 first,
      then the others (megatron's order). Nothing needs to be shared.
    - `cache_dir` set: global rank 0 builds the indices and saves them there, in one subdirectory per version of
      each dataset's files (a dataset replaced at the same prefix gets new indices), or finds them from an earlier
      run, then the other ranks load them, so the directory must be on a filesystem every rank sees (a rank
      that cannot find them raises an error saying so). The blend's own index is always built in memory.
    """
    _check_build_arguments(data_prefixes, seq_length, num_samples, weights)
    for prefix in data_prefixes:  # made with this tokenizer, every id inside its vocabulary (data/tokenizer_record.py)
        check_data_tokenizer(prefix, tokenizer, setting=setting)
    _check_compiled_helpers()
    if answer_only_loss:
        for prefix in data_prefixes:
            check_loss_mask_sidecar(prefix)
    settings = dict(seq_length=seq_length, tokenizer=tokenizer, seed=seed, cache_dir=cache_dir,
                    add_extra_token=add_extra_token, split=split, part=part)
    with _no_warnings_about_in_memory_indices():
        if len(data_prefixes) == 1:
            megatron_dataset = _build_one_source(data_prefixes[0], num_samples, **settings)
        else:
            megatron_dataset = _build_blend(data_prefixes, weights, num_samples, **settings)
    _check_loss_tokens(megatron_dataset, data_prefixes, tokenizer.eod if mask_eod_loss else None, answer_only_loss,
                       setting=setting, split=split, part=part)
    eod = tokenizer.eod if document_mask or mask_eod_loss else None
    targets = _LossMaskSidecar(megatron_dataset, data_prefixes) if answer_only_loss else None
    return _TrainingSamples(megatron_dataset, num_samples, eod=eod, document_mask=document_mask,
                            mask_eod_loss=mask_eod_loss, targets=targets)


def check_loss_mask_sidecar(prefix) -> None:
    """The sidecar of `prefix` exists and lists exactly the documents and lengths of the tokens."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ext.data.retrieval import loss_mask_prefix

    sidecar = loss_mask_prefix(prefix)
    if not (Path(sidecar + ".bin").is_file() and Path(sidecar + ".idx").is_file()):
        raise MissingFile(f"data.answer_only_loss: {sidecar}.bin/.idx (the loss mask of {prefix}) not found; write "
                          "it with the data (megatron_ext.data.retrieval.write_with_loss_mask) or set data.answer_only_loss: false")
    tokens, marks = IndexedDataset(str(prefix)), IndexedDataset(sidecar)
    if (len(tokens) != len(marks) or not np.array_equal(tokens.sequence_lengths, marks.sequence_lengths)
            or not np.array_equal(tokens.document_indices, marks.document_indices)):
        raise InputError(f"data.answer_only_loss: {sidecar} does not list the documents of {prefix} (other counts "
                         "or lengths): write both again from the same documents")


class _LossMaskSidecar:
    """Per sample, which labels the loss counts: the sidecar read with the token dataset's own sample layout
    (a shallow copy of each GPTDataset with its IndexedDataset swapped for the sidecar's)."""

    def __init__(self, megatron_dataset, prefixes) -> None:
        import copy

        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from megatron_ext.data.retrieval import loss_mask_prefix

        self.blend = megatron_dataset if len(prefixes) > 1 else None
        sources = megatron_dataset.datasets if self.blend is not None else [megatron_dataset]
        self.views = []
        for source, prefix in zip(sources, prefixes):
            view = copy.copy(source)
            view.dataset = IndexedDataset(loss_mask_prefix(prefix))
            self.views.append(view)

    def __call__(self, index: int) -> torch.Tensor:
        view = self.views[0]
        if self.blend is not None:
            view = self.views[int(self.blend.dataset_index[index])]
            index = int(self.blend.dataset_sample_index[index])
        marks, _ = view._query_document_sample_shuffle_indices(index)
        marks = torch.from_numpy(marks == 1).float()  # padding (the pad id) marks nothing
        if view.config.add_extra_token_to_sequence:
            return marks[1:]
        return torch.cat([marks[1:], marks.new_zeros(1)])  # the last position has no label


def _check_loss_tokens(megatron_dataset, prefixes, eod: int | None, answer_only_loss: bool, *, setting: str,
                       split: str, part: int) -> None:
    """Each source's documents of this split part hold a token the loss counts: one that is not EOD under
    data.mask_eod_loss (`eod` given), one its loss-mask sidecar marks under data.answer_only_loss. Samples of a
    source without one would all have zero loss tokens (a blend's other sources cannot make up for it: its
    weight would train nothing)."""
    from megatron_ext.data.retrieval import loss_mask_prefix

    if eod is None and not answer_only_loss:
        return
    sources = megatron_dataset.datasets if len(prefixes) > 1 else [megatron_dataset]
    whole = [float(weight) for weight in split.split(",")][part] == sum(float(weight) for weight in split.split(","))
    named = "" if whole else f"the {('training', 'validation', 'test')[part]} part (split {split}) of "
    for source, prefix in zip(sources, prefixes):
        documents, boundaries = source.indices, source.dataset.document_indices
        if documents.size == 0:  # an empty split part: check_split_part names it
            continue
        sequences = (int(boundaries[documents.min()]), int(boundaries[documents.max() + 1]))
        if eod is not None:
            check_loss_tokens(prefix, eod, setting=setting, sequences=sequences, part=named)
        if answer_only_loss and every_token_is(loss_mask_prefix(prefix), 0, sequences):
            raise InputError(f"{setting}: the loss-mask sidecar of {named}data prefix '{prefix}' marks no target "
                             "token (data.answer_only_loss: true keeps the loss only there), so no sample has a token "
                             "to learn from: write the data with its targets marked, or set data.answer_only_loss: false")


def _check_build_arguments(data_prefixes, seq_length, num_samples, weights) -> None:
    if isinstance(data_prefixes, (str, Path)) or not data_prefixes:
        raise ValueError(f"data_prefixes ({data_prefixes!r}) must be a non-empty list of indexed dataset prefixes")
    for prefix in data_prefixes:
        missing = [path for path in (f"{prefix}.bin", f"{prefix}.idx") if not Path(path).is_file()]
        if missing:
            raise MissingFile(
                f"data prefix '{prefix}' has no {' or '.join(missing)}: pass the prefix of an indexed dataset "
                "(run `megatron-ext preprocess` to make one)"
            )
    if seq_length < 1:
        raise ValueError(f"seq_length ({seq_length}) must be >= 1")
    if num_samples < 1:
        raise ValueError(f"num_samples ({num_samples}) must be >= 1: train_iters * global_batch_size")
    if weights is not None and (len(weights) != len(data_prefixes) or any(weight <= 0 for weight in weights)):
        raise ValueError(
            f"weights ({weights}) must give one positive weight per data prefix ({len(data_prefixes)} prefixes): "
            "fix weights, or leave them out to blend by token count"
        )


def _index_cache_dir(prefix: str, cache_dir: str) -> str:
    """Where one source's indices are cached: a subdirectory named from its files' sizes and modification times.

    megatron keys its cache by the prefix's path and the settings, not by the files: a dataset replaced at the
    same prefix would reuse the old indices (other samples than a fresh build, or an IndexError)."""
    stats = [Path(f"{prefix}{suffix}").stat() for suffix in (".bin", ".idx")]
    identity = repr([(stat.st_size, stat.st_mtime_ns) for stat in stats]).encode()
    return str(Path(cache_dir) / f"{Path(prefix).name}-{hashlib.sha256(identity).hexdigest()[:16]}")


def _check_compiled_helpers() -> None:
    """megatron-core's wheels carry its C++ dataset helpers; a source build without pybind11 silently skips them."""
    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"megatron-core's compiled dataset helpers do not load ({error}): install a megatron-core wheel for "
            "this platform, or `pip install pybind11` and reinstall megatron-core from source with a C++ compiler"
        ) from error


def _gpt_dataset_config(prefix: str, *, seq_length: int, tokenizer, seed: int, cache_dir: str | None,
                        add_extra_token: bool = True, split: str = "100,0,0", part: int = 0):
    """The config of one source's GPTDataset (by default its train split the whole of it)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    # the blend must be given here: a config made without one turns into mock data with split "1,1,1"
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([str(prefix)], None),
        split=split,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        tokenizer=tokenizer,
        path_to_cache=_IN_MEMORY if cache_dir is None else _index_cache_dir(prefix, cache_dir),
        mmap_bin_files=True,
        add_extra_token_to_sequence=add_extra_token,
    )


def _build_one_source(prefix: str, num_samples: int, **settings):
    """megatron's GPTDataset of one indexed dataset (at least `num_samples` samples)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    config = _gpt_dataset_config(prefix, **settings)
    sizes = [None, None, None]
    sizes[settings["part"]] = num_samples
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config)
    try:
        built = builder.build()[settings["part"]]
    except FileNotFoundError as error:
        cache_dir = settings["cache_dir"]
        if cache_dir is None or not torch.distributed.is_initialized():
            raise
        raise MissingFile(
            f"rank {torch.distributed.get_rank()} cannot read the dataset indices that rank 0 saved in cache_dir "
            f"'{cache_dir}' ({error.filename}): put cache_dir on a filesystem all ranks share, or set it to None "
            "to build the indices in memory on every rank"
        ) from error
    return built


def _build_blend(prefixes, weights, num_samples: int, **settings):
    """megatron's BlendedDataset over one GPTDataset per source.

    Built here rather than by megatron's builder: megatron-core 0.16.1's BlendedDataset calls
    torch.distributed.get_rank() unguarded when it caches, which fails in a process without torch.distributed.
    Its index (which source, which sample) is cheap, so it is always built in memory.
    """
    from megatron.core.datasets.blended_dataset import BlendedDataset

    weights = _normalized(weights if weights is not None else _token_counts(prefixes))
    sources = [
        _build_one_source(prefix, math.ceil(math.ceil(num_samples * weight) * (1 + _BLEND_SURPLUS)), **settings)
        for prefix, weight in zip(prefixes, weights)
    ]
    blend_config = _gpt_dataset_config(prefixes[0], **{**settings, "cache_dir": None})  # None: in memory
    return BlendedDataset(sources, weights, num_samples, blend_config)


@contextlib.contextmanager
def _no_warnings_about_in_memory_indices():
    """Mute megatron's warning that it cannot save the indices "because path_to_cache is None": in memory is
    what cache_dir=None asks for (and always so for the blend index)."""

    class InMemoryIndicesFilter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "because path_to_cache is None" not in record.getMessage()

    in_memory_filter = InMemoryIndicesFilter()
    loggers = [logging.getLogger(f"megatron.core.datasets.{name}") for name in ("gpt_dataset", "blended_dataset")]
    for logger in loggers:
        logger.addFilter(in_memory_filter)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(in_memory_filter)


def _token_counts(prefixes: Sequence[str]) -> list[float]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    counts = []
    for prefix in prefixes:
        indexed = IndexedDataset(str(prefix))  # keep it alive: its arrays view a memory map it closes when freed
        counts.append(float(indexed.sequence_lengths.sum()))
    return counts


def _normalized(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    return [float(weight) / total for weight in weights]


class _TrainingSamples(torch.utils.data.Dataset):
    """The first `num_samples` samples of a megatron dataset, each as the `TRAINING_FIELDS` alone (+ document_ids
    with document masking)."""

    def __init__(self, megatron_dataset, num_samples: int, *, eod: int | None = None, document_mask: bool = False,
                 mask_eod_loss: bool = False, targets=None) -> None:
        if len(megatron_dataset) < num_samples:
            raise ValueError(f"megatron built {len(megatron_dataset)} samples, fewer than num_samples ({num_samples})")
        self.megatron_dataset = megatron_dataset
        self.num_samples = num_samples
        self.eod = eod
        self.document_mask = document_mask
        self.mask_eod_loss = mask_eod_loss
        self.targets = targets  # sample index -> [L] loss mask from a sidecar, or None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} is out of range: the dataset has num_samples ({self.num_samples})")
        sample = self.megatron_dataset[index]
        fields = {name: sample[name] for name in TRAINING_FIELDS}
        fields["position_ids"] = fields["position_ids"].clone()  # GPTDataset hands every sample one cached tensor
        if self.document_mask:
            fields[DOCUMENT_IDS] = document_ids_from_eod(fields["tokens"] == self.eod)
            fields["position_ids"] = positions_within_documents(fields[DOCUMENT_IDS])
        if self.mask_eod_loss:
            fields["loss_mask"] = fields["loss_mask"] * (fields["tokens"] != self.eod)
        if self.targets is not None:
            fields["loss_mask"] = fields["loss_mask"] * self.targets(index)
        return fields


def document_ids_from_eod(is_eod: torch.Tensor) -> torch.LongTensor:
    """[L] bool (token is EOD) -> [L]: the document of the window each token belongs to, from 0. An EOD token
    ends its document, so the next token starts the next one."""
    ends = is_eod.long()
    return torch.cumsum(ends, dim=-1) - ends


def positions_within_documents(document_ids: torch.Tensor) -> torch.LongTensor:
    """[..., L] -> [..., L]: each token's index within its document (0 where a document starts)."""
    index = torch.arange(document_ids.size(-1)).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    start_index = torch.cummax(torch.where(starts, index, 0), dim=-1).values
    return index - start_index


# ----------------------------------------------------------------------------- PoSE


class PoseDataset(torch.utils.data.Dataset):
    """PoSE samples: the base dataset's L-token samples with position ids drawn from a target window.

    tokens, labels and loss_mask are the base's; position_ids are
    `pose_position_ids(L, target_length, seed=seed, sample_index=index, ...)`, keyed by the dataset index (the
    global sample index), so every rank and a resumed run compute the same ids without communicating. A base
    with document masking (items with `document_ids`) gets ids per document: each restarts at 0 and draws its
    own chunks, keyed by (seed, sample index, document index in the window) (`pose_document_position_ids`).

    Content is the base's contiguous window of packed documents: the paper's content offsets v_i, which skip
    content between chunks (`pose_content_indices`), are not drawn; the paper reports that the choice of v_i
    barely changes results (its v_i = 0 ablation).

    `mask_chunk_boundary=True` zeroes loss_mask at every token whose next position id jumps (the label that
    crosses a chunk boundary). A boundary whose skip is zero has no jump and keeps its loss; a document boundary
    is no chunk boundary (`data.mask_eod_loss` is its setting).
    """

    def __init__(
        self,
        base,
        *,
        target_length: int,
        seed: int,
        num_chunks: int = 2,
        variant: str = "code",
        mask_chunk_boundary: bool = False,
    ) -> None:
        self.base = base
        self.target_length = target_length
        self.seed = seed
        self.num_chunks = num_chunks
        self.variant = variant
        self.mask_chunk_boundary = mask_chunk_boundary
        # check the settings now rather than at the first batch
        seq_length = len(base[0]["tokens"])
        pose_chunks(seq_length, target_length, seed=seed, sample_index=0, num_chunks=num_chunks, variant=variant)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = dict(self.base[index])
        settings = dict(seed=self.seed, sample_index=index, num_chunks=self.num_chunks, variant=self.variant)
        document_ids = sample.get(DOCUMENT_IDS)
        if document_ids is None:
            position_ids = pose_position_ids(len(sample["tokens"]), self.target_length, **settings)
        else:
            position_ids = pose_document_position_ids(document_ids, self.target_length, **settings)
        sample["position_ids"] = position_ids
        if self.mask_chunk_boundary:
            sample["loss_mask"] = sample["loss_mask"] * _continuing_positions(position_ids, document_ids)
        return sample


def _continuing_positions(position_ids: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """1.0 where the next token's position id is this one's + 1 (and at the last token, and before a new
    document), 0.0 where it jumps inside a document."""
    jumps = position_ids[1:] - position_ids[:-1] != 1
    if document_ids is not None:
        jumps &= document_ids[1:] == document_ids[:-1]
    keep = torch.ones(position_ids.shape, dtype=torch.float32)
    keep[:-1][jumps] = 0.0
    return keep


# ----------------------------------------------------------------------------- micro-batches


def _check_batch_sizes(micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int) -> int:
    """The number of micro-batches per iteration, after checking the batch settings."""
    if micro_batch_size < 1 or dp_size < 1:
        raise ValueError(
            f"training.micro_batch_size ({micro_batch_size}) and the data-parallel size ({dp_size}) must be >= 1"
        )
    samples_per_micro_batch = micro_batch_size * dp_size
    if global_batch_size < 1 or global_batch_size % samples_per_micro_batch:
        raise ValueError(
            f"training.global_batch_size ({global_batch_size}) must be a positive multiple of "
            f"training.micro_batch_size ({micro_batch_size}) * data-parallel size ({dp_size}) = "
            f"{samples_per_micro_batch}: set training.global_batch_size to a multiple of {samples_per_micro_batch}, "
            "or change training.micro_batch_size"
        )
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank ({dp_rank}) must lie in [0, data-parallel size ({dp_size}))")
    return global_batch_size // samples_per_micro_batch


def global_sample_indices(
    iteration: int,
    micro_batch: int,
    *,
    micro_batch_size: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
) -> list[int]:
    """The global sample indices of micro-batch `micro_batch` of data-parallel rank `dp_rank` at `iteration`.

    Iteration i covers samples [i*G, (i+1)*G) (G = global_batch_size); micro-batch m of rank r takes
    i*G + m*mbs*dp + r*mbs + [0, mbs). So the data position is the iteration number alone, and over all ranks
    and micro-batches of an iteration every one of its samples is used exactly once.
    """
    num_microbatches = _check_batch_sizes(micro_batch_size, global_batch_size, dp_rank, dp_size)
    if iteration < 0:
        raise ValueError(f"iteration ({iteration}) must be >= 0")
    if not 0 <= micro_batch < num_microbatches:
        raise ValueError(f"micro_batch ({micro_batch}) is not one of the {num_microbatches} micro-batches of an iteration")
    start = iteration * global_batch_size + micro_batch * micro_batch_size * dp_size + dp_rank * micro_batch_size
    return list(range(start, start + micro_batch_size))


class MicroBatchIterator:
    """The micro-batches of one data-parallel rank, iteration after iteration, for megatron's schedules.

    `next(it)` is the next micro-batch: a dict of stacked [micro_batch_size, L] tensors. Every TP, PP and CP
    rank of a data-parallel rank reads the same samples itself: no broadcast, and every pipeline stage has the
    position ids. `iteration` is the next iteration it serves, the data position to checkpoint; a run resumed
    with `start_iteration=iteration` continues with the very same samples.
    """

    def __init__(
        self,
        dataset,
        *,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        start_iteration: int = 0,
    ) -> None:
        self.num_microbatches = _check_batch_sizes(micro_batch_size, global_batch_size, dp_rank, dp_size)
        if start_iteration < 0:
            raise ValueError(f"start_iteration ({start_iteration}) must be >= 0")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.iteration = start_iteration
        self._micro_batch = 0  # within self.iteration

    def __iter__(self) -> "MicroBatchIterator":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        indices = global_sample_indices(
            self.iteration,
            self._micro_batch,
            micro_batch_size=self.micro_batch_size,
            global_batch_size=self.global_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )
        batch = self._stacked(indices)
        self._micro_batch += 1
        if self._micro_batch == self.num_microbatches:
            self.iteration, self._micro_batch = self.iteration + 1, 0
        return batch

    def next_iteration(self) -> list[dict[str, torch.Tensor]]:
        """The `num_microbatches` micro-batches of the next iteration."""
        if self._micro_batch:
            raise RuntimeError(
                f"iteration {self.iteration} is half served ({self._micro_batch} of {self.num_microbatches} "
                "micro-batches taken with next()): use either next() or next_iteration() on one iterator"
            )
        return [next(self) for _ in range(self.num_microbatches)]

    def _stacked(self, indices: list[int]) -> dict[str, torch.Tensor]:
        if indices[-1] >= len(self.dataset):
            raise IndexError(
                f"iteration {self.iteration} needs sample {indices[-1]}, but the dataset has {len(self.dataset)} "
                f"samples: build it with num_samples >= training.train_iters * training.global_batch_size "
                f"({self.global_batch_size} per iteration), or lower training.train_iters"
            )
        samples = [self.dataset[index] for index in indices]
        return {name: torch.stack([sample[name] for sample in samples]) for name in samples[0]}
