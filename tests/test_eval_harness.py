"""`megatron-ext eval lm-eval`: lm-evaluation-harness scores our checkpoints with our own numbers. Every
loglikelihood the harness receives is log_softmax(EvalModel.logits) summed over the continuation, generate_until
is the plain greedy loop over the logits (here with a KV cache), and a Hugging Face export run through lm-eval's
own `hf` model gets the same scores. Bad input stops with one line before any model loads. Local tasks only
(JSONL + task YAML written here), offline."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from megatron_ext.cli import main
from megatron_ext.eval.harness.decoding import HFCachedDecoder, greedy_tokens, incremental_decoder
from megatron_ext.eval.models import load_eval_model
from megatron_ext.eval.scoring import greedy_generate
from megatron_ext.rope import RopeConfig
from test_eval_vocab import HARPE, save_padded_checkpoint

pytestmark = pytest.mark.slow  # end to end: real runs in child processes (make test-fast skips them)

pytest_plugins = ["test_eval_support"]

QUESTIONS = [  # words the tiny tokenizer knows (test_eval_support.training_text)
    ("The grass is", ["green", "blue", "yellow"], 0),
    ("The sky is", ["green", "blue", "magic"], 1),
    ("The sun is", ["river", "stone", "yellow"], 2),
    ("One of the special magic numbers is", ["1234567", "alpha", "quiz"], 0),
    ("Find all variables that are assigned the", ["value", "river", "text"], 0),
]
PASSAGES = [  # perplexity texts: the longest spans three windows of MAX_LENGTH tokens
    "The grass is green. The sky is blue.",
    "Here we go. There and back again. " * 6,
    "alpha beta gamma delta river stone green blue yellow magic number special hidden text quiz " * 5,
]
MAX_LENGTH = 32  # --max-length of the runs: short, so a passage spans several rolling windows
NEVER = "<never>"  # a stop string the models do not produce: generation runs to max_gen_toks


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


def task_yaml(path, name, data, **fields):
    path.write_text(yaml.safe_dump(dict(task=name, dataset_path="json", test_split="test",
                                        dataset_kwargs={"data_files": {"test": str(data)}}, **fields)))
    return str(path)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Task YAMLs over local JSONL: multiple choice, greedy generation, rolling loglikelihood."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    questions, passages = root / "questions.jsonl", root / "passages.jsonl"
    questions.write_text("".join(json.dumps(dict(question=q, choices=c, answer=a)) + "\n" for q, c, a in QUESTIONS))
    passages.write_text("".join(json.dumps(dict(text=text)) + "\n" for text in PASSAGES))
    return dict(
        choice=task_yaml(root / "choice.yaml", "tiny_choice", questions, output_type="multiple_choice",
                         doc_to_text="{{question}}", doc_to_choice="{{choices}}", doc_to_target="{{answer}}",
                         metric_list=[{"metric": "acc"}]),
        generate=task_yaml(root / "generate.yaml", "tiny_generate", questions, output_type="generate_until",
                           doc_to_text="{{question}}", doc_to_target="{{choices[answer]}}",
                           generation_kwargs={"until": [NEVER], "max_gen_toks": 6, "do_sample": False},
                           metric_list=[{"metric": "exact_match"}]),
        rolling=task_yaml(root / "rolling.yaml", "tiny_rolling", passages, output_type="loglikelihood_rolling",
                          doc_to_text="", doc_to_target="{{text}}", metric_list=[{"metric": "word_perplexity"}]),
    )


@pytest.fixture(scope="module")
def harpe(single_rank, sp_tokenizer, tmp_path_factory):
    """(checkpoint, export) of a HARPE model with padded vocabulary rows (test_eval_vocab's)."""
    return save_padded_checkpoint(tmp_path_factory.mktemp("harpe"), sp_tokenizer, HARPE)


@pytest.fixture(scope="module")
def plain(single_rank, sp_tokenizer, tmp_path_factory):
    """(checkpoint, export) with one RoPE base: lm-eval's own `hf` model (stock transformers) runs the export."""
    return save_padded_checkpoint(tmp_path_factory.mktemp("plain"), sp_tokenizer, RopeConfig())


def run_lm_eval(model, *specs, output, more=()):
    assert main(["eval", "lm-eval", "--model", str(model), "--tasks", *specs, "--max-length", str(MAX_LENGTH),
                 "--batch-size", "2", "--log-samples", "--output-dir", str(output), *more]) == 0
    return json.loads((output / "lm_eval_results.json").read_text())


def samples(output, task):
    return [json.loads(line) for line in (output / f"samples_{task}.jsonl").read_text().splitlines()]


def our_loglikelihood(model, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | BOS context) from one forward pass, in fp32: the continuation's ids are those the
    whole text has after the context's (as lm-eval splits them), at most MAX_LENGTH + 1 ids kept."""
    tokenizer = model.tokenizer
    whole = [tokenizer.bos_id, *tokenizer.encode(context + continuation)]
    continuation_ids = whole[1 + len(tokenizer.encode(context)):]
    ids = whole[-(MAX_LENGTH + 1):]
    logprobs = model.logits(torch.tensor([ids[:-1]])).float().log_softmax(-1)[0, -len(continuation_ids):]
    target = torch.tensor(continuation_ids)
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def our_rolling_loglikelihood(model, text: str) -> float:
    """log p(text | BOS) in lm-eval's windows of MAX_LENGTH predictions: block k predicts tokens [kL, end) from
    the L tokens before token end-1 (the first block: BOS and the tokens before its last)."""
    tokens = model.tokenizer.encode(text)
    stream = [model.tokenizer.bos_id, *tokens]  # token j of the text is stream[j + 1]
    total = 0.0
    for start in range(0, len(tokens), MAX_LENGTH):
        end = min(start + MAX_LENGTH, len(tokens))
        window = stream[max(0, end - MAX_LENGTH):end]  # ends with the token before tokens[end - 1]
        logprobs = model.logits(torch.tensor([window])).float().log_softmax(-1)[0]
        predicted = range(start, end)
        total += sum(float(logprobs[j - (end - len(window)), tokens[j]]) for j in predicted)
    return total


def cut_at(text: str, stop: str) -> str:
    return text.split(stop)[0]


def test_every_loglikelihood_the_harness_receives_is_ours(harpe, tasks, tmp_path):
    """HARPE checkpoint: multiple-choice and rolling loglikelihoods equal our computation; so does the accuracy."""
    checkpoint, _ = harpe
    results = run_lm_eval(checkpoint, tasks["choice"], tasks["rolling"], output=tmp_path)
    model = load_eval_model(checkpoint)
    differences, correct = [], []
    for sample in samples(tmp_path, "tiny_choice"):
        ours = [our_loglikelihood(model, *arguments) for arguments in sample["arguments"]]
        theirs = [response[0] for response in sample["resps"]]
        differences += [abs(a[0] - b[0]) for a, b in zip(ours, theirs)]
        assert [a[1] for a in ours] == [b[1] for b in theirs]
        correct.append(max(range(len(ours)), key=lambda i: ours[i][0]) == sample["target"])
    assert len(differences) == 3 * len(QUESTIONS) and max(differences) < 1e-5
    assert results["results"]["tiny_choice"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    rolling = samples(tmp_path, "tiny_rolling")
    assert len(model.tokenizer.encode(PASSAGES[2])) > 2 * MAX_LENGTH  # three windows
    for sample, text in zip(rolling, PASSAGES):
        assert sample["resps"][0][0] == pytest.approx(our_rolling_loglikelihood(model, text), abs=1e-4)


def test_generate_until_gives_the_greedy_loop_over_the_logits(harpe, tasks, tmp_path):
    checkpoint, _ = harpe
    results = run_lm_eval(checkpoint, tasks["generate"], output=tmp_path)
    model = load_eval_model(checkpoint)
    tokenizer = model.tokenizer
    for sample in samples(tmp_path, "tiny_generate"):
        prompt = [tokenizer.bos_id, *tokenizer.encode(sample["arguments"][0][0])]
        tokens = greedy_generate(model, prompt, 6)  # a full forward pass per token, no cache
        if tokenizer.eos_id in tokens:
            tokens = tokens[:tokens.index(tokenizer.eos_id)]
        assert sample["resps"][0][0] == cut_at(tokenizer.decode(tokens), NEVER)
    assert results["results"]["tiny_generate"]["exact_match,none"] == 0.0  # a random model


@pytest.mark.parametrize("kind", ["checkpoint", "export"])
def test_kv_cached_decoding_gives_the_logits_of_a_full_forward_pass(harpe, kind):
    """Our HARPE checkpoint through megatron-core's static inference context, its export through transformers'
    cache: every step's logits are those of the whole sequence, and the tokens those of the plain loop."""
    from megatron_ext.models.decoding import MegatronCachedDecoder

    model = load_eval_model(harpe[0] if kind == "checkpoint" else harpe[1])
    prompt = model.tokenizer.encode(" The grass is green. The sky is blue. Here we go.")
    with incremental_decoder(model, capacity=len(prompt) + 12) as decoder:
        assert isinstance(decoder, MegatronCachedDecoder if kind == "checkpoint" else HFCachedDecoder)
        sequence, logits = list(prompt), decoder.start(prompt)
        for _ in range(12):
            full = model.logits(torch.tensor([sequence]), rows=torch.tensor([len(sequence) - 1]))[0, -1]
            torch.testing.assert_close(logits, full.float(), rtol=1e-4, atol=1e-4)
            sequence.append(int(logits.argmax()))
            logits = decoder.step(sequence[-1])
    assert greedy_tokens(model, prompt, 12) == greedy_generate(model, prompt, 12) == sequence[len(prompt):]


def test_the_model_side_cache_runs_on_the_bare_model_and_puts_its_attention_back(harpe):
    """megatron_ext.models.decoding needs only the GPT model (no evaluation wrapper): its cached steps give the
    model's own forward logits over the real vocabulary, and every layer gets its core attention back after."""
    from megatron_ext.models.decoding import megatron_cache_works, megatron_cached_decoder

    model = load_eval_model(harpe[0])
    gpt, vocab = model.model, model.vocab_size
    cores = [layer.self_attention.core_attention for layer in gpt.decoder.layers]
    assert megatron_cache_works(gpt) and vocab < gpt.vocab_size  # megatron pads the output layer's rows
    sequence = [5, 17, 42, 8, 99, 3]
    with torch.no_grad(), megatron_cached_decoder(gpt, capacity=len(sequence) + 4, vocab_size=vocab) as decoder:
        logits = decoder.start(sequence)
        for token in (11, 12, 13, 14):
            full = gpt(torch.tensor([sequence]), torch.arange(len(sequence))[None], None)[0, -1, :vocab]
            assert logits.shape == (vocab,)
            torch.testing.assert_close(logits, full.float(), rtol=1e-4, atol=1e-4)
            sequence.append(token)
            logits = decoder.step(token)
    assert [layer.self_attention.core_attention for layer in gpt.decoder.layers] == cores


def test_an_export_through_lm_evals_own_hf_model_scores_as_the_checkpoint(plain, tasks, tmp_path):
    """lm-eval's `hf` model (AutoModelForCausalLM, tokenizer.json) on `convert mcore-to-hf`'s export."""
    from lm_eval.api.registry import get_model

    from megatron_ext.eval.harness.settings import LmEvalSettings
    from megatron_ext.eval.harness.task import run_harness

    checkpoint, export = plain
    ours = run_lm_eval(checkpoint, tasks["choice"], output=tmp_path)
    hf = get_model("hf")(pretrained=str(export), dtype="float32", device="cpu", batch_size=2, max_length=MAX_LENGTH)
    theirs = run_harness(hf, LmEvalSettings(tasks=[tasks["choice"]], log_samples=True))
    assert ours["results"]["tiny_choice"]["acc,none"] == theirs["results"]["tiny_choice"]["acc,none"]
    our_samples = samples(tmp_path, "tiny_choice")
    differences = [abs(a[0][0] - b[0][0]) for mine, hf_sample in zip(our_samples, theirs["samples"]["tiny_choice"])
                   for a, b in zip(mine["resps"], hf_sample["resps"])]
    assert len(differences) == 3 * len(QUESTIONS) and max(differences) < 1e-4


def test_rolling_loglikelihoods_equal_lm_evals_hf_model_without_its_second_bos(plain, tasks, tmp_path):
    """Rolling loglikelihoods (perplexity tasks): lm-eval's `hf` model puts its own prefix token before a
    tokenizer that adds BOS itself, so by default it scores BOS after BOS (a known lm-eval issue). With
    `add_bos_token=False` its windows are ours and the scores equal; by default they differ."""
    from lm_eval.api.registry import get_model

    from megatron_ext.eval.harness.settings import LmEvalSettings
    from megatron_ext.eval.harness.task import run_harness

    checkpoint, export = plain
    run_lm_eval(checkpoint, tasks["rolling"], output=tmp_path)
    ours = [sample["resps"][0][0] for sample in samples(tmp_path, "tiny_rolling")]
    scores = {}
    for add_bos in (False, None):
        options = dict(add_bos_token=add_bos) if add_bos is not None else {}
        hf = get_model("hf")(pretrained=str(export), dtype="float32", device="cpu", batch_size=2,
                             max_length=MAX_LENGTH, **options)
        theirs = run_harness(hf, LmEvalSettings(tasks=[tasks["rolling"]], log_samples=True))
        scores[add_bos] = [sample["resps"][0][0] for sample in theirs["samples"]["tiny_rolling"]]
    assert len(ours) == len(PASSAGES)
    assert max(abs(a - b) for a, b in zip(ours, scores[False])) < 1e-4
    assert min(abs(a - b) for a, b in zip(ours, scores[None])) > 1  # measured: 6.7 to 14.4 nats per passage


def test_a_max_length_beyond_the_trained_window_is_warned_not_refused(plain, tasks, tmp_path, caplog):
    checkpoint, _ = plain  # trained window 512
    assert main(["eval", "lm-eval", "--model", str(checkpoint), "--tasks", tasks["choice"], "--limit", "1",
                 "--max-length", "600", "--output-dir", str(tmp_path)]) == 0
    assert "lm-eval max_length 600 exceeds the trained window 512" in caplog.text
    assert json.loads((tmp_path / "lm_eval.json").read_text())["max_length"] == 600


def one_line_error(capsys, *argv) -> str:
    assert main(["eval", "lm-eval", "--model", "/nonexistent/model", *argv]) == 2  # the model is never loaded
    err = capsys.readouterr().err
    assert err.startswith("megatron-ext eval: lm_eval") and err.count("\n") == 1
    return err


def test_an_unknown_task_name_is_refused_with_the_close_names(capsys):
    assert "lm-eval has no task, group or tag 'hellaswg': did you mean hellaswag" in \
        one_line_error(capsys, "--tasks", "hellaswg")


def test_a_task_whose_data_is_not_on_this_machine_is_refused_naming_the_dataset(tmp_path, capsys):
    spec = tmp_path / "absent.yaml"
    spec.write_text(yaml.safe_dump(dict(task="absent", dataset_path="megatron-ext-tests/absent-dataset",
                                        output_type="multiple_choice", test_split="test", doc_to_text="{{q}}",
                                        doc_to_choice="{{c}}", doc_to_target="{{a}}")))
    err = one_line_error(capsys, "--tasks", str(spec))
    assert "megatron-ext-tests/absent-dataset" in err and "HF_DATASETS_OFFLINE=0" in err


def test_a_missing_lm_eval_install_says_how_to_install_it(monkeypatch, tasks, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` sees without the package
    assert 'pip install -e ".[eval]"' in one_line_error(capsys, "--tasks", tasks["choice"])


def test_no_tasks_is_refused(capsys):
    assert "lm_eval.tasks is empty" in one_line_error(capsys)


def test_a_missing_task_file_is_one_line_and_exit_code_2_in_a_fresh_process(tmp_path):
    run = subprocess.run([sys.executable, "-m", "megatron_ext.cli", "eval", "lm-eval", "--model", "/nonexistent/model",
                          "--tasks", str(tmp_path / "absent.yaml")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr == f"megatron-ext eval: lm_eval.tasks: {tmp_path / 'absent.yaml'} does not exist: give a task " \
                         "YAML file, a directory of them, or an lm-eval task name\n"


def test_the_command_is_lm_eval_with_a_dash_and_the_registered_name_works_too():
    from megatron_ext.cli import build_parser

    for typed in ["lm-eval", "lm_eval"]:
        args = build_parser().parse_args(["eval", typed, "--model", "m", "--tasks", "hellaswag"])
        assert args.eval_task == "lm_eval" and args.setting_tasks == ["hellaswag"]


def test_a_suite_reports_lm_eval_tasks_beside_in_tree_tasks_with_the_difference(plain, harpe, tasks, tmp_path):
    config = dict(title="base vs extended", output_dir=str(tmp_path / "out"), report="report.md",
                  models=[{"path": str(plain[0]), "name": "base"}, {"path": str(harpe[0]), "name": "extended"}],
                  tasks=["passkey", "lm_eval"], passkey=dict(lengths=[96], trials=2),
                  lm_eval=dict(tasks=[tasks["choice"], tasks["rolling"]], max_length=MAX_LENGTH,
                               metadata='{"max_seq_lengths": [64]}'))  # what lm-eval's RULER tasks read
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(config))
    assert main(["eval", "suite", "--config", str(tmp_path / "suite.yaml")]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Passkey retrieval" in report and "## lm-evaluation-harness" in report
    assert "| task | metric | base | extended | extended − base |" in report
    perplexity = {}  # the models differ in RoPE only: their perplexities differ, their accuracies need not
    for name in ["base", "extended"]:
        harness = json.loads((tmp_path / "out" / "report" / name / "lm_eval_results.json").read_text())
        perplexity[name] = harness["results"]["tiny_rolling"]["word_perplexity,none"]
        assert harness["configs"]["tiny_choice"]["metadata"]["max_seq_lengths"] == [64]
    difference = perplexity["extended"] - perplexity["base"]
    assert abs(difference) > 1
    assert f"| tiny_rolling | word_perplexity | {perplexity['base']:.4g} | {perplexity['extended']:.4g} | " \
           f"{difference:.4g} |" in report
