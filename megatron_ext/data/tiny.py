"""The bundled tiny default: offline corpus -> trained sentencepiece tokenizer -> indexed dataset, cached.

Built once per (seed, documents, vocabulary) under a cache directory, atomically (a temporary
directory renamed into place), so concurrent or interrupted runs never see half a dataset.
"""

import shutil
import tempfile
from pathlib import Path


def prepare_tiny_dataset(cache_dir, *, seed: int = 0, num_documents: int = 400, vocab_size: int = 2000,
                         upsample: dict | None = None, build: bool = True) -> tuple[str, str]:
    """(tokenizer .model path, indexed-dataset prefix) of the tiny default; builds it if missing."""
    from megatron_ext.data.corpus import build_tiny_corpus
    from megatron_ext.data.preprocess import preprocess
    from megatron_ext.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    tag = f"tiny_seed{seed}_docs{num_documents}_vocab{vocab_size}"
    if upsample:
        tag += "_up" + "_".join(f"{s}-{r['min_tokens']}x{r['factor']}" for s, r in sorted(upsample.items()))
    root = Path(cache_dir) / tag
    outputs = (str(root / "tokenizer.model"), str(root / "tiny"))
    if (root / "READY").is_file():
        return outputs
    if not build:
        raise FileNotFoundError(f"tiny dataset {root} is not built: call with build=True on one rank first")
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{tag}.", dir=cache_dir))
    try:
        corpus = build_tiny_corpus(work, seed=seed, num_documents=num_documents)
        model = train_sentencepiece([corpus], work / "tokenizer", vocab_size, seed=seed)
        preprocess([corpus], work / "tiny", SentencePieceTokenizer(model), workers=1, upsample=upsample,
                   progress=False)
        (work / "READY").write_text("complete\n")
        work.rename(root)
    except OSError:
        if not (root / "READY").is_file():  # not just another process having finished first
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone already after a successful rename
    return outputs
