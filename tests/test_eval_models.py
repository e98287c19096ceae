"""Models behind EvalModel: a saved checkpoint gives the saved model's logits at TP=PP=1 and at TP=2 / PP=2 (gloo
ranks), chosen rows equal the full logits' rows, and the loader tells checkpoints from Hugging Face directories."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.eval.models import MegatronExtModel, load_eval_model

from test_eval_support import SP_VOCAB

pytest_plugins = ["test_eval_support"]

WORKER = Path(__file__).with_name("test_eval_parallel_worker.py")


@pytest.fixture(scope="module")
def checkpoint(single_rank, sp_tokenizer, tmp_path_factory):
    """A HARPE model (4 heads, 2 KV groups) saved at TP=PP=1 as training would save it; (root, the model)."""
    from megatron_ext.checkpoint.state import CheckpointState
    from megatron_ext.checkpoint.store import save_checkpoint
    from megatron_ext.rope import RopeConfig
    from megatron_ext.config import ModelConfig, TrainConfig
    from megatron_ext.models.builder import build_gpt

    config = TrainConfig(
        model=ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=128, seq_length=128, init_method_std=0.3),
        rope=RopeConfig(head_base_strategy="uniform", head_base_params={"b_min": 1e3, "b_max": 1e5}))
    torch.manual_seed(0)
    model = build_gpt(config, 640, torch.device("cpu")).eval()
    root = tmp_path_factory.mktemp("checkpoints")
    state = CheckpointState.of_run(config, iteration=7, padded_vocab_size=640, tokenizer_vocab_size=None,
                                   tokenizer_model=str(sp_tokenizer.path), parallel={})
    save_checkpoint(root, 7, model=[model], state=state.to_json())
    return root, model


def saved_model_logits(model, tokens):
    """The saved model's logits over the tokenizer's vocabulary: its padding rows (600 .. 639) are no tokens."""
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.size(1)).expand_as(tokens), None)[..., :SP_VOCAB]


def test_a_checkpoint_root_loads_its_newest_checkpoint_with_the_saved_weights(checkpoint):
    root, saved = checkpoint
    loaded = load_eval_model(root, name="tiny")
    assert isinstance(loaded, MegatronExtModel) and loaded.context_window == 128
    tokens = torch.randint(0, 600, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded.logits(tokens), saved_model_logits(saved, tokens), rtol=0, atol=0)


@pytest.mark.parametrize("model_fixture", ["tiny_megatron", "tiny_llama"])
def test_logits_of_chosen_rows_equal_those_rows_of_the_full_logits(request, model_fixture):
    model = request.getfixturevalue(model_fixture)
    tokens = torch.randint(0, 600, (2, 50), generator=torch.Generator().manual_seed(2))
    rows = torch.tensor([0, 9, 31, 49])
    torch.testing.assert_close(model.logits(tokens, rows=rows), model.logits(tokens)[:, rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_fixture", ["tiny_megatron", "tiny_llama"])
def test_rows_outside_the_tokens_are_refused_not_wrapped(request, model_fixture):
    """Row -1 used to mean the last row under Hugging Face and an IndexError in megatron's output-layer hook."""
    model = request.getfixturevalue(model_fixture)
    tokens = torch.randint(0, 600, (1, 10), generator=torch.Generator().manual_seed(3))
    for rows in (torch.tensor([-1, 0, 1]), torch.tensor([9, 10])):
        with pytest.raises(ValueError, match="outside the 10 positions"):
            model.logits(tokens, rows=rows)


def test_a_checkpoint_argument_is_resolved_once_on_the_way_in(checkpoint, monkeypatch):
    """load_eval_model resolves `--model` once (the root's newest checkpoint, verified) and passes what it found to
    the model loader, which neither resolves nor reads it again."""
    from megatron_ext.checkpoint import state

    resolved = []
    resolve = state.resolve_checkpoint
    monkeypatch.setattr(state, "resolve_checkpoint", lambda argument, **kw: resolved.append(argument) or
                        resolve(argument, **kw))
    root, _ = checkpoint
    loaded = load_eval_model(root)
    assert resolved == [root] and loaded.source == str(root / "iter_0000007")


def test_lengths_too_short_are_refused_with_the_checkpoints_tokenizer_before_its_weights_load(checkpoint, capsys,
                                                                                               monkeypatch):
    """`eval passkey` resolves the checkpoint once, reads its own tokenizer without the weights and refuses a length
    shorter than the prompt's fixed text in one line; the weights are never loaded. A length that fits loads them."""
    from megatron_ext.cli import main
    from megatron_ext.checkpoint import state
    from megatron_ext.models import builder

    resolved, loads = [], []
    resolve = state.resolve_checkpoint
    monkeypatch.setattr(state, "resolve_checkpoint", lambda argument, **kw: resolved.append(argument) or
                        resolve(argument, **kw))
    monkeypatch.setattr(builder, "load_model", lambda *args, **kwargs: loads.append(args) or 1 / 0)
    root, _ = checkpoint
    assert main(["eval", "passkey", "--model", str(root), "--lengths", "200", "20", "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-ext eval: length 20 is too short for this prompt") and "(--lengths)" in err
    assert loads == [] and resolved == [root]
    with pytest.raises(ZeroDivisionError):  # the stand-in loader: reached once the lengths fit
        main(["eval", "passkey", "--model", str(root), "--lengths", "200", "--trials", "1"])
    assert len(loads) == 1 and resolved == [root, root]


def test_a_process_whose_parallel_state_has_other_sizes_is_refused_naming_the_settings(single_rank):
    """Evaluation joins the process group the one way (megatron_ext.distributed.join_parallel_state): inside a
    process that has megatron's parallel state, that state is used when its sizes are the model's, else refused."""
    from megatron_ext.config import ParallelConfig
    from megatron_ext.distributed import LayoutError, join_parallel_state
    from megatron_ext.eval.models import PARALLEL_SIZE_SETTINGS

    assert join_parallel_state(ParallelConfig(), setting=PARALLEL_SIZE_SETTINGS) == torch.device("cpu")
    with pytest.raises(LayoutError, match=r"TP, PP, CP = \(1, 1, 1\) but --tensor/--pipeline/--context-parallel-size "
                                          r"\(suite: .*\) asks for \(2, 1, 1\)"):
        join_parallel_state(ParallelConfig(tensor_model_parallel_size=2), setting=PARALLEL_SIZE_SETTINGS)


def test_a_directory_that_is_no_model_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a megatron_ext checkpoint .* nor a Hugging Face"):
        load_eval_model(tmp_path)


@pytest.mark.distributed
def test_tp2_and_pp2_loads_give_the_tp1_logits_and_attention(checkpoint, tmp_path):
    root, saved = checkpoint
    out = tmp_path / "parallel.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(root), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = torch.load(out)
    tokens, rows = results["tokens"], results["rows"]
    single = MegatronExtModel(saved, load_eval_model(root).tokenizer)
    expected = single.logits(tokens)
    for case in ["tp2_pp1", "tp1_pp2"]:
        torch.testing.assert_close(results[case]["logits"], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[case]["row_logits"], expected[:, rows], rtol=1e-5, atol=1e-5)
    for tp2, tp1 in zip(results["tp2_pp1"]["attention"], single.attention_probs(tokens, rows)):
        torch.testing.assert_close(tp2, tp1, rtol=1e-5, atol=1e-6)


LOAD_THEN_START_A_RUN = """
import os, subprocess, sys
from megatron_ext.eval.models import load_eval_model

names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
before = {name: os.environ.get(name) for name in names}
model = load_eval_model(sys.argv[1])  # the documented API: its process group lives on with the model
assert {name: os.environ.get(name) for name in names} == before, {name: os.environ.get(name) for name in names}
# what a `megatron-ext train` started from this script does first: join the process group its environment names
child = subprocess.run([sys.executable, "-c", "import torch; torch.distributed.init_process_group("
                        "'gloo', init_method='env://' if 'RANK' in __import__('os').environ else "
                        "'tcp://127.0.0.1:0', rank=0, world_size=1); print('joined')"],
                       capture_output=True, text=True, timeout=120)
assert child.returncode == 0 and "joined" in child.stdout, child.stderr[-2000:]
print(model.logits(__import__("torch").tensor([[1, 2, 3]])).shape)
"""


@pytest.mark.slow
def test_a_loaded_model_leaves_no_rendezvous_for_the_processes_a_script_starts_next(checkpoint, tmp_path):
    """load_eval_model used to export MASTER_PORT (and RANK, WORLD_SIZE) while its process group listened on that
    port: a training run the same script started afterwards inherited them and failed with EADDRINUSE."""
    root, _ = checkpoint
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    run = subprocess.run([sys.executable, "-c", LOAD_THEN_START_A_RUN, str(root)], capture_output=True, text=True,
                         timeout=300, env=dict(env, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "torch.Size([1, 3, 600])"
