"""Tokenizers across conversion: what a converted checkpoint carries (`carried_tokenizer`), and what an export
gets (`export_tokenizer`): a Hugging Face directory as it is, a training tokenizer file as the Hugging Face
tokenizer files (tokenizer.json + tokenizer_config.json), built with the `tokenizers` library so transformers
tokenizes exactly as training did.

sentencepiece BPE: the model's pieces and merges (every split of a piece into two pieces, ranked by the piece's
score, sentencepiece's merge order), its whitespace handling as a normalizer, byte fallback. tiktoken (Llama-3):
transformers' TikTokenConverter with Llama-3's special tokens. Imports no megatron and no torch.
"""

import json
import logging
from pathlib import Path

log = logging.getLogger("megatron_ext")

WORD_START = "\u2581"  # sentencepiece's escaped space, "▁"
NOT_TOKENIZER_FILES = ("generation_config.json",)  # copied with the tokenizer for the export, but decide no ids


def has_tokenizer(names: list[str]) -> bool:
    """Whether these file names of a Hugging Face directory include a tokenizer."""
    return any(name not in NOT_TOKENIZER_FILES for name in names)


def carried_tokenizer(hf_dir: Path, names: list[str]) -> tuple[dict[str, bytes], str | None]:
    """({file name: bytes}, fingerprint) of the tokenizer a checkpoint converted from `hf_dir` carries: the files
    `names` as they are, plus the config.json keys by which AutoTokenizer picked its class in `hf_dir`
    (megatron_ext.data.tokenizer_record.checkpoint_tokenizer_files), so the copy gives the ids `hf_dir` gives."""
    from megatron_ext.convert.hf_io import require_inside
    from megatron_ext.data.tokenizer_files import open_encoder
    from megatron_ext.data.tokenizer_record import checkpoint_tokenizer_files
    from megatron_ext.errors import UserError

    files = {name: require_inside(hf_dir, hf_dir / name).read_bytes() for name in names}
    if not has_tokenizer(names):
        return files, None
    try:
        encoder = open_encoder(hf_dir, setting=f"the tokenizer of {hf_dir}")  # transformers' failures: one line
    except UserError as error:
        log.warning(f"megatron_ext: {error}; its files are copied as they are (training or evaluating the converted "
                    f"model will need a tokenizer that loads)")
        return files, None
    return {**files, **checkpoint_tokenizer_files(encoder)}, encoder.fingerprint()


def export_tokenizer(tokenizer: Path, out: Path) -> None:
    """Put the tokenizer at `tokenizer` (a file, or a directory as megatron_ext.data.tokenizer_files resolves it)
    into the export `out`: a Hugging Face directory's files as they are (the export's own config.json, written
    from the same model type, picks the same class), a sentencepiece or tiktoken file as Hugging Face files."""
    import shutil

    from megatron_ext.convert.hf_io import copy_tokenizer_files, require_inside
    from megatron_ext.data.tokenizer_files import detect_tokenizer
    from megatron_ext.errors import UserError

    try:
        kind, where = detect_tokenizer(tokenizer, setting="the checkpoint's tokenizer")
    except UserError as error:
        log.warning(f"megatron_ext: {error}; copied as tokenizer.model" if tokenizer.is_file() else
                    f"megatron_ext: {error}; its files are copied as they are")
        kind, where = None, tokenizer
    if where.is_dir():
        copy_tokenizer_files(where, out)
        return
    require_inside(where.parent, where)
    if kind is None:
        shutil.copy2(where, out / "tokenizer.model")
        return
    write_hf_tokenizer(kind, where, out)


def write_hf_tokenizer(kind: str, path: Path, out: Path) -> None:
    """Write `out`/tokenizer.json and tokenizer_config.json for the `kind` tokenizer file at `path`, and copy the
    file as tokenizer.model. A sentencepiece model tokenizer.json cannot express is exported as before: the
    .model with a LlamaTokenizer config (transformers then rebuilds it, which may differ; logged)."""
    import shutil

    shutil.copy2(path, out / "tokenizer.model")
    built = sentencepiece_tokenizer(path) if kind == "sentencepiece" else tiktoken_tokenizer(path)
    if isinstance(built, str):  # the reason it cannot be built
        log.warning(f"megatron_ext: exporting {path} without tokenizer.json ({built}); transformers rebuilds it "
                    f"from tokenizer.model and may tokenize text that starts with a space differently")
        config = {"tokenizer_class": "LlamaTokenizer"}
    else:
        tokenizer, config = built
        tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def sentencepiece_tokenizer(model_path: Path):
    """(tokenizers.Tokenizer, tokenizer_config) equal to the sentencepiece BPE model, or the reason there is none."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    proto = model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    reason = _unsupported(proto, model_pb2)
    if reason:
        return reason
    kinds = model_pb2.ModelProto.SentencePiece
    pieces = proto.pieces
    vocab = {piece.piece: index for index, piece in enumerate(pieces)}
    normal = {piece.piece for piece in pieces if piece.type == kinds.NORMAL}
    merges = [(piece.piece[:k], piece.piece[k:])
              for _, _, piece in sorted((-piece.score, index, piece) for index, piece in enumerate(pieces)
                                        if piece.type == kinds.NORMAL)
              for k in range(1, len(piece.piece)) if piece.piece[:k] in normal and piece.piece[k:] in normal]
    spec = proto.trainer_spec
    unk = pieces[spec.unk_id].piece
    tokenizer = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=spec.byte_fallback))
    dummy_prefix = proto.normalizer_spec.add_dummy_prefix
    tokenizer.normalizer = normalizers.Sequence(
        ([normalizers.Prepend(WORD_START)] if dummy_prefix else []) + [normalizers.Replace(" ", WORD_START)])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(WORD_START, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if dummy_prefix else []))
    tokenizer.add_special_tokens([AddedToken(piece.piece, special=True, normalized=False) for piece in pieces
                                  if piece.type in (kinds.CONTROL, kinds.UNKNOWN)])
    special = {"unk_token": unk}
    if spec.bos_id >= 0:  # Llama's tokenizers start every sequence with BOS when asked for special tokens
        bos = pieces[spec.bos_id].piece
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                                 special_tokens=[(bos, spec.bos_id)])
        special["bos_token"] = bos
    if spec.eos_id >= 0:
        special["eos_token"] = pieces[spec.eos_id].piece
    return tokenizer, _config(special)


def _unsupported(proto, model_pb2) -> str | None:
    """Why tokenizer.json cannot reproduce this sentencepiece model, or None."""
    norm = proto.normalizer_spec
    if proto.trainer_spec.model_type != model_pb2.TrainerSpec.BPE:
        return "a unigram model: its Viterbi segmentation is not exported"
    if norm.name != "identity" or norm.remove_extra_whitespaces or not norm.escape_whitespaces \
            or proto.trainer_spec.treat_whitespace_as_suffix:
        return f"its normalizer ({norm.name}) rewrites text in ways tokenizer.json does not reproduce"
    if any(piece.type == model_pb2.ModelProto.SentencePiece.USER_DEFINED for piece in proto.pieces):
        return "it has user-defined pieces"
    return None


def tiktoken_tokenizer(path: Path):
    """(tokenizers.Tokenizer, tokenizer_config) of a tiktoken BPE file with Llama-3's special tokens."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from megatron_ext.data.tokenizer_files import LLAMA3_PATTERN, llama3_special_tokens, read_tiktoken_ranks

    names = list(llama3_special_tokens(len(read_tiktoken_ranks(path))))
    tokenizer = TikTokenConverter(vocab_file=str(path), pattern=LLAMA3_PATTERN,
                                  extra_special_tokens=names).converted()
    bos, eos = names[0], names[1]
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tokenizer.token_to_id(bos))])])
    return tokenizer, _config({"bos_token": bos, "eos_token": eos})


def _config(special: dict) -> dict:
    # PreTrainedTokenizerFast takes tokenizer.json as it is (a model class's tokenizer may rebuild parts of it)
    return {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **special}
