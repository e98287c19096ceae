"""Gloo worker for the model-level parallel tests: run with torchrun --nproc-per-node 2.

Each case builds a TP=PP=CP=1 reference LongContextGPTModel, copies its weights into a
TP=2, PP=2 or CP=2 model (slicing or renumbering as megatron lays them out), runs one
forward/backward with megatron-core's schedule on the same micro-batches, and records the
loss and the largest gradient difference in a JSON file that test_parallel.py asserts on.

Document masking: at TP=1, TP=2, PP=2 and CP=2 a micro-batch of packed documents (per-document
PoSE ids, HARPE) goes through the training path (batch_on_this_rank + forward_step) and its
per-token losses are compared with those of every document run alone, plus a control that
keeps the restarted ids but drops the document ids (attention crosses documents).
"""

import json
import os
import sys
import torch
import torch.nn.functional as F

from megatron_ext.compat import prepare_megatron
from megatron_ext.context_parallel import slice_for_context_parallel, zigzag_token_indices
from megatron_ext.models import LongContextGPTModel, LongContextTransformerConfig, local_layer_spec
from megatron_ext.models.init import global_param_name, tp_shard
from megatron_ext.rope import RopeConfig, pose_position_ids
from megatron_ext.rope.pose import pose_document_position_ids
from megatron_ext.training.train import batch_on_this_rank, forward_step

VOCAB, SEQ, MICRO_BATCH, MICRO_BATCHES = 128, 32, 2, 4
HARPE = RopeConfig(head_base_strategy="uniform", head_base_params={"b_min": 1e4, "b_max": 1e6, "order": "ascending"})
STOCK = RopeConfig(base=10000.0)


def make_config(rope, tp=1, pp=1, cp=1):
    return LongContextTransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=128,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, calculate_per_token_loss=True, rope=rope,
    )


def build(config):
    from megatron.core import parallel_state as ps
    return LongContextGPTModel(
        config, local_layer_spec(), VOCAB, SEQ,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
    )


def make_batches(pose: bool):
    """MICRO_BATCHES micro-batches; PoSE ids differ per sample (keyed by the global sample index)."""
    g = torch.Generator().manual_seed(1234)
    batches = []
    for m in range(MICRO_BATCHES):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=g)
        if pose:
            ids = torch.stack([
                pose_position_ids(SEQ, 16 * SEQ, seed=7, sample_index=m * MICRO_BATCH + i)
                for i in range(MICRO_BATCH)
            ])
        else:
            ids = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)
        batches.append(dict(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                            position_ids=ids.contiguous(), loss_mask=torch.ones(MICRO_BATCH, SEQ)))
    return batches


def run_step(model, batches):
    """One forward/backward over all micro-batches; returns (mean loss or None off the last stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = [slice_for_context_parallel(b) for b in batches]  # the training loop's slicing
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=len(batches), seq_length=batches[0]["tokens"].shape[1],
        micro_batch_size=MICRO_BATCH, forward_only=False,
    )
    cp_group = ps.get_context_parallel_group()
    for p in model.parameters():  # what DDP does over the data+context parallel group
        torch.distributed.all_reduce(p.grad, group=cp_group)
    if not ps.is_pipeline_last_stage():
        return None
    total = torch.stack([l["lm loss"] for l in losses]).sum(0)
    torch.distributed.all_reduce(total, group=cp_group)
    return (total[0] / total[1]).item()


def init_layout(tp=1, pp=1, cp=1):
    from megatron.core import parallel_state as ps
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 context_parallel_size=cp)


def reference(rope, batches):
    init_layout()
    torch.manual_seed(0)
    model = build(make_config(rope))
    loss = run_step(model, batches)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss, weights, grads


def compare(case, rope, batches, tp=1, pp=1, cp=1, stage_batches=None):
    """Parallel run vs the reference; stage_batches lets a case feed later PP stages other ids."""
    from megatron.core import parallel_state as ps
    ref_loss, ref_weights, ref_grads = reference(rope, batches)
    init_layout(tp, pp, cp)
    torch.manual_seed(1)  # a different init: the copy below must carry the weights over
    model = build(make_config(rope, tp, pp, cp))
    tp_rank = ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tp_shard(ref_weights[global_param_name(name, model)], p, tp_rank, tp))
    my_batches = batches
    if stage_batches is not None and not ps.is_pipeline_first_stage():
        my_batches = stage_batches
    loss = run_step(model, my_batches)
    grad_diff = max(
        (p.grad - tp_shard(ref_grads[global_param_name(n, model)], p, tp_rank, tp)).abs().max().item()
        for n, p in model.named_parameters()
    )
    grad_scale = max(g.abs().max().item() for g in ref_grads.values())
    diff = torch.tensor([grad_diff])
    torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
    losses = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(losses, loss)
    loss = next(l for l in losses if l is not None)
    return dict(case=case, loss=loss, ref_loss=ref_loss, max_grad_diff=diff.item(), grad_scale=grad_scale)


# two packed rows of three documents each; every length divides by 2 * CP = 4 (so a document also runs
# alone under CP=2), and the document boundaries fall inside the CP=2 zig-zag chunks (multiples of 8)
DOCUMENT_LENGTHS = ((12, 8, 12), (4, 20, 8))
POSE_TARGET = 16 * SEQ


def packed_documents():
    """(packed micro-batch [2, SEQ] with document_ids and per-document PoSE ids, [(row, start, alone batch)])."""
    g = torch.Generator().manual_seed(99)
    tokens = torch.randint(0, VOCAB, (len(DOCUMENT_LENGTHS), SEQ + 1), generator=g)
    document_ids = torch.stack([torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
                                for lengths in DOCUMENT_LENGTHS])
    position_ids = torch.stack([pose_document_position_ids(row, POSE_TARGET, seed=7, sample_index=i)
                                for i, row in enumerate(document_ids)])
    packed = dict(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(), position_ids=position_ids,
                  loss_mask=torch.ones(len(DOCUMENT_LENGTHS), SEQ), document_ids=document_ids)
    alone = []
    for row, lengths in enumerate(DOCUMENT_LENGTHS):
        start = 0
        for length in lengths:
            piece = slice(start, start + length)
            alone.append((row, start, {name: packed[name][row:row + 1, piece].contiguous()
                                       for name in ("tokens", "labels", "position_ids", "loss_mask")}))
            start += length
    return packed, alone


def per_token_forward_step(data_iterator, model):
    """train.forward_step, with a loss function that hands back the per-token losses."""
    output, _ = forward_step(data_iterator, model)
    return output, lambda per_token: (per_token.sum(), torch.tensor(per_token.numel()),
                                      {"per_token": per_token.detach()})


def per_token_losses(model, batch):
    """[b, s] losses of one micro-batch in global token order, on every rank (forward only)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    local, seq_length, micro_batch_size = batch_on_this_rank(batch, [model], torch.device("cpu"))
    outputs = get_forward_backward_func()(
        forward_step_func=per_token_forward_step, data_iterator=iter([local]), model=[model],
        num_microbatches=1, seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True,
    )
    losses = None
    if ps.is_pipeline_last_stage():
        losses = outputs[0]["per_token"]
        cp_size = ps.get_context_parallel_world_size()
        if cp_size > 1:  # undo the zig-zag: gather every rank's two chunks and put them in place
            parts = [torch.empty_like(losses) for _ in range(cp_size)]
            torch.distributed.all_gather(parts, losses.contiguous(), group=ps.get_context_parallel_group())
            ordered = torch.empty(losses.size(0), losses.size(1) * cp_size)
            for rank, part in enumerate(parts):
                ordered[:, zigzag_token_indices(losses.size(1), cp_size, rank)] = part
            losses = ordered
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, losses)
    return next(l for l in gathered if l is not None)


def document_mask_case(case, tp=1, pp=1, cp=1):
    """Packed documents vs each alone, and the control without document ids, at one layout."""
    init_layout(tp, pp, cp)
    torch.manual_seed(0)
    model = build(make_config(HARPE, tp, pp, cp)).eval()
    packed, alone = packed_documents()
    with torch.no_grad():
        packed_losses = per_token_losses(model, packed)
        control = {name: value for name, value in packed.items() if name != "document_ids"}
        control_losses = per_token_losses(model, control)
        alone_losses = torch.empty_like(packed_losses)
        for row, start, batch in alone:
            alone_losses[row, start:start + batch["tokens"].size(1)] = per_token_losses(model, batch)[0]
    return dict(case=case, max_diff=(packed_losses - alone_losses).abs().max().item(),
                control_max_diff=(control_losses - alone_losses).abs().max().item(),
                loss_scale=alone_losses.abs().max().item())


def main(out_path):
    prepare_megatron()
    torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    results = [
        compare("tp2_harpe_gqa", HARPE, make_batches(pose=False), tp=2),
        compare("pp2_pose", STOCK, make_batches(pose=True), pp=2),
        # negative control: the second stage sees plain ids instead of the PoSE ids
        compare("pp2_pose_stage2_wrong_ids", STOCK, make_batches(pose=True), pp=2,
                stage_batches=make_batches(pose=False)),
        compare("cp2_pose_harpe", HARPE, make_batches(pose=True), cp=2),
        document_mask_case("documents_tp1"),
        document_mask_case("documents_tp2", tp=2),
        document_mask_case("documents_pp2", pp=2),
        document_mask_case("documents_cp2", cp=2),
    ]
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
