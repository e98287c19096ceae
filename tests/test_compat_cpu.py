"""megatron_ext.compat on a CPU: each patch, exercised through the megatron-core code it fixes.

The CPU patches, the torch.optim fixes (the distributed optimizer's checkpoints) and the stock-RoPE
opt-in. Single process, gloo, world size 1. Multi-process PP/CP/DP checks live elsewhere; which
group a machine gets is in test_compat_prepare.py.
"""
import logging

import pytest
import torch

from megatron_ext.compat import cpu as cpu_compat
from megatron_ext.compat import (
    CPU_PATCHES,
    TORCH_OPTIM_FIXES,
    cpu_mode_enabled,
    describe_cpu_patches,
    describe_torch_optim_fixes,
    enable_cpu_mode,
    enable_stock_rope_on_cpu,
    enable_torch_optim_fixes,
    prepare_megatron,
)
from megatron_ext.compat.stock_rope import STOCK_ROPE_PATCHES, describe_stock_rope_patches
from megatron_ext.models.core_attention import SDPACoreAttention

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU compatibility mode only")

VOCAB, SEQ, HIDDEN, HEADS, MICRO_BATCH = 64, 16, 32, 4, 2


@pytest.fixture(scope="module", autouse=True)
def parallel_state(single_rank):
    prepare_megatron()  # the CPU patches and, megatron finding no Apex/TE here, the torch.optim fixes
    enable_stock_rope_on_cpu()  # the RoPE tests below build megatron's own RotaryEmbedding
    return single_rank


# --- a tiny GPT on the local (non-TE) spec ------------------------------------------------

def make_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig
    settings = dict(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS,
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def build_gpt(config, seed=0, **overrides):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    torch.manual_seed(seed)
    settings = dict(position_embedding_type="rope", share_embeddings_and_output_weights=False)
    settings.update(overrides)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                    max_sequence_length=SEQ, **settings)


def make_batch(seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=generator)
    return dict(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                position_ids=torch.arange(SEQ).expand(MICRO_BATCH, SEQ).contiguous())


def mean_loss(model, batch):
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return per_token.float().mean()  # per_token: [b, s]


def build_ddp_and_optimizer(config, seed, *, distributed, clip_grad=1.0, lr=1e-2):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    model = build_gpt(config, seed)
    if config.bf16:
        from megatron.core.transformer.module import Float16Module
        model = Float16Module(config, model)
    ddp_model = DistributedDataParallel(
        config=config, module=model,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.0, clip_grad=clip_grad,
                        use_distributed_optimizer=distributed, bf16=config.bf16,
                        params_dtype=config.params_dtype),
        [ddp_model])
    return ddp_model, optimizer


def megatron_train_step(ddp_model, optimizer, batch):
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    loss = mean_loss(ddp_model, batch)
    loss.backward()
    ddp_model.finish_grad_sync()
    _, grad_norm, _ = optimizer.step()
    return loss.item(), grad_norm


def unwrap(ddp_model):
    module = ddp_model.module
    return getattr(module, "module", module)  # through Float16Module


def megatron_optimizers(optimizer):
    """The megatron optimizers behind a (possibly chained) get_megatron_optimizer result."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


# --- the registry and the switch -------------------------------------------------------------

GROUPS = [CPU_PATCHES, TORCH_OPTIM_FIXES, STOCK_ROPE_PATCHES]


def test_enable_cpu_mode_is_idempotent_and_returns_registry_names():
    names = [patch.name for patch in CPU_PATCHES]
    assert len(set(names)) == len(names)
    assert enable_cpu_mode() == names
    assert enable_cpu_mode() == names
    assert cpu_mode_enabled()


def test_torch_optim_fixes_and_stock_rope_are_idempotent_and_return_registry_names():
    for group, enable in [(TORCH_OPTIM_FIXES, enable_torch_optim_fixes),
                          (STOCK_ROPE_PATCHES, enable_stock_rope_on_cpu)]:
        names = [patch.name for patch in group]
        assert len(set(names)) == len(names)
        assert enable() == names
        assert enable() == names
        assert group.is_applied()


def test_patch_names_are_unique_across_groups():
    names = [patch.name for group in GROUPS for patch in group]
    assert len(set(names)) == len(names)


def test_each_distopt_patch_sits_with_its_cause():
    assert {patch.name for patch in TORCH_OPTIM_FIXES} == {
        "distopt_state_dict_before_first_step", "distopt_keep_loaded_step",
        "distopt_dp_reshardable_load_no_grad", "distopt_unshare_step_tensor"}
    assert "distopt_dp_zero_gather_on_cpu" in CPU_PATCHES.names()  # a .cuda() call


@pytest.mark.parametrize("group", GROUPS, ids=["cpu", "torch_optim", "stock_rope"])
def test_every_patch_has_a_one_line_why_naming_a_megatron_file(group):
    for patch in group:
        assert ".py" in patch.why and "\n" not in patch.why, patch.name


@pytest.mark.parametrize("group, describe", [
    (CPU_PATCHES, describe_cpu_patches), (TORCH_OPTIM_FIXES, describe_torch_optim_fixes),
    (STOCK_ROPE_PATCHES, describe_stock_rope_patches)], ids=["cpu", "torch_optim", "stock_rope"])
def test_describe_lists_every_name_with_its_why(group, describe):
    header, _rule, *rows = describe().splitlines()
    assert [cell.strip() for cell in header.split("|")] == ["name", "why"]
    table = dict(tuple(cell.strip() for cell in row.split(" | ", 1)) for row in rows)
    assert table == {patch.name: patch.why for patch in group}


def test_logs_which_path_runs(monkeypatch, caplog):
    monkeypatch.setattr(cpu_compat, "_path_logged", False)
    with caplog.at_level(logging.INFO, logger="megatron_ext"):
        enable_cpu_mode()
    assert (f"CUDA absent -> CPU compatibility mode ({len(CPU_PATCHES)} megatron-core patches"
            in caplog.text)


def test_with_cuda_available_megatron_runs_unpatched(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_compat, "_path_logged", True)
    assert enable_cpu_mode() == []
    assert enable_stock_rope_on_cpu() == []


def test_real_torch_is_untouched_outside_the_listed_modules():
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer import transformer_block
    assert schedules.torch is not torch and schedules.torch.cuda.current_device() == "cpu"
    assert transformer_block.torch is torch
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
    assert "type" not in torch.Tensor.__dict__ and "cuda" not in torch.Tensor.__dict__


# --- RoPE ------------------------------------------------------------------------------------

def hand_rope_angles(seq_len, dim, base=10000.0):
    """outer(positions, base^(-2j/dim)), repeated for both halves: [s, dim]."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return torch.cat([angles, angles], dim=-1)


def test_stock_rotary_embedding_matches_hand_formula():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True)
    emb = rope(32)  # [s, 1, 1, d]
    assert emb.shape == (32, 1, 1, 16) and emb.device.type == "cpu"
    torch.testing.assert_close(emb[:, 0, 0].double(), hand_rope_angles(32, 16),
                               rtol=1e-6, atol=1e-5)


def test_stock_yarn_with_factor_one_equals_plain_rope():
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding)
    yarn = YarnRotaryEmbedding(kv_channels=16, rotary_percent=1.0, scaling_factor=1.0,
                               use_cpu_initialization=True)
    emb, mscale = yarn(32)
    assert mscale == pytest.approx(1.0)
    torch.testing.assert_close(emb[:, 0, 0].double(), hand_rope_angles(32, 16),
                               rtol=1e-6, atol=1e-5)


class _TwoRankGroup:
    """What get_pos_emb_on_this_cp_rank reads from a CP group."""

    def __init__(self, rank):
        self._rank = rank

    def size(self):
        return 2

    def rank(self):
        return self._rank


@pytest.mark.parametrize("cp_rank, zigzag_positions", [(0, [0, 1, 6, 7]), (1, [2, 3, 4, 5])])
def test_rope_cp_slice_keeps_this_ranks_zigzag_chunks(cp_rank, zigzag_positions):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)
    full = rope(8)
    local = rope(8, cp_group=_TwoRankGroup(cp_rank))  # CP=2: chunks r and 2*cp-1-r
    assert torch.equal(local, full[zigzag_positions])


# --- gradient norm and clipping --------------------------------------------------------------

def _grads_on_params(seed):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(5, 7), (7,), (3, 2, 4)]]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)
    return params


def test_megatron_grad_norm_equals_torch_norm():
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    params = _grads_on_params(0)
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
    assert get_grad_norm_fp32([p.grad for p in params]) == pytest.approx(expected.item(),
                                                                         rel=1e-6)


def test_megatron_clip_by_total_norm_equals_torch_clip():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32
    params, reference = _grads_on_params(1), _grads_on_params(1)
    max_norm = 0.5
    total_norm = get_grad_norm_fp32([p.grad for p in params])
    clip_grad_by_total_norm_fp32(params, max_norm, total_norm)
    torch.nn.utils.clip_grad_norm_(reference, max_norm)
    for param, ref in zip(params, reference):
        torch.testing.assert_close(param.grad, ref.grad, rtol=1e-6, atol=1e-7)
    assert "type" not in torch.Tensor.__dict__  # the CUDA type names were scoped to the call


# --- pipeline schedules and p2p --------------------------------------------------------------

def test_no_pipelining_schedule_matches_direct_forward_backward():
    from megatron.core.pipeline_parallel import get_forward_backward_func
    model, reference = build_gpt(make_config()), build_gpt(make_config())
    batches = [make_batch(seed) for seed in (10, 11)]

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(output_tensor):
            loss_sum, num_tokens = output_tensor.float().sum(), output_tensor.numel()
            return loss_sum, torch.tensor(num_tokens), {"lm loss": torch.stack(
                [loss_sum.detach(), torch.tensor(float(num_tokens))])}
        return per_token, loss_func

    forward_backward = get_forward_backward_func()
    assert forward_backward.__name__ == "forward_backward_no_pipelining"
    reported = forward_backward(forward_step_func=forward_step, data_iterator=iter(batches),
                                model=[model], num_microbatches=len(batches), seq_length=SEQ,
                                micro_batch_size=MICRO_BATCH, forward_only=False)
    loss_sum, num_tokens = torch.stack([r["lm loss"] for r in reported]).sum(0)

    direct = sum(mean_loss(reference, batch) for batch in batches) / len(batches)
    direct.backward()
    assert (loss_sum / num_tokens).item() == pytest.approx(direct.item(), rel=1e-6)
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, ref.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_p2p_receive_buffers_are_allocated_on_cpu(parallel_state, monkeypatch):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.pipeline_parallel import p2p_communication

    def loopback(*, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next,
                 group, prev_pipeline_rank, next_pipeline_rank):
        # A one-stage ring: the previous stage is this one (gloo cannot send to itself).
        with torch.no_grad():
            tensor_recv_prev.copy_(tensor_send_next)
        return []

    monkeypatch.setattr(p2p_communication, "_batched_p2p_ops", loopback)
    config = ModelParallelConfig(pipeline_dtype=torch.float32, batch_p2p_comm=True,
                                 batch_p2p_sync=True)
    communicator = p2p_communication.P2PCommunicator(
        parallel_state.get_pipeline_model_parallel_group(), config)
    activation = torch.randn(SEQ, MICRO_BATCH, HIDDEN)  # [s, b, h]
    received = communicator.send_forward_recv_forward(activation, recv_prev=True,
                                                      tensor_shape=activation.shape)
    assert received.device.type == "cpu" and received.requires_grad
    assert torch.equal(received, activation)


# --- DDP and optimizers ----------------------------------------------------------------------

@pytest.mark.parametrize("distributed", [False, True], ids=["adam", "distributed-adam"])
def test_megatron_adam_step_equals_torch_adam(distributed):
    config = make_config()
    ddp_model, optimizer = build_ddp_and_optimizer(config, seed=0, distributed=distributed,
                                                   clip_grad=0.05)
    reference = build_gpt(make_config(), seed=0)
    assert all(buffer.grad_data.device.type == "cpu" for buffer in ddp_model.buffers)
    batch = make_batch(20)

    loss, grad_norm = megatron_train_step(ddp_model, optimizer, batch)

    reference_loss = mean_loss(reference, batch)
    reference_loss.backward()
    reference_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=0.05)
    torch.optim.Adam(reference.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8).step()

    assert loss == pytest.approx(reference_loss.item(), rel=1e-6)
    assert grad_norm == pytest.approx(reference_norm.item(), rel=1e-5) and grad_norm > 0.05
    for (name, param), ref in zip(ddp_model.module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.detach(), ref.detach(), rtol=1e-5, atol=1e-6, msg=name)
    assert mean_loss(ddp_model, batch).item() < loss


def test_bf16_optimizer_steps_fp32_main_params_like_torch_adam():
    config = make_config(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    ddp_model, optimizer = build_ddp_and_optimizer(config, seed=0, distributed=False)
    assert {type(o).__name__ for o in megatron_optimizers(optimizer)} == {
        "Float16OptimizerWithFloat16Params"}
    params = list(unwrap(ddp_model).parameters())
    main_params = [p.detach().float().clone().requires_grad_() for p in params]

    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    mean_loss(ddp_model, make_batch(21)).backward()
    ddp_model.finish_grad_sync()
    for main_param, param in zip(main_params, params):
        main_param.grad = param.main_grad.clone()  # fp32 (grad_reduce_in_fp32)
    optimizer.step()

    torch.nn.utils.clip_grad_norm_(main_params, max_norm=1.0)
    torch.optim.Adam(main_params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8).step()
    for param, main_param in zip(params, main_params):
        assert param.dtype == torch.bfloat16
        torch.testing.assert_close(param.main_param, main_param.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(param.detach(), param.main_param.bfloat16())


# --- RNG tracker, activation recompute, tied embeddings --------------------------------------

def test_tracker_fork_draws_its_own_stream_and_restores_the_default_one():
    from megatron.core import tensor_parallel
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        forked = torch.rand(4)
    assert torch.equal(torch.rand(4), expected)
    assert not torch.equal(forked, expected)


def test_activation_recompute_with_dropout_matches_no_recompute():
    plain = build_gpt(make_config(hidden_dropout=0.2), seed=3)
    recomputed = build_gpt(make_config(hidden_dropout=0.2, recompute_granularity="full",
                                       recompute_method="uniform", recompute_num_layers=1),
                           seed=3)
    batch = make_batch(30)
    losses = []
    for model in (plain, recomputed):
        torch.manual_seed(99)  # same dropout masks, if recompute replays the RNG state
        loss = mean_loss(model, batch)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for (name, param), ref in zip(recomputed.named_parameters(), plain.parameters()):
        torch.testing.assert_close(param.grad, ref.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_tied_embedding_setup_across_stages_keeps_weights_on_cpu():
    model = build_gpt(make_config(), seed=4, share_embeddings_and_output_weights=True)
    weight = model.shared_embedding_or_output_weight()
    before = weight.detach().clone()
    # Take the cross-stage branch (weight.data.cuda(), then the embedding-group all-reduce).
    model.config.pipeline_model_parallel_size = 2
    model.setup_embeddings_and_output_layer()
    weight = model.shared_embedding_or_output_weight()
    assert weight.device.type == "cpu"
    assert torch.equal(weight.detach(), before)  # all-reduce over the one-rank embedding group


# --- dist_checkpointing (torch_dist) ---------------------------------------------------------

@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_torch_dist_round_trip_restores_weights_bitwise(tmp_path, asynchronous):
    from megatron.core import dist_checkpointing
    saved, restored = build_gpt(make_config(), seed=5), build_gpt(make_config(), seed=6)
    if asynchronous:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
        queue = AsyncCallsQueue()
        request = dist_checkpointing.save(saved.sharded_state_dict(), str(tmp_path),
                                          async_sharded_save=True)
        queue.schedule_async_request(request)
        queue.maybe_finalize_async_calls(blocking=True)
        queue.close()
    else:
        dist_checkpointing.save(saved.sharded_state_dict(), str(tmp_path))
    state = dist_checkpointing.load(restored.sharded_state_dict(), str(tmp_path))
    restored.load_state_dict(state)
    for (name, param), ref in zip(restored.named_parameters(), saved.parameters()):
        assert torch.equal(param, ref), name


@pytest.mark.parametrize("sharding_type", ["fully_reshardable", "dp_reshardable"])
def test_distributed_optimizer_checkpoint_resumes_like_the_saved_run(tmp_path, sharding_type):
    from megatron.core import dist_checkpointing
    config = make_config()
    metadata = {"distrib_optim_sharding_type": sharding_type}

    def state_to_save(ddp_model, optimizer, is_loading):
        model_state = ddp_model.module.sharded_state_dict()
        return {"model": model_state,
                "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                          metadata=metadata)}

    saved_model, saved_optimizer = build_ddp_and_optimizer(config, seed=0, distributed=True)
    megatron_train_step(saved_model, saved_optimizer, make_batch(40))
    dist_checkpointing.save(state_to_save(saved_model, saved_optimizer, False), str(tmp_path))

    # A fresh optimizer that has not stepped loads the checkpoint.
    model, optimizer = build_ddp_and_optimizer(make_config(), seed=1, distributed=True)
    state = dist_checkpointing.load(state_to_save(model, optimizer, True), str(tmp_path))
    model.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for (name, param), ref in zip(model.module.named_parameters(),
                                  saved_model.module.parameters()):
        assert torch.equal(param, ref), name
    steps = [s["step"] for o in megatron_optimizers(optimizer)
             for s in o.optimizer.state.values()]
    assert [float(step) for step in steps] == [1.0] * len(steps)

    # The next step matches the saved run's (Adam's bias correction uses step 2).
    next_batch = make_batch(41)
    saved_loss, _ = megatron_train_step(saved_model, saved_optimizer, next_batch)
    loss, _ = megatron_train_step(model, optimizer, next_batch)
    assert loss == saved_loss
    assert [float(step) for step in steps] == [2.0] * len(steps)
    for (name, param), ref in zip(model.module.named_parameters(),
                                  saved_model.module.parameters()):
        torch.testing.assert_close(param, ref, rtol=0, atol=1e-7, msg=name)
