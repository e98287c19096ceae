"""Tiny models for the serving tests: built and briefly trained in megatron_ext, saved as training saves, exported.

Runs in the training venv (megatron). The serving engine then runs in the serving env (see SERVE_PYTHON).
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

SERVE_PYTHON = Path(os.environ.get("MEGATRON_EXT_SERVE_PYTHON",
                                   Path(__file__).resolve().parents[1] / ".venv-serve" / "bin" / "python"))
needs_serve_env = pytest.mark.skipif(
    not SERVE_PYTHON.exists(),
    reason=f"no serving environment at {SERVE_PYTHON}: run `make serve-env` (vLLM + lm-eval; ~6 min on CPU)")

VOCAB, PADDED_VOCAB = 300, 384
WINDOW = 32  # the training sequence length: served prompts go well beyond it
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def train_tokenizer(directory: Path) -> Path:
    from megatron_ext.data.tokenizer import train_sentencepiece

    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (30,), generator=generator))
             for _ in range(300)]
    return train_sentencepiece(iter(texts), directory / "tok", VOCAB)


def training_batch(step: int, batch: int = 8) -> torch.Tensor:
    """Token windows with structure to learn: each repeats a random 5-token motif (greedy decoding then has
    clear winners, so the engines' equality is about the model, not about near-ties)."""
    generator = torch.Generator().manual_seed(1000 + step)
    motifs = torch.randint(3, VOCAB, (batch, 5), generator=generator)
    return motifs.repeat(1, WINDOW // 5 + 2)[:, :WINDOW + 1]


def build_export(root: Path, *, rope, family: str, qkv_bias: bool = False, pose_target: int | None = None,
                 steps: int = 150, seed: int = 3) -> tuple[Path, torch.nn.Module]:
    """A 2-layer GQA model (4 query heads, 2 KV groups, head_dim 32), `steps` Adam steps on WINDOW tokens,
    saved with save_checkpoint and exported with mcore_to_hf. Returns (export dir, the trained model)."""
    from megatron_ext.checkpoint.store import save_checkpoint
    from megatron_ext.config import TrainConfig
    from megatron_ext.convert import mcore_to_hf
    from megatron_ext.models.builder import build_gpt
    from megatron_ext.models.init import layout_independent_init

    tokenizer = train_tokenizer(root)
    config = TrainConfig()
    m = config.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size = 2, 128, 4, 2, 256
    m.seq_length, m.qkv_bias = WINDOW, qkv_bias
    config.rope = rope
    if pose_target:
        config.pose.enabled, config.pose.target_length = True, pose_target
    model = build_gpt(config, PADDED_VOCAB, torch.device("cpu"))
    layout_independent_init(model, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    positions = torch.arange(WINDOW).expand(8, WINDOW)
    for step in range(steps):
        tokens = training_batch(step)
        logits = model(tokens[:, :-1], positions, None)[..., :VOCAB]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    # the checkpoint carries its tokenizer as training's do (a relative record): exports take it only from inside
    carried = f"tokenizer/{tokenizer.name}"
    state = dict(iteration=steps, config=config.to_dict(), head_bases=config.rope.group_bases(2).tolist(),
                 padded_vocab_size=PADDED_VOCAB, tokenizer_model=carried, tokenizer_vocab_size=VOCAB)
    save_checkpoint(root / "ckpt", steps, model=[model], state=state, extra_files={carried: tokenizer.read_bytes()})
    return mcore_to_hf(root / "ckpt", root / "hf", family=family), model


def prompt(length: int, seed: int) -> list[int]:
    """A repeated 5-token motif with random tokens mixed in: the model has learned motifs, not these prompts."""
    generator = torch.Generator().manual_seed(seed)
    motif = torch.randint(3, 300, (5,), generator=generator).repeat(length // 5 + 1)[:length]
    noise = torch.rand(length, generator=generator) < 0.2
    return torch.where(noise, torch.randint(3, 300, (length,), generator=generator), motif).tolist()


def harpe_rope():
    from megatron_ext.rope import RopeConfig

    return RopeConfig(head_base_strategy="uniform", head_base_params={"b_min": 100.0, "b_max": 1e5},
                      scaling="yarn", scaling_params={"factor": 4.0, "original_max_position_embeddings": WINDOW})


def pose_yarn_rope():
    from megatron_ext.rope import RopeConfig

    return RopeConfig(base=10000.0, scaling="yarn",
                      scaling_params={"factor": 4.0, "original_max_position_embeddings": WINDOW})


def megatron_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """The training model's own greedy decode: the whole sequence again at every step (no cache to trust)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.tensor([tokens])
            logits = model(ids, torch.arange(len(tokens))[None], None)[0, -1, :VOCAB]
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


def transformers_greedy(export: Path, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    """Greedy tokens and their log-probabilities from transformers (megatron_ext.hf's loader), one prompt at a time."""
    from megatron_ext.hf import load_harpe_model

    model = load_harpe_model(str(export), dtype=torch.float32).eval()
    results = []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                                 pad_token_id=0)
            tokens = out.sequences[0, len(prompt):].tolist()
            logprobs = [torch.log_softmax(step[0].double(), -1)[t].item() for step, t in zip(out.logits, tokens)]
            results.append({"tokens": tokens, "logprobs": logprobs})
    return results


def run_engine(jobs: list[dict], work: Path, *, env: dict | None = None, timeout: int = 1200) -> list[dict]:
    """Run tests/serve_engine_checks.py in the serving env over `jobs` (one process); its reports, in order."""
    work.mkdir(parents=True, exist_ok=True)
    job_file, out_file = work / "jobs.json", work / "engine_out.json"
    job_file.write_text(json.dumps(jobs))
    script = Path(__file__).with_name("serve_engine_checks.py")
    result = subprocess.run([str(SERVE_PYTHON), str(script), str(job_file), str(out_file)], capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    return json.loads(out_file.read_text())
