"""megatron_ext: HARPE and PoSE position embeddings for megatron-core, plus the tools around them."""

__version__ = "0.1.0"
