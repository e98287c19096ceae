"""Fixes of megatron-core 0.16.x's distributed-optimizer checkpoints on its torch.optim path.

Without Apex or Transformer Engine (megatron's `HAVE_APEX_OR_TE` is false) DistributedOptimizer
wraps torch.optim.Adam, whose state keeps a per-parameter 'step'; its checkpoint code gets that
path wrong, GPU or not. Applied by `enable_torch_optim_fixes()` (or `prepare_megatron()`) only
on that path. Imports torch, megatron.core and megatron_ext.compat only.
"""
from __future__ import annotations

import functools
import importlib

import torch

from megatron_ext.compat import requirements
from megatron_ext.compat.patches import PatchGroup

__all__ = ["TORCH_OPTIM_FIXES", "describe_torch_optim_fixes", "enable_torch_optim_fixes",
           "torch_optim_path"]

TORCH_OPTIM_FIXES = PatchGroup("no Apex/TE")


def _distrib_optimizer_module():
    return importlib.import_module("megatron.core.optimizer.distrib_optimizer")


def torch_optim_path() -> bool:
    """Whether megatron's DistributedOptimizer runs on torch.optim here (no Apex/TE optimizer)."""
    requirements.require_supported_megatron_core()  # HAVE_APEX_OR_TE is 0.16's name
    return not _distrib_optimizer_module().HAVE_APEX_OR_TE


@TORCH_OPTIM_FIXES.patch(
    "distopt_state_dict_before_first_step",
    "optimizer/distrib_optimizer.py: state_dict asserts one 'step' across an empty "
    "torch.optim state, so loading into an optimizer that has not stepped fails")
def _distopt_state_dict_before_first_step():
    distributed = _distrib_optimizer_module().DistributedOptimizer
    stock_state_dict = distributed.state_dict

    def state_dict(self):
        if len(self.optimizer.state) > 0:
            return stock_state_dict(self)
        # What the stock method returns after a step, with step 0 (as on the Apex/TE path).
        inner = self.optimizer.state_dict()
        optimizer_state = {key: value for key, value in inner.items() if key != "state"}
        for param_group in optimizer_state["param_groups"]:
            del param_group["params"]
            param_group["step"] = 0
        result = {"optimizer": optimizer_state}
        if self.grad_scaler:
            result["grad_scaler"] = self.grad_scaler.state_dict()
        return result

    distributed.state_dict = functools.wraps(stock_state_dict)(state_dict)


@TORCH_OPTIM_FIXES.patch(
    "distopt_keep_loaded_step",
    "optimizer/distrib_optimizer.py: _set_main_param_and_optimizer_states copies 'step' "
    "from the loaded shard: KeyError (fully_reshardable) or the pre-load step (dp_reshardable)")
def _distopt_keep_loaded_step():
    # load_state_dict has already set every state['step'] from the checkpoint's param_groups
    # before the per-parameter loaders run; the shard's own 'step' is absent or stale.
    distributed = _distrib_optimizer_module().DistributedOptimizer
    stock_set_states = distributed._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            live_state = self.optimizer.state[main_param]
            if "step" in live_state:
                tensors = {**tensors, "step": live_state["step"]}
        return stock_set_states(self, model_param, tensors)

    distributed._set_main_param_and_optimizer_states = functools.wraps(stock_set_states)(
        set_states)


@TORCH_OPTIM_FIXES.patch(
    "distopt_dp_reshardable_load_no_grad",
    "optimizer/distrib_optimizer.py: load_parameter_state_from_dp_reshardable lacks "
    "torch.no_grad(), so copy_ into fp32 main params (leaves needing grad) raises")
def _distopt_dp_reshardable_load_no_grad():
    distributed = _distrib_optimizer_module().DistributedOptimizer
    distributed.load_parameter_state_from_dp_reshardable = torch.no_grad()(
        distributed.load_parameter_state_from_dp_reshardable)


@TORCH_OPTIM_FIXES.patch(
    "distopt_unshare_step_tensor",
    "optimizer/distrib_optimizer.py: load_state_dict puts ONE 'step' tensor in every "
    "param's state; torch Adam then adds 1 per param, corrupting bias correction")
def _distopt_unshare_step_tensor():
    distributed = _distrib_optimizer_module().DistributedOptimizer
    stock_load_state_dict = distributed.load_state_dict

    def load_state_dict(self, state_dict):
        result = stock_load_state_dict(self, state_dict)
        seen = set()
        for param_state in self.optimizer.state.values():
            step = param_state.get("step")
            if torch.is_tensor(step):
                if id(step) in seen:
                    param_state["step"] = step = step.clone()
                seen.add(id(step))
        return result

    distributed.load_state_dict = functools.wraps(stock_load_state_dict)(load_state_dict)


def enable_torch_optim_fixes(force: bool = False) -> list[str]:
    """Apply every torch.optim fix once; return the names of the fixes in effect.

    Without `force`, does nothing and returns [] where megatron found an Apex or Transformer
    Engine optimizer: that path keeps 'step' in the param groups and needs none of them.
    """
    if not (force or torch_optim_path()):
        return []
    return TORCH_OPTIM_FIXES.apply()


def describe_torch_optim_fixes() -> str:
    """The torch.optim fixes as a two-column table: name | why."""
    return TORCH_OPTIM_FIXES.describe()
