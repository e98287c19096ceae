"""The README and the reference pages under docs/ name the tests that show their claims: every test they name
exists (its file, and the function in it), and every claim of the reference pages names one or says why none
can ("no test: ...")."""

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
# the pages whose claims name their tests: the README and the reference pages moved out of it
CLAIM_PAGES = ("README.md", "docs/training.md", "docs/checkpoints.md", "docs/convert.md", "docs/eval.md",
               "docs/serving.md")
# every page that may name a test: those, and the other hand-written pages (not the generated results)
PAGES = sorted({*CLAIM_PAGES, *(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))})

TEST_REFERENCE = re.compile(r"\btests/([\w/]+\.py)(?:::(\w+))?")
NO_TEST = "no test:"


def test_references(text: str) -> list[tuple[str, str | None]]:
    """(file under tests/, function or None) for each `tests/FILE.py[::NAME]` in `text`."""
    return [(match.group(1), match.group(2)) for match in TEST_REFERENCE.finditer(text)]


test_references.__test__ = False  # a helper, not a test


@cache
def defined_names(test_file: str) -> frozenset[str]:
    """The functions and classes a test file defines, at any depth (methods of test classes too)."""
    tree = ast.parse((ROOT / "tests" / test_file).read_text())
    return frozenset(node.name for node in ast.walk(tree)
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))


def missing_tests(text: str) -> list[str]:
    """Each reference in `text` to a test file that is not there, or to a function its file does not define."""
    missing = []
    for test_file, name in test_references(text):
        if not (ROOT / "tests" / test_file).is_file():
            missing.append(f"tests/{test_file} (no such file)")
        elif name is not None and name not in defined_names(test_file):
            missing.append(f"tests/{test_file}::{name} (no such function)")
    return missing


def claims(text: str) -> list[str]:
    """The list items of a Markdown page, each with its continuation lines (code blocks and tables left out)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    items, current = [], None
    for line in text.splitlines():
        if re.match(r"- ", line):
            current = [line]
            items.append(current)
        elif current is not None and line.startswith("  ") and line.strip():
            current.append(line)
        else:
            current = None
    return [" ".join(part.strip() for part in item) for item in items]


def claims_without_a_test(text: str) -> list[str]:
    return [claim for claim in claims(text) if not test_references(claim) and NO_TEST not in claim]


@pytest.mark.parametrize("page", PAGES)
def test_every_test_a_page_names_exists(page):
    assert missing_tests((ROOT / page).read_text()) == []


@pytest.mark.parametrize("page", CLAIM_PAGES)
def test_every_claim_of_a_page_names_its_test(page):
    text = (ROOT / page).read_text()
    assert claims(text), f"{page} has no list of claims"
    assert claims_without_a_test(text) == []


def test_every_workflow_of_the_readmes_tour_names_its_tests():
    tour = (ROOT / "README.md").read_text().split("\n## A tour\n", 1)[1].split("\n## ", 1)[0]
    sections = tour.split("\n### ")[1:]
    assert len(sections) >= 6
    assert [section.splitlines()[0] for section in sections if not test_references(section)] == []


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
DOTTED_NAME = re.compile(r"`(megatron_ext(?:\.\w+)+)")


def missing_links(page: str) -> list[str]:
    """The relative links of a page whose target is not there (web addresses left alone)."""
    text = (ROOT / page).read_text()
    return [target for target in LINK.findall(text)
            if "://" not in target and not ((ROOT / page).parent / target).exists()]


def undefined_names(text: str) -> list[str]:
    """Each `megatron_ext.module.name` in `text` that names no module, or no name its module defines (read from the
    source: a def, class, assignment or import, or a name in its lazy table or __all__), importing nothing."""
    undefined = []
    for dotted in sorted(set(DOTTED_NAME.findall(text))):
        parts = dotted.split(".")
        for split in range(len(parts), 0, -1):  # the longest prefix that is a module or package
            base = ROOT.joinpath(*parts[:split])
            source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
            if source.is_file():
                break
        else:
            undefined.append(dotted)
            continue
        rest = parts[split:]
        defined = rf"^(def|class) {rest[0]}\b|^{rest[0]} *[:=]|^from \S+ import .*\b{rest[0]}\b|\"{rest[0]}\"" \
            if rest else ""
        if len(rest) > 1 or (rest and not re.search(defined, source.read_text(), re.M)):
            undefined.append(dotted)
    return undefined


@pytest.mark.parametrize("page", CLAIM_PAGES)
def test_every_link_and_name_a_page_gives_is_there(page):
    """A moved module or a renamed function leaves no stale pointer (e.g. a writer that moved to another package)."""
    assert missing_links(page) == []
    assert undefined_names((ROOT / page).read_text().replace("megatron_ext.json", "")) == []


def test_a_renamed_or_removed_test_is_caught():
    """The checks catch what they are for: a misspelt function, a missing file, a claim naming no test."""
    assert missing_tests("(tests/test_docs_claims.py::test_a_renamed_or_removed_test_is_caught)") == []
    assert missing_tests("(tests/test_docs_claims.py::test_that_was_renamed)") == [
        "tests/test_docs_claims.py::test_that_was_renamed (no such function)"]
    assert missing_tests("see tests/test_nowhere.py") == ["tests/test_nowhere.py (no such file)"]
    page = ("- a claim (tests/test_docs_claims.py::test_a_renamed_or_removed_test_is_caught)\n"
            "- a claim over two lines, its test\n  on the second (tests/test_docs_claims.py::claims)\n"
            "- a claim with none\n- a limit (no test: needs a GPU)\n")
    assert claims_without_a_test(page) == ["- a claim with none"]
    assert undefined_names("`megatron_ext.data.passkey_data.write_passkey_dataset`, `megatron_ext.rope`") == []
    assert undefined_names("`megatron_ext.data.retrieval.write_passkey_dataset` `megatron_ext.nowhere`") == [
        "megatron_ext.data.retrieval.write_passkey_dataset", "megatron_ext.nowhere"]


def test_the_pages_name_hundreds_of_tests():
    """The count quoted in the closing note of issue 29: distinct tests named by the README and the moved pages."""
    named = {reference for page in CLAIM_PAGES for reference in test_references((ROOT / page).read_text())
             if reference[1] is not None}
    assert len(named) >= 150, len(named)
