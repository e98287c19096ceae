"""One rank of a megatron-core job on fake tensors and a fake process group of the full world size.

torch's FakeTensorMode gives every tensor its shape, dtype and storage size but no data; the fake
process-group backend (torch.testing._internal.distributed.fake_pg) lets one process be rank r of N, its
collectives returning at once. Measured: megatron-core 0.16 builds our model, its DDP and distributed
optimizer, runs its pipeline schedule and the optimizer step this way once these few things are bridged
(each applied only inside `fake_rank`, and undone after):

- megatron creates gloo groups next to the default ones; the fake store cannot back gloo: they become
  groups of the default (fake) backend.
- RotaryProvider computes the HARPE bases from real numbers (`tolist`, comparisons): it is built outside
  the fake mode (its tensors are a few hundred floats).
- Float16Module casts the model with `module.bfloat16()`, which swaps parameters, and torch cannot swap a
  fake parameter: the parameters are cast before (`cast_parameters`) and the call is left with nothing to do.
- `all_gather_object` (the optimizer's parameter-group check) would unpickle fake bytes: every rank of the
  simulated job builds the same groups, so each rank's object stands for all.
- DDP coalesces its reduce-scatters/all-gathers; the coalesced ops have no fake kernel: issued one by one.
- Sequence parallelism (which this machine's torch norms refuse, so the CPU patches never needed it) gathers
  and scatters into buffers on torch.cuda.current_device(): those modules get compat's CPU stand-in `torch`;
  its embedding and transformer block fork the CUDA RNG tracker (for dropout, which draws nothing on fake
  tensors): a tracker whose fork does nothing.
- torch.compile'd fusions (megatron's jit_fuser) run eagerly (dynamo disabled).
- The rotation (megatron_ext.rope.apply) runs its torch path in GPU-sized chunks (CHUNK_ELEMENTS, not the
  CPU's cache-sized ones): the cos/sin temporaries of the GPU's torch path (an upper bound: the Triton kernel
  has none), and 30x fewer fake ops.
- The position ids of a micro-batch are compared (`torch.equal`) to share one RoPE table; fake tensors
  have no values, so the simulation says whether they are shared (PoSE: per sample).

Imports torch and megatron-core (lazily) and megatron_ext.models.
"""

import contextlib
import importlib
from unittest import mock

import torch


class _NoCoalescing:
    """What megatron waits on after a (here uncoalesced) group of collectives: nothing."""

    def wait(self):
        return None


@contextlib.contextmanager
def _issue_one_by_one(group=None, device=None, async_ops=False):
    yield _NoCoalescing()


class _NoRngTracker:
    """megatron's CUDA RNG tracker as the simulation needs it: dropout on fake tensors draws nothing."""

    def fork(self, name=None):
        return contextlib.nullcontext()


def _no_rng_tracker():
    return _NoRngTracker()


def _each_rank_has_the_same(objects, obj, group=None):
    objects[:] = [obj] * len(objects)


@contextlib.contextmanager
def fake_rank(rank: int, world_size: int, *, shared_positions: bool = True, fused_norms: bool = True):
    """Inside: rank `rank` of a fake process group of `world_size`, FakeTensorMode active, megatron bridged.
    The caller initializes megatron's parallel state (and destroys nothing: leaving tears it all down).
    fused_norms: the final norm is the fused-RMSNorm stand-in (the layers' norms come from the layer spec)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.transformer import transformer_block
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_ext.compat import prepare_megatron
    from megatron_ext.compat.cpu_torch import CPU_TORCH
    from megatron_ext.launch.gpu_standins import FusedRMSNormStandIn
    from megatron_ext.models import gpt, provider
    from megatron_ext.rope import apply

    prepare_megatron()
    sequence_parallel_modules = [importlib.import_module(f"megatron.core.{name}")
                                 for name in ("tensor_parallel.mappings", "tensor_parallel.layers", "utils")]
    if dist.is_initialized():
        raise RuntimeError("the memory simulation needs a process without a torch.distributed group")
    create_group = ps.create_group
    rotary_init = provider.RotaryProvider.__init__

    def without_gloo(*args, backend=None, **kwargs):
        return create_group(*args, backend=None, **kwargs)

    def real_rotary_init(self, *args, **kwargs):
        with unset_fake_temporarily():
            rotary_init(self, *args, **kwargs)

    def positions(position_ids):
        return position_ids[:1] if shared_positions else position_ids

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        with contextlib.ExitStack() as stack:
            for target, name, value in [
                (ps, "create_group", without_gloo),
                (provider.RotaryProvider, "__init__", real_rotary_init),
                (dist, "all_gather_object", _each_rank_has_the_same),
                (param_and_grad_buffer, "_coalescing_manager", _issue_one_by_one),
                *([(transformer_block, "LayerNormImpl", FusedRMSNormStandIn)] if fused_norms else []),
                (gpt, "shared_positions", positions),
                (torch._dynamo.config, "disable", True),
                (apply, "CPU_CHUNK_ELEMENTS", apply.CHUNK_ELEMENTS),
                *[(module, "torch", CPU_TORCH) for module in sequence_parallel_modules],
                (tensor_parallel, "get_cuda_rng_tracker", _no_rng_tracker),
            ]:
                stack.enter_context(mock.patch.object(target, name, value))
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            yield
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give every parameter `dtype` by replacing it (Float16Module's in-place cast cannot swap fake
    parameters), keeping megatron's attributes on it (tensor_model_parallel, sequence_parallel, ...), then
    make the module's own cast a no-op."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.dtype != dtype:
                cast = torch.nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
                cast.__dict__.update(param.__dict__)
                sub._parameters[name] = cast
    module.bfloat16 = lambda: module
