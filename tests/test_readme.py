"""README.md: its first lines give the two commands a newcomer runs, and its code runs as written (the "Using the
pieces" snippet, in a fresh Python on CPU). The tests its claims name: tests/test_docs_claims.py."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def readme_python(section: str) -> str:
    """The one ```python block under the README heading `## <section>`."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", body, re.S)
    return code


def test_the_first_lines_give_the_main_job_on_the_tiny_default_and_the_test_suite():
    """The first code block, before any other text: `make quickstart` (a tiny HARPE run on CPU, the main job on the
    tiny default) and `make test`, each a target of the Makefile."""
    text = (ROOT / "README.md").read_text()
    title, rest = text.split("\n", 1)
    assert title.startswith("# ") and rest.lstrip().startswith("```bash\n")
    first_block = rest.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert commands == ["make quickstart", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("quickstart", "test"):
        assert re.search(rf"^{target}:", makefile, re.M), target
    assert "tiny_harpe" in makefile.split("\nquickstart:", 1)[1].split("\n\n", 1)[0]


@pytest.mark.slow  # end to end: a fresh interpreter builds megatron's model (make test-fast skips it)
def test_using_the_pieces_snippet_runs_on_cpu(tmp_path):
    """A fresh interpreter (no process group yet, as a reader's would be); after the snippet, the logits are
    one per token and vocabulary entry, and the PoSE ids of 512 tokens stay below the 16k target."""
    check = ("\nprint(tuple(logits.shape), bool(logits.isfinite().all()), position_ids.shape[-1],"
             " int(position_ids.max()) < 16384, len(bases))\n")
    result = subprocess.run([sys.executable, "-c", readme_python("Using the pieces") + check], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.splitlines()[-1] == "(1, 512, 32000) True 512 True 32"
