"""The one CLI contract (megatron_ext/cli.py): every subcommand reports a mistake the user can fix as one
line `megatron-ext <command>: <message>` on stderr, exit code 2, no traceback; other errors keep theirs."""
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/megatron_ext"

BAD_INPUT = {  # subcommand -> (arguments, a phrase the message must contain)
    "preprocess": (["--input", f"{MISSING}/a.jsonl", "--output-prefix", "out/data",
                    "--tokenizer-model", f"{MISSING}/t.model"], "--tokenizer-model"),
    "train": (["--config", f"{MISSING}/train.yaml"], "--config"),
    "eval": (["passkey", "--model", f"{MISSING}/ckpt", "--lengths", "64"], "--model"),
    "convert": (["mcore-to-hf", "--ckpt", f"{MISSING}/ckpt", "--out", f"{MISSING}/hf"], "--ckpt"),
    "plan": (["--config", f"{MISSING}/train.yaml", "--gpus", "8"], "--config"),
    "launch": (["--config", f"{MISSING}/train.yaml", "--nodes", "1"], "--config"),
    "repro": (["--config", f"{MISSING}/repro.yaml"], "--config"),
    "serve": (["--model", f"{MISSING}/ckpt"], "--model"),
}


def test_every_subcommand_has_a_bad_input_case():
    assert set(BAD_INPUT) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(BAD_INPUT))
def test_bad_input_is_one_line_with_exit_code_2(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, and if it were, not into the repository
    arguments, phrase = BAD_INPUT[command]
    assert main([command, *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megatron-ext {command}: ") and err.count("\n") == 1, err
    assert phrase in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--config", "x.yaml", "--nproc-per-node", "two"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-ext train: ") and err.count("\n") == 1 and "--nproc-per-node" in err


def test_other_errors_keep_their_traceback(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr("megatron_ext.cli.build_parser", lambda: _parser_with(broken))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", "--config", "x.yaml"])


def _parser_with(func):
    """The real parser, with `train` bound to `func`."""
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command")
    subcommands.choices["train"].set_defaults(func=func)
    return parser


@pytest.mark.slow
def test_the_installed_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.cli", "train", "--config", str(tmp_path / "none.yaml")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"megatron-ext train: --config {tmp_path / 'none.yaml'}: no such file; see examples/configs/*.yaml"]


def test_a_missing_pretrained_checkpoint_is_named_by_its_setting(capsys, tmp_path):
    config = ROOT / "examples" / "configs" / "tiny_harpe_cpu.yaml"
    code = main(["train", "--config", str(config), "--set", f"checkpoint.dir={tmp_path / 'run'}",
                 "--set", f"checkpoint.pretrained={MISSING}/converted"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megatron-ext train: checkpoint.pretrained ('{MISSING}/converted') does not exist")
    assert not (tmp_path / "run").exists()


def test_building_the_parser_imports_neither_torch_nor_megatron():
    """Every `megatron-ext` call builds the whole parser first: torch alone costs ~1 s there, megatron ~4 s.
    A fresh interpreter, since this test process has imported both long ago."""
    probe = ("import sys; from megatron_ext.cli import build_parser; build_parser(); "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron', 'transformers'}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", result.stdout
