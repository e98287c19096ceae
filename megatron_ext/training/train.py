"""The training loop: LongContextGPTModel on megatron-core's DDP, optimizer and pipeline schedules.

Read top to bottom: set up ranks -> data -> model -> optimizer -> resume -> iterate -> save.
The top of the house: nothing else in megatron_ext imports this module (the `train` command does).
"""

import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from megatron_ext.checkpoint.lock import CheckpointDirLocked, lock_checkpoint_dir, release_checkpoint_dir
from megatron_ext.checkpoint.state import TOKENIZER_DIR, CheckpointState
from megatron_ext.config import ConfigError, TrainConfig
from megatron_ext.distributed import setup_distributed
from megatron_ext.errors import UserError
from megatron_ext.models.builder import build_gpt, check_fp8_machine, ddp_config, optimizer_config
from megatron_ext.sizes import flops_per_token, matmul_parameters, padded_vocab_size, peak_tflops
from megatron_ext.training.metrics import ProfileRecorder, RankStepTimes, TimedCalls, TrainLogger, phase
from megatron_ext.training.batches import check_batch_layout, micro_batches, training_samples
from megatron_ext.training.loss_plot import plot_losses
from megatron_ext.training.start import Start, settle_start
from megatron_ext.training.validation import Validation

log = logging.getLogger("megatron_ext")


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # iteration -> mean loss (on every rank)
    last_checkpoint: str | None = None
    iterations_run: int = 0
    stopped_by_signal: bool = False


def train(config: TrainConfig, start: Start | None = None) -> TrainResult:
    """Run (or resume) a training job described by a validated TrainConfig.

    `start` is what `settle_start` decided (the `train` command passes it); without it every setting of
    `config` counts as given, so a contradiction with the checkpoint it starts from is refused.
    """
    if start is None:
        start = settle_start(config, given=config.to_dict())
    device = setup_distributed(config.parallel)
    check_fp8_machine(config, device)  # before any data is read
    hold_checkpoint_dir(config.checkpoint.dir)
    from megatron.core import parallel_state as ps

    check_batch_layout(config, ps.get_data_parallel_world_size())
    tokenizer, data_prefixes = prepare_data(config)
    vocab_size = padded_vocab_size(config.model.vocab_size or tokenizer.vocab_size,
                                   config.parallel.tensor_model_parallel_size)
    torch.manual_seed(config.training.seed)  # the same on every rank: CPU init slices one full weight
    if device.type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(config.training.seed)
    model = build_model(config, vocab_size, device)
    refuse_padded_optimizer_buckets(config, model)
    optimizer, scheduler = build_optimizer(config, model)

    from megatron_ext.checkpoint.store import load_checkpoint

    start_iteration = 0
    resume_from = start.resume.path if start.resume else None
    if resume_from is not None:
        state = load_checkpoint(resume_from, model=model,
                                optimizer=optimizer if config.checkpoint.load_optimizer else None,
                                scheduler=scheduler, verify=config.checkpoint.verify)
        start_iteration = state["iteration"]
        apply_lr_settings(optimizer, scheduler, config)
        log.info(f"megatron_ext: resumed from {resume_from} at iteration {start_iteration}"
                 + (" = training.train_iters: nothing left to train" if start_iteration >= config.training.train_iters
                    else ""))
    elif start.pretrained is not None:
        load_checkpoint(start.pretrained.path, model=model, setting="checkpoint.pretrained",  # weights only
                        verify=config.checkpoint.verify)
        log.info(f"megatron_ext: starting from the weights of {start.pretrained.path}")
    else:
        log.info("megatron_ext: starting from random weights")

    batches = build_batches(config, tokenizer, data_prefixes, start_iteration)
    validation = Validation(config, tokenizer, data_prefixes)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    logger = TrainLogger(
        enabled=rank == world - 1,  # a rank of the last pipeline stage, which holds the loss
        total_iters=config.training.train_iters, start_iter=start_iteration,
        log_interval=config.logging.log_interval, tensorboard_dir=config.logging.tensorboard_dir,
        wandb_project=config.logging.wandb_project, progress_bar=config.logging.progress_bar,
        run_config=config.to_dict(),
    )
    throughput = Throughput(config, vocab_size, world, device)
    stop = StopSignal(config.training.exit_signal_handler)
    result = TrainResult(last_checkpoint=str(resume_from) if resume_from else None)

    nonfinite = NonFiniteGuard(config.training.nonfinite, config.training.nonfinite_patience)
    saves = Checkpointing(config, model, optimizer, scheduler, tokenizer, result, nonfinite)
    param_gather = OverlappedParamGather(model, config.parallel.overlap_param_gather)
    profiler = ProfileRecorder(config.logging.profile_window(), config.logging.profile_dir, rank)
    rank_step_times = RankStepTimes(device)
    gradient_reduction = TimedCalls(model[0].config.finalize_model_grads_func)
    model[0].config.finalize_model_grads_func = gradient_reduction

    def save(iteration):
        param_gather.sync()  # the weights the last step made, on every rank, before they are written
        with phase("checkpoint save"):
            saves.save(iteration)

    for iteration in range(start_iteration + 1, config.training.train_iters + 1):
        with profiler.iteration(iteration):
            started = time.perf_counter()
            batch_size = getattr(batches, "current_global_batch_size", config.training.global_batch_size)
            loss, grad_norm, finite = train_step(model, optimizer, scheduler, batches.next_iteration(), config)
            seconds = time.perf_counter() - started
            param_gather.after_step(finite)
            rank_step_times.add(seconds - gradient_reduction.take())
            result.losses[iteration] = loss
            result.iterations_run += 1
            metrics = dict(loss=loss, lr=scheduler.get_lr(optimizer.param_groups[0]), grad_norm=grad_norm,
                           **throughput.of(seconds, batch_size), checkpoint_s=saves.take_seconds())
            if config.training.rampup_batch_size is not None:
                metrics["global_batch_size"] = batch_size
            if iteration % config.logging.log_interval == 0:  # on every rank: it is a collective
                metrics.update(rank_step_times.gather())
            if validation.due(iteration, last=iteration == config.training.train_iters):
                param_gather.sync()  # the weights the last step made, on every rank
                metrics.update(validation.run(model, partial(forward_losses, model, forward_only=True)))
            logger.log(iteration, metrics)
            if rank == world - 1 and config.logging.metrics_file:
                append_metrics(config.logging.metrics_file, iteration, metrics)
            saves.settle(wait=not finite)  # a save in flight holds finite weights: it completes first
            nonfinite.after_step(iteration, finite, loss, grad_norm, result.last_checkpoint)  # raises when it stops
            last = iteration == config.training.train_iters
            exit_interval = config.training.exit_interval
            if stop.requested() or (exit_interval and result.iterations_run % exit_interval == 0 and not last):
                save(iteration)
                result.stopped_by_signal = stop.received
                log.info(f"megatron_ext: stopping after iteration {iteration} (checkpoint saved); resume with "
                         "--resume auto")
                break
            if iteration % config.checkpoint.save_interval == 0 or last:
                save(iteration)
    profiler.close()
    saves.settle(wait=True)
    logger.close()
    if rank == world - 1 and config.logging.metrics_file:
        plot_losses(config.logging.metrics_file)
    if torch.distributed.get_rank() == 0:
        release_checkpoint_dir(config.checkpoint.dir)
    ps.destroy_model_parallel()
    return result


def apply_lr_settings(optimizer, scheduler, config: TrainConfig) -> None:
    """After a resume, the config's LR range: megatron's scheduler reads each param group's own max_lr/min_lr,
    which the optimizer state brought back from the checkpoint; the lr of the next step follows at once."""
    for group in optimizer.param_groups:
        group["max_lr"], group["min_lr"] = config.optimizer.lr, config.optimizer.min_lr
    scheduler.step(increment=0)


def hold_checkpoint_dir(root) -> None:
    """Rank 0 takes checkpoint.dir's lock for the whole run (a second job is refused); every rank learns the outcome."""
    refusal = [None]
    if torch.distributed.get_rank() == 0:
        try:
            lock_checkpoint_dir(root)
        except CheckpointDirLocked as error:
            refusal = [str(error)]
    if torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise CheckpointDirLocked(refusal[0])


# --- data ----------------------------------------------------------------------------------


def prepare_data(config: TrainConfig):
    """The tokenizer and the indexed-dataset prefixes; builds the tiny corpus on rank 0 if asked."""
    from megatron_ext.data import SentencePieceTokenizer, load_tokenizer
    from megatron_ext.data.tiny import prepare_tiny_dataset

    data = config.data
    if data.tiny_corpus:
        tiny = partial(prepare_tiny_dataset, data.cache_dir, seed=config.training.seed,
                       num_documents=data.tiny_corpus_documents, vocab_size=data.tokenizer_vocab_size,
                       upsample=data.upsample)
        if torch.distributed.get_rank() == 0:
            tiny(build=True)
        torch.distributed.barrier()
        tokenizer_model, prefix = tiny(build=False)
        if data.tiny_corpus_passkey_prompts:  # train on passkey prompts; the corpus trained the tokenizer
            prefix = str(Path(prefix).parent / f"passkey{data.tiny_corpus_passkey_prompts}x{config.model.seq_length}")
            if torch.distributed.get_rank() == 0 and not Path(f"{prefix}.keys.jsonl").is_file():
                from megatron_ext.data.tokenizer_files import SentencePieceFile
                from megatron_ext.data.passkey_data import write_passkey_dataset

                write_passkey_dataset(prefix, SentencePieceFile(tokenizer_model),
                                      length=config.model.seq_length, count=data.tiny_corpus_passkey_prompts,
                                      seed=config.training.seed, key_max=50_000)
            torch.distributed.barrier()
        return SentencePieceTokenizer(tokenizer_model), [prefix]
    setting, path, kind = data.tokenizer_source()
    return load_tokenizer(path, kind, setting=setting), list(data.train_data)


def build_batches(config: TrainConfig, tokenizer, prefixes: list[str], start_iteration: int):
    """Micro-batches for this DP rank, starting at the resumed iteration; PoSE ids when enabled; document ids
    (positions restarting per document) with data.document_mask; data.split's training part; the ramp-up."""
    t = config.training  # train_iters full batches bound what a ramp-up consumes
    dataset = training_samples(config, tokenizer, prefixes, num_samples=t.train_iters * t.global_batch_size)
    return micro_batches(config, dataset, start_iteration=start_iteration)


# --- model and optimizer -------------------------------------------------------------------


def build_model(config: TrainConfig, vocab_size: int, device) -> list:
    """This pipeline stage's LongContextGPTModel (its model chunks with virtual pipeline stages), each in
    Float16Module for bf16 and megatron's DDP."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    from megatron_ext.models.init import layout_independent_init

    vpp = config.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        chunk = build_gpt(config, vocab_size, device, vp_stage=vp_stage)
        layout_independent_init(chunk, config.training.seed)
        if chunk.config.bf16:
            chunk = Float16Module(chunk.config, chunk)
        # as megatron-LM: only the first chunk's gradients are bucketed (the others reduce at the end)
        chunks.append(DistributedDataParallel(chunk.config, ddp_config(config), chunk,
                                              disable_bucketing=bool(vp_stage)))
    tc, model = chunks[0].config, chunks[0]  # the schedule reads the first chunk's config
    tc.finalize_model_grads_func = finalize_model_grads
    tc.no_sync_func = [chunk.no_sync for chunk in chunks] if vpp else model.no_sync
    if config.parallel.overlap_grad_reduce:
        # as megatron-LM (align_grad_reduce): the pipeline schedule starts every stage's last reduction at the
        # end of its backward. No param_sync_func: only the interleaved schedule calls it (megatron-LM turns
        # align_param_gather off without virtual stages); the DDP forward pre-hooks gather the weights.
        tc.grad_sync_func = [chunk.start_grad_sync for chunk in chunks] if vpp else model.start_grad_sync
    return chunks


def refuse_padded_optimizer_buckets(config: TrainConfig, model: list) -> None:
    """megatron-core 0.16.1 writes the distributed optimizer's state misaligned into a checkpoint when a gradient
    bucket other than the last ends in padding (sharded_param_state_fully_reshardable indexes the padding-free
    gathered state with padded offsets; fixed upstream in Megatron-LM #5077): the resumed run silently differs.
    Buckets are padded to a multiple of lcm(DP x CP, 128) elements, so this happens only with
    overlap_grad_reduce's several buckets and a parameter that does not end on such a boundary (Llama-sized
    layers at power-of-two DP x CP never do; tiny test models do)."""
    if not config.parallel.use_distributed_optimizer:
        return
    for chunk in model:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            padded = [b for b in buffer.buckets[:-1] if b.grad_data.numel() != b.numel_unpadded]
            if padded:
                raise ConfigError(
                    f"parallel.ddp_bucket_size ({config.parallel.ddp_bucket_size or 'megatron default'}) splits the "
                    f"gradients into {len(buffer.buckets)} buckets, {len(padded)} of them padded, which megatron-core "
                    "0.16.1 saves misaligned in the distributed optimizer's checkpoint (Megatron-LM #5077): raise "
                    "parallel.ddp_bucket_size or leave it unset, or set parallel.overlap_grad_reduce=false")


def build_optimizer(config: TrainConfig, model: list):
    """megatron's Adam (distributed when asked) and its warmup + decay LR schedule."""
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, t = config.optimizer, config.training
    optimizer = get_megatron_optimizer(optimizer_config(config, model[0].config), model)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_iters,
        lr_decay_steps=o.lr_decay_iters or t.train_iters, lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=t.train_iters, wd_incr_style="constant",
        wsd_decay_steps=o.lr_wsd_decay_iters, lr_wsd_decay_style=o.lr_wsd_decay_style,
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,  # the config's schedule wins
        # on resume (changes are logged by training/start.py); the checkpoint gives the step count
    )
    return optimizer, scheduler


# --- one step ------------------------------------------------------------------------------


def loss_func(loss_mask, per_token_loss):
    """Per-token sum + token count: megatron divides by the global count (calculate_per_token_loss)."""
    mask = loss_mask.reshape(-1).float()
    # where, not only a product: a masked position contributes 0 to the loss and its gradient even when its own
    # loss is not finite (0 * inf is NaN); a micro-batch with no loss token adds 0 to the sum and to the count
    counted = torch.where(mask > 0, per_token_loss.float().reshape(-1), 0.0)
    loss_sum = (counted * mask).sum()
    tokens = mask.sum().to(torch.int)
    return loss_sum, tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   document_ids=batch.get("document_ids"), packed_seq_params=batch.get("packed_seq_params"))
    return output, partial(loss_func, batch["loss_mask"])


def batch_on_this_rank(batch: dict, model: list, device):
    """(this rank's part of a micro-batch on `device`, its global sequence length, its batch size), the
    last two for the pipeline schedule's tensor shapes.

    Context parallelism zig-zags every tensor (document ids too) for the SDPA attention; a document-masked
    batch for Transformer Engine's attention becomes megatron's packed (THD) form instead: one row of
    micro_batch_size * seq_length tokens plus `packed_seq_params`.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.utils import unwrap_model

    from megatron_ext.context_parallel import packed_sequences_on_this_cp_rank, slice_for_context_parallel

    cp_size = ps.get_context_parallel_world_size()
    gpt = unwrap_model(model[0])
    if "document_ids" not in batch or gpt.takes_document_ids:
        batch = {name: value.to(device) for name, value in slice_for_context_parallel(batch).items()}
        return batch, batch["tokens"].shape[1] * cp_size, batch["tokens"].shape[0]
    if cp_size > 1 and ps.get_pipeline_model_parallel_world_size() > 1:
        from megatron_ext.config import ConfigError

        raise ConfigError(
            "data.document_mask with Transformer Engine, context and pipeline parallelism at once: the padded "
            "packed sequences change length every batch, which the pipeline cannot take: set "
            "parallel.pipeline_model_parallel_size=1 or parallel.context_parallel_size=1"
        )
    tp_size = ps.get_tensor_model_parallel_world_size()
    batch, packed_seq_params = packed_sequences_on_this_cp_rank(
        {name: value.to(device) for name, value in batch.items()}, cp_size=cp_size,
        cp_rank=ps.get_context_parallel_rank(), pad_multiple=tp_size if gpt.config.sequence_parallel else 1)
    return dict(batch, packed_seq_params=packed_seq_params), batch["tokens"].shape[1] * cp_size, 1


def train_step(model, optimizer, scheduler, micro_batches, config: TrainConfig):
    """Forward/backward over the iteration's micro-batches, then one optimizer step if the loss and grad norm
    are finite. Returns (loss, grad norm, whether the step was taken)."""
    device = next(model[0].parameters()).device
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss_sum, tokens = forward_losses(model, micro_batches, forward_only=False)
    # a global batch without a loss token has gradients of zero (megatron scales them by 1 / tokens only when
    # tokens > 0) and a loss of 0, not 0 / 0
    loss = loss_sum / tokens if tokens else 0.0
    with phase("optimizer step"):
        grad_norm, finite = step_if_finite(optimizer, loss, device)
    if finite:
        scheduler.step(increment=1)
    return loss, grad_norm, finite


def forward_losses(model, micro_batches, *, forward_only: bool) -> tuple[float, float]:
    """megatron's schedule over the micro-batches (forward and backward, or forward only for validation) on
    every pipeline stage and model chunk; returns (loss sum, token count) over all DP x CP ranks, on every rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(model[0].parameters()).device
    on_this_rank = [batch_on_this_rank(batch, model, device) for batch in micro_batches]
    micro_batches = [batch for batch, _, _ in on_this_rank]
    _, seq_length, micro_batch_size = on_this_rank[0]
    # the interleaved schedule reads each model chunk's micro-batches from an iterator of its own
    data = [iter(micro_batches) for _ in model] if len(model) > 1 else iter(micro_batches)
    with phase("forward-backward" if not forward_only else "validation forward"):
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=model, num_microbatches=len(micro_batches),
            seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=forward_only,
        )
    total = torch.zeros(2, device=device)
    if ps.is_pipeline_last_stage():
        total = torch.stack([l["lm loss"] for l in losses]).sum(0).to(device)
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    # every rank learns the loss (the last stage's), so results and logs agree everywhere
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX, group=ps.get_pipeline_model_parallel_group())
    return total[0].item(), total[1].item()


def step_if_finite(optimizer, loss: float, device) -> tuple[float, bool]:
    """megatron's optimizer.step() (prepare grads, norm, clip, update), except that no rank updates unless the
    loss and the grad norm are finite on every rank: megatron skips a non-finite step only for fp16's loss
    scaler, and clipping by a NaN norm leaves NaN gradients in place. Returns (grad norm, stepped)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    found_inf = optimizer.prepare_grads()  # fp16's loss scaler; False otherwise
    grad_norm = float(optimizer.get_grad_norm())
    flag = torch.tensor([0.0 if found_inf or not math.isfinite(loss) or not math.isfinite(grad_norm) else 1.0],
                        device=device)
    # a rank whose PP stage saw a NaN that MAX hid (gloo's MAX of NaN and 0 may be 0) still votes no
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    if flag.item() < 1:
        return grad_norm, False
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):  # as ChainedOptimizer.step clips
        parameters = part.get_parameters()
        if getattr(part, "is_stub_optimizer", False) or not parameters or part.config.clip_grad <= 0:
            continue
        clip_grad_by_total_norm_fp32(
            parameters, max_norm=part.config.clip_grad, total_norm=grad_norm,
            use_decoupled_grad=part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    optimizer.step_with_ready_grads()
    return grad_norm, True


# --- bookkeeping ---------------------------------------------------------------------------


def checkpoint_state(config: TrainConfig, model, tokenizer, iteration) -> CheckpointState:
    """What a checkpoint records besides tensors: config, HARPE bases, tokenizer, data position, layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import unwrap_model

    return CheckpointState.of_run(
        config, iteration=iteration, padded_vocab_size=unwrap_model(model[0]).vocab_size,
        tokenizer_model=TOKENIZER_DIR, tokenizer_vocab_size=tokenizer.vocab_size,  # the copy Checkpointing saves
        tokenizer_fingerprint=tokenizer.encoder.fingerprint(),
        parallel=dict(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                      cp=ps.get_context_parallel_world_size(), dp=ps.get_data_parallel_world_size()))


def append_metrics(path, iteration, metrics):
    """One JSON line: the iteration, its wall-clock time (Unix seconds; time between rows includes checkpoint
    saves and evaluation, which step_s does not) and the metrics."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(dict(iteration=iteration, time=round(time.time(), 3), **metrics)) + "\n")


class Throughput:
    """tokens/s, model TFLOP/s per device and MFU (formula in megatron_ext.sizes)."""

    def __init__(self, config: TrainConfig, vocab_size: int, world_size: int, device):
        m = config.model
        groups = m.num_query_groups or m.num_attention_heads
        n = matmul_parameters(m.num_layers, m.hidden_size, m.ffn_size, m.num_attention_heads, groups, vocab_size, m.swiglu)
        self.flops_per_token = flops_per_token(n, m.num_layers, m.hidden_size, m.seq_length)
        self.seq_length = m.seq_length
        self.world_size = world_size
        name = torch.cuda.get_device_name() if device.type == "cuda" else None
        self.peak = config.logging.gpu_peak_tflops or peak_tflops(name)

    def of(self, seconds: float, global_batch_size: int) -> dict:
        tokens_per_second = global_batch_size * self.seq_length / seconds
        tflops = tokens_per_second * self.flops_per_token / self.world_size / 1e12
        return dict(tokens_per_s=tokens_per_second, tflops_per_device=tflops,
                    mfu=(tflops / self.peak) if self.peak else None, step_s=seconds)


class Checkpointing:
    """The run's saves: synchronous, or in the background with checkpoint.async_save (one in flight; `settle`
    finishes it once written, or waits for it). `take_seconds` is the time the loop spent on them since the
    last call (metrics' checkpoint_s: a save shows in the row after its iteration's)."""

    def __init__(self, config: TrainConfig, model, optimizer, scheduler, tokenizer, result: TrainResult,
                 nonfinite: "NonFiniteGuard"):
        from megatron_ext.checkpoint.writer import BackgroundSaves
        from megatron_ext.data.tokenizer_record import checkpoint_tokenizer_files

        self.config, self.model, self.optimizer, self.scheduler = config, model, optimizer, scheduler
        self.tokenizer, self.result, self.nonfinite = tokenizer, result, nonfinite
        # every checkpoint carries the tokenizer's files as this run read them (a moved checkpoint keeps its own)
        self.tokenizer_files = {f"{TOKENIZER_DIR}/{name}": contents
                                for name, contents in checkpoint_tokenizer_files(tokenizer.encoder).items()}
        self.background = BackgroundSaves() if config.checkpoint.async_save else None
        self.seconds = 0.0

    def save(self, iteration: int) -> None:
        from megatron_ext.checkpoint.store import save_checkpoint

        started = time.perf_counter()
        self.nonfinite.check_weights(self.model, iteration)
        state = checkpoint_state(self.config, self.model, self.tokenizer, iteration)
        path = save_checkpoint(self.config.checkpoint.dir, iteration, model=self.model, optimizer=self.optimizer,
                               scheduler=self.scheduler, state=state.to_json(),
                               keep_last=self.config.checkpoint.keep_last, background=self.background,
                               extra_files=self.tokenizer_files)
        if self.background is None:
            self.result.last_checkpoint = str(path)
        self.seconds += time.perf_counter() - started

    def settle(self, wait: bool) -> None:
        """Finish a background save that is written everywhere (with `wait`: the one in flight)."""
        if self.background is None:
            return
        started = time.perf_counter()
        self.background.wait() if wait else self.background.poll()
        if self.background.last is not None:
            self.result.last_checkpoint = str(self.background.last)
        self.seconds += time.perf_counter() - started

    def take_seconds(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class OverlappedParamGather:
    """parallel.overlap_param_gather, as megatron-LM's training loop runs it: the distributed optimizer's step
    leaves the all-gather of the updated weights to DDP's forward pre-hooks (bucket by bucket, during the next
    forward). The hooks stay off until a step has succeeded, so an error in loaded or initial weights is not
    spread by the first gather; before a checkpoint is written the gather runs at once, so the saved weights
    are the updated ones on every rank (a rank only updates its own shard)."""

    def __init__(self, model: list, enabled: bool):
        self.model, self.enabled, self.hooked = model, enabled, False
        if enabled:
            for chunk in model:
                chunk.disable_forward_pre_hook(param_sync=False)

    def after_step(self, stepped: bool) -> None:
        if self.enabled and stepped and not self.hooked:
            for chunk in self.model:
                chunk.enable_forward_pre_hook()
            self.hooked = True

    def sync(self) -> None:
        if self.enabled:
            for chunk in self.model:
                chunk.start_param_sync(force_sync=True)


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit) / SIGINT / SIGHUP (a closed terminal or SSH
    session): finish the step, save, exit 0.

    The handler only raises a flag, so the same signal sent to the whole process group (srun, Ctrl-C,
    torchrun forwarding it) or to a single rank ends the run alike: `requested` all-reduces the flag and
    every rank saves once at the same iteration. The checkpoint writer runs in this process (a thread for a
    background save, checkpoint/writer.py), so no helper process of the save can die from the signal.

    A rank whose launcher (torchrun, srun's task wrapper) dies raises the same flag: a daemon thread watches
    the parent process, and a re-parented rank (orphaned by a kill -9) saves and stops instead of training on
    unattended, holding checkpoint.dir's lock. A rank that cannot reach the others ends at
    parallel.distributed_timeout_minutes (the all-reduce in `requested` times out like any collective).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
    PARENT_CHECK_SECONDS = 1.0

    def __init__(self, enabled: bool):
        self.received = False
        if enabled:
            for sig in self.SIGNALS:
                signal.signal(sig, self._handler)
        if "RANK" in os.environ and os.getppid() != 1:  # started by a launcher that may die before us
            threading.Thread(target=self._watch_parent, args=(os.getppid(),), name="megatron_ext-parent-watch",
                             daemon=True).start()

    @classmethod
    def ignore_from_now_on(cls) -> None:
        """Once the run is over (saved, or failed): further stop signals have nothing left to stop. Ignored, not
        left to Python's handler, because the interpreter puts the default action (death) back while it tears
        down (torch's and gloo's destructors can take a while), so a second SIGTERM then would end a rank that
        saved and finished with "killed by SIGTERM" (the chaos test caught it)."""
        for sig in cls.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _watch_parent(self, parent: int) -> None:
        while os.getppid() == parent:
            time.sleep(self.PARENT_CHECK_SECONDS)
        log.warning(f"megatron_ext: the launcher (process {parent}) is gone: saving after this iteration, then "
                    "stopping")
        self.received = True

    def _handler(self, signum, frame):
        if not self.received:
            log.warning(f"megatron_ext: got {signal.Signals(signum).name}: saving after this iteration, then stopping")
        self.received = True

    def requested(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0])
        if torch.cuda.is_available():
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


class NonFiniteTraining(UserError):
    """The loss, the gradients or the weights stopped being finite; nothing of that state was saved."""


class NonFiniteGuard:
    """training.nonfinite: `stop` at the first non-finite iteration, or `skip` up to `patience` in a row.

    A non-finite iteration never updates the weights (`step_if_finite`), and a checkpoint is written only
    from finite weights, so keep_last never removes the last good checkpoint for a bad one.
    """

    def __init__(self, policy: str, patience: int):
        self.policy, self.patience = policy, patience
        self.in_a_row = 0

    def after_step(self, iteration: int, finite: bool, loss: float, grad_norm: float, last_checkpoint) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.policy == "skip" and self.in_a_row <= self.patience:
            log.warning(f"megatron_ext: iteration {iteration}: loss {loss}, grad norm {grad_norm} not finite: "
                        f"update skipped ({self.in_a_row} of training.nonfinite_patience={self.patience} in a row)")
            return
        in_a_row = f" ({self.in_a_row} in a row)" if self.policy == "skip" else ""
        raise NonFiniteTraining(
            f"iteration {iteration}: loss {loss}, grad norm {grad_norm} not finite{in_a_row}; no update and no "
            f"checkpoint made of it, the last checkpoint is {last_checkpoint or 'none'}: lower optimizer.lr (or raise "
            "optimizer.warmup_iters), or set training.nonfinite=skip with training.nonfinite_patience=N to skip such steps")

    @staticmethod
    def check_weights(model: list, iteration: int) -> None:
        """Collective: refuse to save weights that are not finite on some rank (an update from a finite but huge
        step can overflow them)."""
        finite = all(bool(torch.isfinite(p).all()) for chunk in model for p in chunk.parameters())
        flag = torch.tensor([1.0 if finite else 0.0], device=next(model[0].parameters()).device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if flag.item() < 1:
            raise NonFiniteTraining(f"iteration {iteration}: the weights are not finite, so no checkpoint was saved: "
                                    "lower optimizer.lr (or raise optimizer.warmup_iters)")
