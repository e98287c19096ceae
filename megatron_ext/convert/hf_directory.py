"""What a Hugging Face model directory must be before anything of it is read: `check_hf_directory`.

Both readers of such a directory, `convert hf-to-mcore` (our own safetensors reader) and evaluation (transformers'
from_pretrained), run these checks first, so a hostile directory is refused by name, in one line, before any work:
- the rules for the files of any Hugging Face directory (megatron_ext/data/model_directory.py, shared with the
  tokenizer layer): no custom code (an `auto_map` in config.json or tokenizer_config.json), every file read (config,
  tokenizer, generation config, index, shards) a regular file inside the directory (hub-cache links excepted);
- no pickles: weights only as safetensors (unpickling a pytorch_model.bin can run code);
- safetensors headers that describe the file: bounded length, known dtypes, shapes whose bytes are the byte ranges,
  ranges inside the file that tile its data without overlap. A header claiming a terabyte is refused, not allocated.
Standard library only (no torch): a header is checked from its JSON.
"""

import json
import math
from pathlib import Path

from megatron_ext.convert.hf_config_fields import check_config_fields, check_implied_parameters
from megatron_ext.data import model_directory
from megatron_ext.data.model_directory import (
    CHAT_TEMPLATE_FILES,
    CONFIG_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILES,
)
from megatron_ext.errors import ConversionError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Every file besides the weights that the converters or transformers read from a model directory.
READ_FILES = (CONFIG_FILE, "generation_config.json", *TOKENIZER_FILES, *CHAT_TEMPLATE_FILES, INDEX_FILE)
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
# bytes per element of the safetensors dtypes megatron_ext reads or can size
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own bound
SAFE_FORMAT_FIX = "re-save the model with transformers' save_pretrained(..., safe_serialization=True)"
MODEL_DIRECTORY = "model directory"  # what the refusals call the directory


def check_hf_directory(directory) -> list[Path]:
    """Every check of this module on `directory`; its safetensors weight files, their headers checked. A
    ConversionError (a UserError: one line, exit 2) names the file at fault."""
    directory = Path(directory)
    config = read_config(directory)
    model_directory.check_present_files(directory, READ_FILES, error=ConversionError, what=MODEL_DIRECTORY)
    model_directory.refuse_custom_code(directory, {CONFIG_FILE: None, TOKENIZER_CONFIG_FILE: None},
                                       error=ConversionError)
    files = weight_files(directory)
    stored = sum(math.prod(entry["shape"]) for path in files for entry in read_header(path)[0].values())
    check_implied_parameters(config, directory / CONFIG_FILE, stored)
    return files


def read_config(directory) -> dict:
    """config.json of a model directory: a JSON object inside it whose known fields are of their kinds."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{directory}: no config.json; is it a Hugging Face model directory?")
    config = read_json_object(require_inside(directory, path))
    check_config_fields(config, path)
    return config


def unreadable(directory, what: str, error: BaseException) -> ConversionError:
    """The one-line refusal of a directory whose `what` (its model, its tokenizer) transformers fails to read: any
    exception of that reading is about the files (their parsing is all it does), so it is named, not a traceback."""
    return ConversionError(f"{directory}: transformers cannot read its {what} ({model_directory.failure_text(error)}): "
                           "fix the setting or file it names, or use a directory that transformers' from_pretrained "
                           "loads")


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`, size bounded; a ConversionError naming the file if it is anything else."""
    return model_directory.read_json_object(path, error=ConversionError)


def require_inside(directory: Path, path: Path, action: str = "read it") -> Path:
    """`path` if it resolves inside the model directory `directory` (hub-cache links excepted); a ConversionError
    naming it if a symlink (or `..`) leads it elsewhere."""
    return model_directory.require_inside(directory, path, error=ConversionError, what=MODEL_DIRECTORY,
                                          action=action)


def require_regular(path: Path) -> Path:
    """`path` if it is a regular file; a ConversionError naming it otherwise."""
    return model_directory.require_regular(path, error=ConversionError)


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of `directory`: the index's shards (each a file inside the directory), else
    model.safetensors, else every *.safetensors. Pickle-only weights are refused by name."""
    index = directory / INDEX_FILE
    if index.exists():
        return index_shards(directory, index)
    if (directory / SINGLE_FILE).exists():
        return [require_regular(require_inside(directory, directory / SINGLE_FILE))]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return [require_regular(require_inside(directory, path)) for path in files]
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in directory.glob(pattern))
    if pickles:
        raise ConversionError(
            f"{directory / pickles[0]} holds pickle weights, which megatron_ext never loads (unpickling can run "
            f"code) and {directory} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}): {SAFE_FORMAT_FIX}")
    raise ConversionError(f"{directory}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); "
                          f"is it a Hugging Face model directory?")


def index_shards(directory: Path, index: Path) -> list[Path]:
    """The shard files `index` names: relative names of regular files inside `directory`."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index} has no weight_map (tensor name -> shard file): is the index complete?")
    shards = {}
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name or "\0" in name:
            raise ConversionError(f"{index}: tensor {tensor!r} names shard {name!r}, which is not a file name")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ConversionError(f"{index}: tensor {tensor!r} lies in shard {name!r}, outside {directory}: shards "
                                  f"must be files inside the model directory (relative names, no '..')")
        shards.setdefault(name, tensor)
    files = []
    for name, tensor in sorted(shards.items()):
        path = directory / name
        if not path.exists():
            raise ConversionError(f"{index}: shard {name} (of tensor {tensor!r}) is not in {directory}: "
                                  "is the download complete?")
        files.append(require_regular(require_inside(directory, path)))
    return files


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's checked header (tensor name -> dtype, shape, data_offsets; `__metadata__` left out)
    and where its data begins. Every claim is checked against the file before anything is allocated."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
            raise ConversionError(f"{path} is not a safetensors file: its header length ({length}) is not between "
                                  f"1 and the file's {max(size - 8, 0)} remaining bytes; is the file damaged?")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ConversionError(f"{path}: its safetensors header is not valid JSON; is the file damaged?") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: its safetensors header is not a JSON object; is the file damaged?")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ConversionError(f"{path}: its safetensors __metadata__ is not a map of strings; is the file damaged?")
    data_start = 8 + length
    ranges = sorted((_check_entry(path, name, entry, size - data_start), name) for name, entry in header.items())
    end = 0
    for (begin, stop), name in ranges:
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else f"leaves bytes {end}..{begin} unaccounted for"
            raise ConversionError(f"{path}: tensor {name} (data_offsets {begin}..{stop}) {what}; is the file damaged?")
        end = stop
    if end != size - data_start:
        raise ConversionError(f"{path}: its tensors end at byte {end} of the {size - data_start} data bytes the file "
                              "holds; is the file cut short or damaged?")
    return header, data_start


def _check_entry(path: Path, name: str, entry, data_bytes: int) -> tuple[int, int]:
    """(begin, end) of one tensor's header entry, checked: its dtype known, its shape's bytes its byte range, the
    range inside the file's `data_bytes`."""
    if not isinstance(entry, dict):
        raise ConversionError(f"{path}: tensor {name} has no dtype/shape/data_offsets entry; is the file damaged?")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise ConversionError(f"{path}: tensor {name} has dtype {str(dtype)[:40]!r}, which megatron_ext does not "
                              f"read (one of {', '.join(DTYPE_SIZES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ConversionError(f"{path}: tensor {name} has shape {str(shape)[:80]}, not a list of sizes >= 0; "
                              "is the file damaged?")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) \
            or offsets[0] > offsets[1] or offsets[1] > data_bytes:
        raise ConversionError(f"{path}: tensor {name} has data_offsets {str(offsets)[:80]}, not a byte range inside "
                              f"the file's {data_bytes} data bytes; is the file cut short or damaged?")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if nbytes != offsets[1] - offsets[0]:
        raise ConversionError(f"{path}: tensor {name} is {dtype} {shape} ({nbytes} bytes), but its data_offsets "
                              f"span {offsets[1] - offsets[0]} bytes; is the file damaged?")
    return offsets[0], offsets[1]


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
