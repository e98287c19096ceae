"""The Dockerfile, read as text (no Docker engine in CI): a pinned NGC PyTorch base whose torch,
Transformer Engine and apex are kept, and this package installed with setup.py's requirements."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines() if line.strip()]


def base_image(steps) -> str:
    args = {}
    for op, rest in steps:
        if op == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value
        if op == "FROM":
            return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], rest.split()[0])
    raise AssertionError("no FROM")


def pip_installs(steps) -> list[str]:
    commands = [part.strip() for op, rest in steps if op == "RUN" for part in re.split(r"&&|;", rest)]
    return [c for c in commands if re.match(r"(python3? -m )?pip3? install", c)]


def test_base_is_a_pinned_ngc_pytorch_image():
    image = base_image(instructions(ROOT / "Dockerfile"))
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", image), image  # a dated tag, not latest


def test_requirements_come_from_setup_py_and_the_container_keeps_its_gpu_stack():
    steps = instructions(ROOT / "Dockerfile")
    installs = pip_installs(steps)
    assert installs == ['pip install ".[dev]"', "pip install --no-deps ."], installs
    assert any(op == "COPY" and rest.split()[0] == "setup.py" for op, rest in steps)
    everything = " ".join(installs)
    for package in ("apex", "torch", "transformer-engine", "transformer_engine", "[gpu]", "-r ", "requirements"):
        assert package not in everything, package  # PyPI 'apex' is an unrelated package; TE and torch are NGC's
    setup = (ROOT / "setup.py").read_text()
    assert '"megatron-core>=0.16.0,<0.17"' in setup


def test_build_context_leaves_out_local_state():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "**/__pycache__", "*.sqsh"} <= set(ignored)
