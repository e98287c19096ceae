"""The rules for the files of a Hugging Face directory (a model's or a tokenizer's), in one place for every reader of
one: the tokenizer layer (data/tokenizer_files.py, before transformers' AutoTokenizer), conversion and evaluation
(convert/hf_directory.py, before our safetensors reader or from_pretrained) and the export's tokenizer copy.

- inside: a file read resolves inside the directory (a symlink or `..` leading out is refused); the one exception is
  the Hugging Face hub cache, whose snapshots/<revision>/ files link to the same repository's blobs/;
- regular: a directory, FIFO or device under a file's name is refused (a FIFO waits forever, a device never ends);
- JSON settings files: a bounded JSON object;
- no custom code: an `auto_map` asks for Python from the directory, which megatron_ext never runs
  (trust_remote_code stays False).

Each check raises the caller's UserError kind (`error`: ConversionError for conversion, TokenizerError for the
tokenizer layer), so a caller's refusals stay of one kind. Standard library only.
"""

import json
from pathlib import Path

from megatron_ext.errors import InputError, UserError

CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# The files of a tokenizer that decide its ids (a fingerprint hashes them, a copy takes them)
TOKENIZER_FILES = ("tokenizer.json", TOKENIZER_CONFIG_FILE, "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model")
# Read with a tokenizer by transformers, though they decide no ids
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# What AutoTokenizer reads of a directory: its files, the chat templates and config.json (model_type picks the class)
TOKENIZER_READ_FILES = (*TOKENIZER_FILES, *CHAT_TEMPLATE_FILES, CONFIG_FILE)
MAX_JSON_BYTES = 64 * 2**20  # config / tokenizer config / index: megabytes at most in real models
# The key of each settings file that names a transformers class, the fix for an auto_map there
CLASS_KEYS = {CONFIG_FILE: "model_type", TOKENIZER_CONFIG_FILE: "tokenizer_class"}


def in_hub_cache(root: Path, target: Path) -> bool:
    """Whether `target` is a blob of the hub-cache repository whose snapshot `root` (resolved) is."""
    return root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs"


def require_inside(directory, path, *, error: type[UserError] = InputError, what: str = "directory",
                   action: str = "read it") -> Path:
    """`path` if it resolves inside `directory` (or is a hub-cache blob of it); `error` naming it, where it leads and
    `what` the directory is, if a symlink (or `..`) leads it elsewhere."""
    root, target = Path(directory).resolve(), Path(path).resolve()
    if target.is_relative_to(root) or in_hub_cache(root, target):
        return Path(path)
    how = "is a symlink to" if Path(path).is_symlink() else "resolves to"
    raise error(f"{path} {how} {target}, outside the {what} {root}: refusing to {action}. Replace the link with the "
                f"file itself if it is meant to be part of the {what}")


def require_regular(path, *, error: type[UserError] = InputError) -> Path:
    """`path` if it is a regular file (after links); `error` naming it otherwise."""
    if not Path(path).is_file():
        raise error(f"{path} is not a regular file (a directory, FIFO or device?): replace it with the real file")
    return Path(path)


def check_present_files(directory, names, *, error: type[UserError] = InputError, what: str = "directory") -> None:
    """Each of the files `names` that `directory` has (a dangling link counts) resolves inside it and is regular."""
    directory = Path(directory)
    for name in names:
        path = directory / name
        if path.is_symlink() or path.exists():
            require_regular(require_inside(directory, path, error=error, what=what), error=error)


def read_json_object(path, *, error: type[UserError] = InputError) -> dict:
    """The JSON object in `path` (a regular file of at most MAX_JSON_BYTES); `error` naming the file otherwise."""
    path = require_regular(path, error=error)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise error(f"{path} is {size} bytes, more than any model's {path.name} ({MAX_JSON_BYTES} at most): is it "
                    "the right file?")
    try:
        loaded = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as problem:
        raise error(f"{path} is not valid JSON: {str(problem).splitlines()[0] if str(problem) else 'too deep'}") \
            from None
    if not isinstance(loaded, dict):
        raise error(f"{path} holds a JSON {type(loaded).__name__}, not an object: is it the right file?")
    return loaded


def refuse_custom_code(directory, files: dict[str, str | None], *, error: type[UserError] = InputError) -> None:
    """Refuse the directory if one of `files` ({settings file name: the auto_map key that matters, None: any}) has
    an `auto_map` that asks for the directory's own Python (a model's config.json may map AutoModel classes to
    code, which a tokenizer reader never loads: it passes None for tokenizer_config.json, "AutoTokenizer" for
    config.json)."""
    directory = Path(directory)
    for name, key in files.items():
        path = directory / name
        if not (path.is_symlink() or path.exists()):
            continue
        auto_map = read_json_object(path, error=error).get("auto_map")
        if isinstance(auto_map, dict):
            wanted = {k: v for k, v in auto_map.items() if key is None or k == key and v}
            text = ", ".join(f"{k}: {v}" for k, v in wanted.items())
        else:
            wanted = text = auto_map
        if wanted:
            raise error(f"{path} asks for custom code (auto_map {str(text)[:200]}), which megatron_ext never runs "
                        f"(trust_remote_code is off): use a directory whose {name} names a transformers class "
                        f"({CLASS_KEYS.get(name, 'model_type')}) and has no auto_map")


_PACKAGE = Path(__file__).resolve().parents[1]  # megatron_ext/


def raised_in_megatron_ext(error: BaseException) -> bool:
    """Whether `error` was raised by megatron_ext's own code (its innermost frame is in this package): a bug of ours,
    which keeps its traceback. Raised inside transformers (or what it calls) while it reads a directory's files,
    the exception is about those files, and the readers name the directory in one line instead."""
    trace = error.__traceback__
    if trace is None:
        return False
    while trace.tb_next is not None:
        trace = trace.tb_next
    return Path(trace.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


def failure_text(error: BaseException) -> str:
    """`Kind: message` of a library's failure on one line, bounded, for a refusal that names the files at fault."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300] or 'no message'}"
