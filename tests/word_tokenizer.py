"""A loadable Hugging Face tokenizer directory of a few whole words, for the tests that then damage it."""

import json
from pathlib import Path


def write_word_tokenizer(directory: Path, words: list[str]) -> Path:
    """tokenizer.json (word level, whitespace split, '<unk>' for the rest) and tokenizer_config.json with
    '<s>' / '</s>' / '<unk>' as BOS / EOS / UNK, in `directory` (which must exist); `words` holds those three."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return directory
