"""`megatron-ext serve`: refusals before anything starts, and vLLM's OpenAI server answering with the model's tokens."""

import json
import socket
import subprocess
import time
import urllib.request

import pytest
from serve_models import SERVE_PYTHON, build_export, harpe_rope, needs_serve_env, prompt, transformers_greedy

from megatron_ext.cli import main

pytest_plugins = ["test_eval_support"]  # sp_tokenizer


def test_missing_vllm_is_one_line_naming_the_install_command(tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    assert main(["serve", "--model", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("megatron-ext serve: vLLM is not installed") and "make serve-env" in error
    assert len(error.splitlines()) == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "/no/such/model"], "--model ('/no/such/model') does not exist"),
    (["--model", ".", "--port", "0"], "--port (0) must be a positive number"),
])
def test_bad_arguments_are_named(argv, message, capsys, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # as if vLLM were installed
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_dynamic_ntk_harpe_export_is_refused_by_name(tmp_path, capsys, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    config = {"architectures": ["HarpeLlamaForCausalLM"], "model_type": "llama", "num_attention_heads": 4,
              "num_key_value_heads": 2, "hidden_size": 128, "max_position_embeddings": 32,
              "rope_parameters": {"rope_type": "harpe", "rope_theta": 10000.0, "scaling": "dynamic",
                                  "scaling_params": {"factor": 4.0, "original_max_position_embeddings": 32},
                                  "head_bases": [100.0, 1e5]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "RoPE scaling 'dynamic' (dynamic NTK) cannot be served" in capsys.readouterr().err


def test_stock_rope_named_as_harpe_is_refused(tmp_path, capsys, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    config = {"architectures": ["HarpeQwen2ForCausalLM"], "model_type": "qwen2", "num_attention_heads": 4,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "set architectures to ['Qwen2ForCausalLM']" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.mark.slow
@needs_serve_env
def test_openai_server_completion_returns_the_models_greedy_tokens(tmp_path, single_rank):
    """A checkpoint given to `megatron-ext serve` is exported, served on 127.0.0.1, and a completions request
    returns transformers' greedy tokens for a prompt beyond the training window."""
    export, _ = build_export(tmp_path / "model", rope=harpe_rope(), family="llama")
    checkpoint = tmp_path / "model" / "ckpt"
    port = _free_port()
    command = [str(SERVE_PYTHON), "-m", "megatron_ext.cli", "serve", "--model", str(checkpoint), "--port", str(port),
               "--dtype", "float32", "--max-model-len", "256", "--export-dir", str(tmp_path / "exports"),
               "--", "--enforce-eager", "--max-num-seqs", "4"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 900
        while True:
            assert server.poll() is None, server.stdout.read()[-5000:]
            assert time.monotonic() < deadline, "the server did not answer in 15 minutes"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                time.sleep(3)
        ids = prompt(80, 7)
        served_name = str(tmp_path / "exports" / "iter_0000150")
        answer = _post(f"http://127.0.0.1:{port}/v1/completions",
                       {"model": served_name, "prompt": ids, "max_tokens": 8, "temperature": 0.0,
                        "return_token_ids": True, "ignore_eos": True})
        tokens = answer["choices"][0]["token_ids"]
        assert tokens == transformers_greedy(tmp_path / "exports" / "iter_0000150", [ids], 8)[0]["tokens"]
        assert (tmp_path / "exports" / "iter_0000150" / "config.json").is_file()
    finally:
        import psutil

        try:
            spawned = [server.pid] + [child.pid for child in psutil.Process(server.pid).children(recursive=True)]
        except psutil.NoSuchProcess:  # it died on its own: the assertion above says why
            spawned = []
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    assert _still_running(spawned, within_s=60) == [], "SIGTERM left vLLM's server or its engine running"


def _still_running(pids: list[int], within_s: float) -> list[int]:
    """Which of `pids` still run after waiting up to within_s for them to end."""
    import psutil

    deadline = time.monotonic() + within_s
    while True:
        left = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(2)


@pytest.mark.slow  # trains a tokenizer, saves and exports a checkpoint (~25 s)
def test_a_checkpoint_without_its_own_tokenizer_is_exported_with_the_named_one(tmp_path, single_rank, sp_tokenizer):
    """A checkpoint recording a tokenizer outside itself (written by hand, or by an older megatron_ext) is refused by
    convert's rule, naming --tokenizer; `serve --tokenizer PATH` exports it with that tokenizer."""
    from test_serve_lm_eval import save_harpe_checkpoint

    from megatron_ext.errors import UserError
    from megatron_ext.serve.server import export_dir_for

    checkpoint = save_harpe_checkpoint(tmp_path, sp_tokenizer)
    with pytest.raises(UserError, match="outside the checkpoint.*--tokenizer"):
        export_dir_for(str(checkpoint), None)
    export = export_dir_for(str(checkpoint), None, str(sp_tokenizer.path))
    assert export == checkpoint / "hf_exports" / "iter_0000005"
    assert (export / "config.json").is_file() and (export / "tokenizer.model").is_file()


def _pickle_only_directory(directory):
    """A Llama directory whose only weights are a pickle that would write `ran` next to it when unpickled."""
    import pickle

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_attention_heads": 4,
              "num_key_value_heads": 2, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "vocab_size": 128, "max_position_embeddings": 64}
    (directory / "config.json").write_text(json.dumps(config))

    class Payload:
        def __reduce__(self):
            return (open, (str(directory / "ran"), "w"))

    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))


def test_a_hostile_export_is_refused_before_vllm_is_asked_for(tmp_path, capsys, monkeypatch):
    """serve vets a Hugging Face directory as eval and convert do (here: pickle-only weights), before it looks
    for vLLM, and nothing of the directory runs."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    _pickle_only_directory(tmp_path)
    assert main(["serve", "--model", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "pytorch_model.bin holds pickle weights" in error, error
    assert not (tmp_path / "ran").exists()


def test_vllm_is_told_to_load_safetensors_only(tmp_path):
    from megatron_ext.serve.server import vllm_command

    command = vllm_command(tmp_path, host="127.0.0.1", port=8000, max_model_len=None, tensor_parallel_size=1,
                           dtype="float32", on_gpu=False, extra=[])
    assert command[command.index("--load-format") + 1] == "safetensors"
    chosen = vllm_command(tmp_path, host="127.0.0.1", port=8000, max_model_len=None, tensor_parallel_size=1,
                          dtype="float32", on_gpu=False, extra=["--load-format", "dummy"])
    assert chosen.count("--load-format") == 1 and chosen[-1] == "dummy"
