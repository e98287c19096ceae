import pytest
import torch

# Tests are CPU-only and small: one intra-op thread keeps the 2-core CI machine responsive
# while distributed tests run their gloo ranks side by side.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_rank():
    """megatron prepared as the product prepares it, a one-process gloo world and megatron's (global) parallel
    state at size 1."""
    from megatron.core import parallel_state as ps

    from megatron_ext.compat import prepare_megatron

    prepare_megatron()
    created = not torch.distributed.is_initialized()
    if created:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    ps.initialize_model_parallel()
    yield ps
    ps.destroy_model_parallel()
    if created:
        torch.distributed.destroy_process_group()
