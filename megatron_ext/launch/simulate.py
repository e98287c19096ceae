"""`megatron-ext plan --simulate`: build one rank of a layout on fake tensors, run one training step, measure.

For each pipeline stage, one rank of that stage is built as the training run builds it: LongContextGPTModel
of the stage, Float16Module (bf16), megatron-core's DDP (fp32 gradient buffers) and its (distributed)
optimizer, with megatron's groups for the full TP x PP x CP x DP world on a fake process group
(launch/fake_megatron.py). Then one full step runs, as training/train.py's train_step does: megatron's
pipeline schedule over every micro-batch of the step (forward and backward, 1F1B when PP > 1), gradient
finalization, the optimizer step. Live storage bytes are counted by category all along (launch/live_storage.py)
after a warm-up optimizer step has created Adam's states, as they exist from the second step on.

The GPU run's fused kernels cannot be imported here; stand-ins with their memory take their place
(launch/gpu_standins.py): flash attention (q, k, v, output, softmax statistics; packed THD documents when
data.document_mask is on; the CP exchange's K/V buffers) and TE's fused RMSNorm. What is not simulated is
listed in NOT_SIMULATED and printed with every report.

The loop itself (training/) is not imported: the DDP and optimizer settings are training's own, from
megatron_ext.models.builder (ddp_config, optimizer_config), which both build from.
"""

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from megatron_ext.config import TrainConfig
from megatron_ext.config.reader import apply_override, from_dict
from megatron_ext.launch.errors import LaunchError
from megatron_ext.launch.live_storage import (
    ACTIVATIONS, CATEGORIES, GRADIENTS, OPTIMIZER, OTHER, PARAMETERS, TEMPORARIES, LiveStorages,
)
from megatron_ext.launch.memory import GIB, StageMemory, stage_memory
from megatron_ext.launch.workload import Layout, workload_from_config
from megatron_ext.sizes import padded_vocab_size

NOT_SIMULATED = (
    "CUDA context, NCCL buffers, cuBLAS/TE workspaces and allocator fragmentation (the planner's reserve)",
    "weight gradients accumulated straight into main_grad by TE/apex (gradient_accumulation_fusion): here each "
    "weight's bf16 gradient exists for a moment before DDP adds it (counted in temporaries)",
    "the contents of TE's kernels beyond their saved tensors and exchange buffers (flash attention's tiles, "
    "cuDNN workspaces)",
    "the gradient-norm computation (scalars) and clipping (in place)",
    "FP8 (the simulation runs bf16)",
)

# Planner term -> the simulation's category it is compared with.
PLANNER_CATEGORY = {
    "weights (bf16)": PARAMETERS,
    "gradients (fp32 main grads)": GRADIENTS,
    "optimizer (fp32 master, Adam m and v)": OPTIMIZER,
    "activations": ACTIVATIONS,
    "recomputed layer (backward)": TEMPORARIES,
    "output layer and loss": ACTIVATIONS,
    "RoPE tables (transient)": TEMPORARIES,
    "context-parallel K/V buffers": TEMPORARIES,
    "FP8 weight copies (Transformer Engine)": PARAMETERS,
}


@dataclass
class StageSimulation:
    """What one rank of one pipeline stage held: the peak and its split, per-phase peaks, exact counts."""

    stage: int
    rank: int
    peak: int
    split: dict[str, int]  # category -> bytes at the peak
    peak_phase: str
    peak_op: str
    phase_peaks: dict[str, int]
    steady: dict[str, int]  # category -> bytes after the warm-up (weights, grads, optimizer state)
    activations_per_micro_batch: int  # saved tensors of the first micro-batch, at the end of its forward
    micro_batches: int
    parameters: int  # elements of this rank's parameters (unpadded)
    planner: StageMemory
    seconds: float

    def planner_split(self) -> dict[str, float]:
        split = dict.fromkeys(CATEGORIES, 0.0)
        for term, value in self.planner.terms.items():
            split[PLANNER_CATEGORY.get(term, TEMPORARIES)] += value
        return split


@dataclass
class Simulation:
    config_name: str
    layout: Layout
    world_size: int
    usable_bytes: float
    device_bytes: float
    layers: int
    stages: list[StageSimulation] = field(default_factory=list)
    not_simulated: tuple[str, ...] = NOT_SIMULATED

    @property
    def peak(self) -> StageSimulation:
        return max(self.stages, key=lambda s: s.peak)

    @property
    def fits(self) -> bool:
        return self.peak.peak <= self.usable_bytes


def layout_config(config: TrainConfig, layout: Layout, *, distributed_optimizer: bool = True,
                  num_layers: int | None = None) -> TrainConfig:
    """`config` with the layout's settings (as `megatron-ext train --set` would apply them), bf16, FP8 off."""
    from megatron_ext.config.train import validate

    raw = config.to_dict()
    overrides = [*layout.override_args(distributed_optimizer), "training.precision=bf16", "training.fp8=off",
                 f"parallel.overlap_grad_reduce={str(layout.overlap).lower()}",
                 f"parallel.overlap_param_gather={str(layout.overlap and distributed_optimizer).lower()}"]
    if num_layers is not None:
        overrides.append(f"model.num_layers={num_layers}")
    for item in overrides:
        apply_override(raw, item)
    simulated = from_dict(TrainConfig, raw, prefix="")
    validate(simulated, check_files=False)
    return simulated


def gpu_transformer_config(config: TrainConfig, standins: bool):
    """The TransformerConfig the GPU run builds (its fusions on), with CPU initialization (fake: costs nothing).
    Without stand-ins: exactly what this machine's training builds (for comparisons with real CPU runs)."""
    from megatron_ext.models.builder import transformer_config

    tc = transformer_config(config, torch.device("cpu"))
    if not standins:
        return tc
    return dataclasses.replace(tc, bias_activation_fusion=True, bias_dropout_fusion=True)


def layer_spec(config: TrainConfig, standins: bool):
    from megatron_ext.launch.gpu_standins import FlashAttentionStandIn, FusedRMSNormStandIn
    from megatron_ext.models.specs import local_layer_spec

    spec = local_layer_spec(normalization=config.model.normalization)
    if standins:
        if config.model.normalization != "RMSNorm":
            raise LaunchError(f"model.normalization={config.model.normalization}: the simulation's fused-norm "
                              "stand-in is RMSNorm's; simulate an RMSNorm model")
        spec.submodules.self_attention.submodules.core_attention = FlashAttentionStandIn
        spec.submodules.input_layernorm = FusedRMSNormStandIn
        spec.submodules.pre_mlp_layernorm = FusedRMSNormStandIn
    return spec


def micro_batch(config: TrainConfig, packed: bool, cp: int):
    """One micro-batch of this CP rank (fake zeros: only shapes matter). Packed (THD) when documents are
    masked with the GPU's attention: one row of b x s/cp tokens and cu_seqlens, as batch_on_this_rank makes."""
    b, s = config.training.micro_batch_size, config.model.seq_length // cp
    if packed:
        from megatron.core.packed_seq_params import PackedSeqParams

        tokens = torch.zeros(1, b * s, dtype=torch.long)
        cu_seqlens = torch.tensor([0, b * s], dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                 max_seqlen_q=b * s * cp, max_seqlen_kv=b * s * cp)
        return dict(tokens=tokens, labels=tokens.clone(), loss_mask=torch.ones(1, b * s),
                    position_ids=tokens.clone(), packed_seq_params=params)
    tokens = torch.zeros(b, s, dtype=torch.long)
    batch = dict(tokens=tokens, labels=tokens.clone(), loss_mask=torch.ones(b, s), position_ids=tokens.clone())
    if config.data.document_mask:
        batch["document_ids"] = tokens.clone()
    return batch


class _Step:
    """The forward step of training/train.py (per-token loss sum and token count), marking the phases."""

    def __init__(self, tracker: LiveStorages):
        self.tracker, self.forwards, self.backwards = tracker, 0, 0
        self.first_forward_activations = None

    def __call__(self, data_iterator, model):
        from functools import partial

        batch = next(data_iterator)
        self.tracker.phase = f"forward {self.forwards}"
        self.forwards += 1
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       document_ids=batch.get("document_ids"), packed_seq_params=batch.get("packed_seq_params"))
        output.register_hook(self._backward_starts)
        return output, partial(self._loss, batch["loss_mask"])

    def _loss(self, loss_mask, per_token_loss):
        mask = loss_mask.reshape(-1).float()
        loss_sum = (per_token_loss.float().reshape(-1) * mask).sum()
        if self.first_forward_activations is None:
            self.first_forward_activations = self.tracker.live.get(ACTIVATIONS, 0)
        return loss_sum, mask.sum().to(torch.int), {"lm loss": loss_sum.detach()}

    def _backward_starts(self, grad):
        self.tracker.phase = f"backward {self.backwards}"
        self.backwards += 1
        return grad


def _finalize_without_token_count(tokens: int):
    """megatron's finalize_model_grads, the per-token scaling by a Python number (fake counts have no value)."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    def finalize(model, num_tokens=None, **kwargs):
        finalize_model_grads(model, None, **kwargs)
        for chunk in model:
            chunk.scale_gradients(1.0 / tokens)

    return finalize


def simulate_stage(config: TrainConfig, layout: Layout, stage: int, *, distributed_optimizer: bool = True,
                   standins: bool = True, planner: StageMemory | None = None) -> StageSimulation:
    """Rank 0 of stage `stage` (TP, CP and DP rank 0) of `config` (already in `layout`), one full step."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from megatron_ext.launch.fake_megatron import cast_parameters, fake_rank
    from megatron_ext.models import LongContextGPTModel
    from megatron_ext.models.builder import ddp_config, optimizer_config

    started = time.perf_counter()
    p, t = config.parallel, config.training
    world = layout.gpus
    rank = stage * (world // layout.pp)  # megatron's order tp-cp-ep-dp-pp: the pipeline rank is outermost
    micro_batches = layout.micro_batches(t.global_batch_size)
    packed = standins and config.data.document_mask
    tracker = LiveStorages()
    tc = gpu_transformer_config(config, standins)  # real numbers: the HARPE bases are checked here
    with fake_rank(rank, world, shared_positions=not config.pose.enabled, fused_norms=standins):
        ps.initialize_model_parallel(tensor_model_parallel_size=p.tensor_model_parallel_size,
                                     pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                                     context_parallel_size=p.context_parallel_size)
        assert ps.get_pipeline_model_parallel_rank() == stage and ps.get_data_parallel_rank() == 0
        vocab = padded_vocab_size(config.model.vocab_size, p.tensor_model_parallel_size)
        with tracker.running():
            gpt = LongContextGPTModel(tc, layer_spec(config, standins), vocab, config.model.seq_length,
                                      pre_process=ps.is_pipeline_first_stage(),
                                      post_process=ps.is_pipeline_last_stage(),
                                      share_embeddings_and_output_weights=config.model.tie_embeddings)
            parameters = sum(param.numel() for param in gpt.parameters())
            cast_parameters(gpt, torch.bfloat16)
            model = DistributedDataParallel(tc, ddp_config(config), Float16Module(tc, gpt))
            tc.finalize_model_grads_func = _finalize_without_token_count(t.global_batch_size * config.model.seq_length)
            tc.no_sync_func = model.no_sync
            if p.overlap_grad_reduce:
                tc.grad_sync_func = model.start_grad_sync
            tracker.assign([param for param in model.parameters()], PARAMETERS)
            tracker.assign([param.main_grad for param in model.parameters()], GRADIENTS)
            before = set(tracker.records)
            optimizer = get_megatron_optimizer(optimizer_config(config, tc), [model])
            tracker.phase = "optimizer warm-up"
            _optimizer_step(optimizer)  # Adam's states appear at the first step; they exist from then on
            _file_new_as(tracker, before, OPTIMIZER)
            # overlap_param_gather: DDP's forward pre-hooks (on from the start) gather the updated weights
            steady = tracker.snapshot()
            tracker.reset_peak()

            step = _Step(tracker)
            model.zero_grad_buffer()
            optimizer.zero_grad()
            batches = [micro_batch(config, packed, layout.cp) for _ in range(micro_batches)]
            get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter(batches), model=[model], num_microbatches=micro_batches,
                seq_length=config.model.seq_length, micro_batch_size=1 if packed else t.micro_batch_size,
                forward_only=False)
            tracker.phase = "optimizer step"
            _optimizer_step(optimizer)
    return StageSimulation(
        stage=stage, rank=rank, peak=tracker.peak_total, split=tracker.peak_split(), peak_phase=tracker.peak_phase,
        peak_op=tracker.peak_op, phase_peaks=_phase_kinds(tracker.phase_peaks), steady=steady,
        activations_per_micro_batch=step.first_forward_activations or 0, micro_batches=micro_batches,
        parameters=parameters, planner=planner, seconds=time.perf_counter() - started)


def _optimizer_step(optimizer) -> None:
    """train_step's update: grads prepared, then the step (the norm and clipping are scalars / in place)."""
    optimizer.prepare_grads()
    optimizer.step_with_ready_grads()


def _file_new_as(tracker: LiveStorages, before: set, category: str) -> None:
    for key, record in list(tracker.records.items()):
        if key not in before and record.category in (TEMPORARIES, OTHER):
            tracker._move(record, category)


def _phase_kinds(peaks: dict[str, int]) -> dict[str, int]:
    """'forward 3' -> 'forward': the highest peak of each kind of phase."""
    kinds: dict[str, int] = {}
    for phase, value in peaks.items():
        kind = phase.split(" ")[0] if phase.split(" ")[-1].isdigit() else phase
        kinds[kind] = max(kinds.get(kind, 0), value)
    return kinds


def simulate(config: TrainConfig, layout: Layout, *, name: str = "config", distributed_optimizer: bool = True,
             usable_bytes: float = float("inf"), device_bytes: float = float("inf"), num_layers: int | None = None,
             standins: bool = True, stages: list[int] | None = None, flash_attention: bool = True) -> Simulation:
    """Every pipeline stage of `layout` (or `stages`), each next to the planner's estimate for it."""
    if config.model.vocab_size is None:
        raise LaunchError("model.vocab_size is null: the simulation builds the embedding; add --set model.vocab_size=N")
    if num_layers is not None and (num_layers < layout.pp or num_layers % layout.pp):
        raise LaunchError(f"--simulate-layers {num_layers}: give a multiple of the pipeline size ({layout.pp})")
    simulated = layout_config(config, layout, distributed_optimizer=distributed_optimizer, num_layers=num_layers)
    work = workload_from_config(simulated, name)
    result = Simulation(name, layout, layout.gpus, usable_bytes, device_bytes, simulated.model.num_layers)
    for stage in stages if stages is not None else range(layout.pp):
        planned = stage_memory(work, layout, stage, distributed_optimizer=distributed_optimizer,
                               flash_attention=flash_attention)
        result.stages.append(simulate_stage(simulated, layout, stage, distributed_optimizer=distributed_optimizer,
                                            standins=standins, planner=planned))
    return result

