"""vLLM's entry point (`vllm.general_plugins` in setup.py): registers the HARPE architectures.

vLLM calls `register` in every process it starts. Registration is by name ("module:Class"), so nothing
of megatron_ext's vLLM models is imported until an export asks for one of them.
"""

from megatron_ext.serve.export_rope import HARPE_ARCHITECTURES


def register() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for architecture in HARPE_ARCHITECTURES:
        if architecture not in supported:
            ModelRegistry.register_model(architecture, f"megatron_ext.serve.vllm_models:{architecture}")
