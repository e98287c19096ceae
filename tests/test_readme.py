"""README.md's code runs as written: the "Using the pieces" snippet, in a fresh Python on CPU."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end to end: real runs in child processes (make test-fast skips them)

ROOT = Path(__file__).parent.parent


def readme_python(section: str) -> str:
    """The one ```python block under the README heading `## <section>`."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", body, re.S)
    return code


def test_using_the_pieces_snippet_runs_on_cpu(tmp_path):
    """A fresh interpreter (no process group yet, as a reader's would be); after the snippet, the logits are
    one per token and vocabulary entry, and the PoSE ids of 512 tokens stay below the 16k target."""
    check = ("\nprint(tuple(logits.shape), bool(logits.isfinite().all()), position_ids.shape[-1],"
             " int(position_ids.max()) < 16384, len(bases))\n")
    result = subprocess.run([sys.executable, "-c", readme_python("Using the pieces") + check], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.splitlines()[-1] == "(1, 512, 32000) True 512 True 32"
