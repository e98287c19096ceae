"""Hugging Face checkpoint files: safetensors read one tensor at a time, written in size-capped
shards one tensor at a time, tokenizer files copied, output directories that appear whole or not at all.

The safetensors format is simple enough to read and write directly (an 8-byte header length, a
JSON header of names, dtypes, shapes and byte ranges, then the data), which lets both directions
hold a single tensor at a time. Imports torch only.
"""

import contextlib
import ctypes
import json
import math
import os
import shutil
import uuid
from pathlib import Path

import torch

from megatron_ext.convert import hf_directory
from megatron_ext.convert.hf_directory import INDEX_FILE, SINGLE_FILE, read_config, read_header, weight_files
from megatron_ext.data import model_directory
from megatron_ext.errors import ConversionError

# Travel with the weights untouched: tokenizers (sentencepiece, tokenizers' JSON, BPE vocab+merges),
# chat templates, and the generation defaults.
TOKENIZER_FILES = (*model_directory.TOKENIZER_FILES, *model_directory.CHAT_TEMPLATE_FILES, "generation_config.json")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face model directory, read one at a time.

    Names, shapes, dtypes and byte ranges come from the safetensors headers (nothing else is read
    up front). `read` copies one tensor's bytes from its file straight into a fresh tensor with a
    plain read: no memory map, so memory holds that tensor once, however large the shard.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.files = weight_files(self.directory)  # safetensors only, every one inside the directory
        self.location: dict[str, tuple[Path, int, int]] = {}  # name -> (file, first byte, end byte)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype | None] = {}
        for path in self.files:
            header, data_start = read_header(path)  # checked against the file: nothing it claims is allocated blind
            for name, entry in header.items():
                if name in self.location:
                    raise ConversionError(f"{path}: tensor {name} is also in {self.location[name][0].name}: "
                                          "which one holds the model's weights cannot be told")
                begin, end = entry["data_offsets"]
                self.location[name] = (path, data_start + begin, data_start + end)
                self.shapes[name] = tuple(entry["shape"])
                self.dtypes[name] = _DTYPES.get(entry["dtype"])

    def read(self, name: str) -> torch.Tensor:
        path, begin, end = self.location[name]
        dtype = self.dtypes[name]
        if dtype is None:
            raise ConversionError(f"{path.name}: tensor {name} has a dtype megatron_ext does not read")
        data = torch.empty(end - begin, dtype=torch.uint8)
        # read into the tensor's own memory (through ctypes: .numpy() would pin its storage's size)
        target = (ctypes.c_ubyte * (end - begin)).from_address(data.data_ptr())
        with open(path, "rb") as handle:
            handle.seek(begin)
            if handle.readinto(target) != end - begin:
                raise ConversionError(f"{path}: tensor {name} is cut short (truncated file?)")
        return data.view(dtype).reshape(self.shapes[name])

    def nbytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    def main_dtype(self) -> torch.dtype:
        """The floating dtype holding most of the weights (what a model 'is stored in')."""
        sizes: dict[torch.dtype, int] = {}
        for name, dtype in self.dtypes.items():
            if dtype is not None and dtype.is_floating_point:
                sizes[dtype] = sizes.get(dtype, 0) + math.prod(self.shapes[name]) * dtype.itemsize
        return max(sizes, key=sizes.get) if sizes else torch.float32

    def lossless_dtype(self) -> torch.dtype:
        """One dtype every floating weight converts to and back exactly: theirs if they share one."""
        floating = {d for d in self.dtypes.values() if d is not None and d.is_floating_point}
        if len(floating) == 1:
            return floating.pop()
        return torch.float64 if torch.float64 in floating else torch.float32


class SafetensorsWriter:
    """Writes a known list of tensors into safetensors shards of at most `max_shard_bytes`, each
    tensor straight to its place in its file as soon as it is given (nothing is buffered), named
    and indexed as transformers' save_pretrained does. A tensor larger than the limit gets a shard
    of its own. `layout`: (name, shape, dtype) in the order the tensors will come.
    """

    def __init__(self, directory: Path, layout: list[tuple[str, tuple, torch.dtype]], max_shard_bytes: int):
        self.directory = Path(directory)
        self.shards: list[list[tuple[str, tuple, torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in layout:
            nbytes = math.prod(shape) * dtype.itemsize
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, tuple(shape), dtype))
            size += nbytes
        count = len(self.shards)
        self.files = ([self.directory / SINGLE_FILE] if count == 1 else
                      [self.directory / f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self.places: dict[str, tuple[Path, int, tuple, torch.dtype]] = {}  # name -> file, byte offset, shape, dtype
        for path, shard in zip(self.files, self.shards):
            self._lay_out(path, shard)
        self.pending = set(self.places)
        self.total_bytes = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in layout)

    def _lay_out(self, path: Path, shard: list) -> None:
        """Write the file's header and give it its full size; remember where each tensor goes."""
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in shard:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        data_start = 8 + len(text)
        with open(path, "wb") as handle:
            handle.write(len(text).to_bytes(8, "little") + text)
            handle.truncate(data_start + offset)
        for name, shape, dtype in shard:
            self.places[name] = (path, data_start + header[name]["data_offsets"][0], shape, dtype)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.pending:
            raise ConversionError(f"tensor {name} is not expected in the output (or was written twice)")
        path, offset, shape, dtype = self.places[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ConversionError(
                f"tensor {name}: got {list(tensor.shape)} {tensor.dtype}, expected {list(shape)} {dtype}")
        tensor = tensor.detach().to("cpu").contiguous()
        with open(path, "r+b") as handle:
            handle.seek(offset)
            handle.write((ctypes.c_ubyte * tensor.nbytes).from_address(tensor.data_ptr()))
        self.pending.discard(name)

    def close(self) -> list[Path]:
        """Check every tensor was written, write the index if sharded; the weight files."""
        if self.pending:
            raise ConversionError(f"tensors never written: {sorted(self.pending)[:4]}")
        if len(self.files) > 1:
            weight_map = {name: path.name for name, (path, *_) in self.places.items()}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return self.files


def present_tokenizer_files(source: Path) -> list[str]:
    """The tokenizer (and generation-config) files in `source`."""
    return [name for name in TOKENIZER_FILES if (Path(source) / name).is_file()]


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    """Copy the tokenizer (and generation-config) files found in `source`; their names. A file that is a
    symlink leaving `source` is refused (see require_inside)."""
    names = present_tokenizer_files(source)
    for name in names:
        require_inside(Path(source), Path(source) / name)
    for name in names:
        destination.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(source) / name, Path(destination) / name)
    return names


def require_inside(source_dir: Path, path: Path) -> Path:
    """`path` if it resolves inside `source_dir`; a ConversionError if a symlink leads it elsewhere (a crafted
    tokenizer.json -> /etc/passwd would be copied into the export); hub-cache links excepted (see
    hf_directory.require_inside)."""
    return hf_directory.require_inside(source_dir, path, "copy it into the export")


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes (transformers' max_shard_size spelling)."""
    if isinstance(text, int):
        return text
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6,
             "KB": 10**3, "B": 1}
    value = str(text).strip().upper()
    for unit, factor in units.items():
        if value.endswith(unit):
            try:
                return int(float(value[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(value)
    except ValueError:
        raise ConversionError(f"max shard size {text!r}: write it like 5GB, 500MB or 2GiB") from None


@contextlib.contextmanager
def staged_directory(out: Path):
    """Yield a hidden sibling directory to write into; rename it to `out` on success, delete it on any error.

    `out` must not exist, or be an empty directory: nothing is overwritten.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"--out {out} already exists and is not empty: choose a new directory or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            out.rmdir()  # the empty directory checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
