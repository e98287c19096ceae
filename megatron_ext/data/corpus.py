"""A tiny training corpus built offline from real text: the Python standard library's code and docstrings,
plus synthetic passkey-retrieval documents whose answer lies far from its question. Standard library only."""

import ast
import json
import os
import random
import sysconfig
import warnings
from pathlib import Path

CODE_SOURCE = "stdlib_code"
DOC_SOURCE = "stdlib_doc"
PASSKEY_SOURCE = "synthetic_passkey"

PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
PASSKEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is {key}."

_SKIPPED_DIRS = {"__pycache__", "site-packages", "dist-packages", "test", "tests", "idle_test"}
_MIN_CODE_CHARS = 400  # empty __init__.py files and one-line shims teach nothing
_MIN_DOCSTRING_CHARS = 400
_MIN_FILLER_MODULES = 40  # passkey filler comes from at least this many modules' docstrings
_FILLER_PARAGRAPH_CHARS = (40, 1_000)  # shortest, longest: no fragments, and depths stay fine-grained
_DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def build_tiny_corpus(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_documents: int = 400,
    retrieval_fraction: float = 0.3,
    max_document_chars: int = 16_000,
    passkey_chars: tuple[int, int] = (2_000, 24_000),
) -> Path:
    """Write `out_dir/tiny_corpus.jsonl` (`{"text", "source"}` per line) and return its path.

    round(num_documents * retrieval_fraction) documents are passkey retrieval (source "synthetic_passkey"):
    `PASSKEY_INTRO`; docstring paragraphs as filler, as many characters as drawn from `passkey_chars`
    (rounded up to whole paragraphs), with `PASSKEY_SENTENCE` at a random depth; `PASSKEY_QUESTION` with
    the answer at the end. Of the rest, half (rounded down) are the docstrings of one module each
    ("stdlib_doc"), the others the source of one module each ("stdlib_code"); no module is used twice, and
    each is cut at a line or paragraph boundary to `max_document_chars`.

    The same seed on the same Python installation gives the same bytes; another Python version has another
    standard library and so another corpus.
    """
    _check_arguments(num_documents, retrieval_fraction, max_document_chars, passkey_chars)
    num_passkey = round(num_documents * retrieval_fraction)
    num_doc = (num_documents - num_passkey) // 2
    num_code = num_documents - num_passkey - num_doc

    rng = random.Random(seed)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = _stdlib_modules(stdlib)
    rng.shuffle(modules)
    code_documents, remaining = _code_documents(stdlib, modules, num_code, max_document_chars)
    docstring_texts = _docstring_texts(stdlib, remaining, max(num_doc, _MIN_FILLER_MODULES), max_document_chars)
    if len(code_documents) < num_code or len(docstring_texts) < num_doc:
        raise ValueError(
            f"num_documents ({num_documents}) needs {num_code} modules with code and {num_doc} more with docstrings, "
            f"but {stdlib} has only {len(code_documents)} and {len(docstring_texts)}: lower num_documents"
        )
    filler = _filler_paragraphs(docstring_texts)
    if num_passkey and not filler:
        raise ValueError(f"{stdlib} has no docstring prose to fill passkey documents: set retrieval_fraction=0")
    passkey_documents = [_passkey_document(rng, filler, passkey_chars) for _ in range(num_passkey)]

    documents = (
        [(text, CODE_SOURCE) for text in code_documents]
        + [(text, DOC_SOURCE) for text in docstring_texts[:num_doc]]
        + [(text, PASSKEY_SOURCE) for text in passkey_documents]
    )
    rng.shuffle(documents)
    out_path = Path(out_dir) / "tiny_corpus.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8", newline="\n") as out:
        for text, source in documents:
            out.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
    return out_path


def _check_arguments(num_documents, retrieval_fraction, max_document_chars, passkey_chars) -> None:
    if num_documents < 1:
        raise ValueError(f"num_documents ({num_documents}) must be >= 1")
    if not 0.0 <= retrieval_fraction <= 1.0:
        raise ValueError(f"retrieval_fraction ({retrieval_fraction}) must lie in [0, 1]")
    if max_document_chars < _MIN_CODE_CHARS:
        raise ValueError(f"max_document_chars ({max_document_chars}) must be >= {_MIN_CODE_CHARS}")
    shortest, longest = passkey_chars
    if not 0 < shortest <= longest:
        raise ValueError(f"passkey_chars ({passkey_chars}) must be (shortest, longest) with 0 < shortest <= longest")


def _stdlib_modules(stdlib: Path) -> list[Path]:
    """`.py` files under the standard library (tests and site-packages left out), relative, sorted."""
    modules = []
    for directory, subdirectories, files in os.walk(stdlib):
        subdirectories[:] = sorted(name for name in subdirectories if name not in _SKIPPED_DIRS)
        modules += [Path(directory, name).relative_to(stdlib) for name in sorted(files) if name.endswith(".py")]
    return modules


def _read_source(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _truncate(text: str, max_chars: int, separator: str) -> str:
    """The longest prefix of `text` within `max_chars` that ends at a `separator`."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind(separator, 0, max_chars)
    return text[: cut if cut > 0 else max_chars]


def _code_documents(stdlib: Path, modules: list[Path], count: int, max_chars: int) -> tuple[list[str], list[Path]]:
    """`count` module sources (in `modules` order) and the modules not looked at yet."""
    documents = []
    for position, module in enumerate(modules):
        if len(documents) == count:
            return documents, modules[position:]
        source = _read_source(stdlib / module)
        if source is not None and len(source) >= _MIN_CODE_CHARS:
            documents.append(_truncate(f"# file: {module.as_posix()}\n{source}", max_chars, "\n"))
    return documents, []


def _docstring_texts(stdlib: Path, modules: list[Path], count: int, max_chars: int) -> list[str]:
    """Up to `count` texts, each the docstrings of one module with a heading per class or function."""
    texts = []
    for module in modules:
        if len(texts) == count:
            break
        source = _read_source(stdlib / module)
        text = _module_docstrings(source, module) if source is not None else ""
        if len(text) >= _MIN_DOCSTRING_CHARS:
            texts.append(_truncate(text, max_chars, "\n\n"))
    return texts


def _module_docstrings(source: str, module: Path) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    nodes = sorted((node for node in ast.walk(tree) if isinstance(node, _DOCSTRING_NODES)),
                   key=lambda node: getattr(node, "lineno", 0))
    sections = []
    for node in nodes:
        docstring = ast.get_docstring(node)
        if docstring:
            heading = f"# {module.with_suffix('').as_posix()}" if isinstance(node, ast.Module) else f"## {node.name}"
            sections.append(f"{heading}\n\n{docstring}")
    return "\n\n".join(sections)


def _filler_paragraphs(docstring_texts: list[str]) -> list[str]:
    """Prose paragraphs of the docstrings, each on one line (headings, doctests, very short or long ones left out)."""
    paragraphs = []
    for text in docstring_texts:
        for block in text.split("\n\n"):
            paragraph = " ".join(block.split())
            shortest, longest = _FILLER_PARAGRAPH_CHARS
            if shortest <= len(paragraph) <= longest and not paragraph.startswith("#") and ">>>" not in paragraph:
                paragraphs.append(paragraph)
    return paragraphs


def _passkey_document(rng: random.Random, filler: list[str], passkey_chars: tuple[int, int]) -> str:
    target_chars = rng.randint(*passkey_chars)
    key = rng.randint(10_000, 99_999)
    paragraphs, length = [], 0
    while length < target_chars:
        paragraphs.append(rng.choice(filler))
        length += len(paragraphs[-1]) + 2
    paragraphs.insert(rng.randint(0, len(paragraphs)), PASSKEY_SENTENCE.format(key=key))
    return "\n\n".join([PASSKEY_INTRO, *paragraphs, PASSKEY_QUESTION.format(key=key)])
