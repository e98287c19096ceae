"""The reproduction's data: one sentencepiece tokenizer, a pretraining set and an extension set.

Both sets are the tiny corpus (standard-library code and docstrings + synthetic passkey documents); they
differ in the passkey documents' length: short for pretraining, so question and key share one window of the
pretraining length, longer for the extension, so the key lies up to the target length before its question.
Built once under `<output_dir>/data/<tag>`, atomically (a temporary directory renamed into place).
"""

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ReproData:
    tokenizer_model: str
    pretrain_prefix: str  # indexed dataset ({prefix}.bin/.idx)
    extension_prefix: str


def prepare_repro_data(root, settings) -> ReproData:
    """Build (or find) the tokenizer and both datasets for `settings` (a config's `data` section)."""
    from megatron_ext.data.corpus import build_tiny_corpus
    from megatron_ext.data.preprocess import preprocess
    from megatron_ext.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    short, long = settings.pretrain_passkey_chars, settings.extension_passkey_chars
    tag = (f"seed{settings.seed}_docs{settings.num_documents}_retr{settings.retrieval_fraction:g}_vocab"
           f"{settings.vocab_size}_pk{short[0]}-{short[1]}_{long[0]}-{long[1]}")
    final = Path(root) / tag
    data = ReproData(str(final / "tokenizer.model"), str(final / "pretrain"), str(final / "extension"))
    if (final / "READY").is_file():
        return data
    Path(root).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{tag}.", dir=root))
    try:
        corpora = {}
        for name, chars, seed in (("pretrain", short, settings.seed), ("extension", long, settings.seed + 1)):
            corpora[name] = build_tiny_corpus(work / f"{name}_corpus", seed=seed,
                                              num_documents=settings.num_documents,
                                              retrieval_fraction=settings.retrieval_fraction,
                                              passkey_chars=tuple(chars))
        model = train_sentencepiece([corpora["pretrain"]], work / "tokenizer", settings.vocab_size,
                                    seed=settings.seed)
        tokenizer = SentencePieceTokenizer(model)
        for name, corpus in corpora.items():
            result = preprocess([corpus], work / name, tokenizer, workers=1, progress=False)
            print(f"repro data, {name} set:\n{result.table()}", flush=True)
        (work / "READY").write_text("complete\n")
        work.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return data
