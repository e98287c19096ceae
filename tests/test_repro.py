"""The small-scale reproduction (`megatron-ext repro`): the method table, and one --smoke run end to end
whose outputs are checked: every method present with finite numbers, and each method trained the way it
claims (PoSE: short sequences with long position ids; HARPE: its per-head bases in the checkpoint;
ABF-multi: three stages with growing length and base, each starting from the one before)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_ext.repro.config import SMOKE_OVERRIDES, load_repro_config
from megatron_ext.repro.methods import (
    ABF_REFERENCE,
    build_methods,
    harpe_range,
    slowest_wavelength,
    transfer_base,
)
from megatron_ext.rope.config import RopeConfig
from megatron_ext.config import ConfigError, load_config

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "reproduction" / "cpu_8x.yaml"


# --- the methods, without training -----------------------------------------------------------


def test_transfer_base_keeps_the_wavelength_to_target_ratio():
    assert transfer_base(ABF_REFERENCE, 128, 32_768) == pytest.approx(500_000, rel=1e-12)
    base = transfer_base(ABF_REFERENCE, 32, 2048)
    reference_ratio = slowest_wavelength(500_000, 128) / 32_768
    assert slowest_wavelength(base, 32) / 2048 == pytest.approx(reference_ratio, rel=1e-12)
    # a longer target needs a bigger base; HARPE's range keeps its order
    assert transfer_base(ABF_REFERENCE, 32, 4096) > base
    low, high = harpe_range(32, 2048)
    assert 10_000 < low < high


def test_methods_differ_as_claimed():
    methods = build_methods(base_length=256, scale=8, head_dim=32)
    assert list(methods) == ["original", "vanilla", "pi", "ntk", "abf", "yarn", "abf_multi", "pose", "pose_linear",
                             "pose_yarn", "harpe_uniform", "harpe_peak_valley", "harpe_pose"]
    assert methods["original"].stages == []
    inv_freqs = {}
    for name, method in methods.items():
        if not method.stages:
            continue
        last = method.stages[-1]
        pose = name.startswith("pose") or name == "harpe_pose"
        assert last.seq_length == (256 if pose else 2048), name
        assert bool(last.pose) == pose and (not pose or last.pose["target_length"] == 2048), name
        assert sum(stage.budget_share for stage in method.stages) == pytest.approx(1.0)
        rope = RopeConfig(**{"base": 10_000.0, **last.rope})
        inv_freqs[name] = rope.inv_freq(rope.group_bases(4), 32)[0]
    # every full-length method rotates differently from every other one (pose variants share their partner's RoPE)
    distinct = ["vanilla", "pi", "ntk", "abf", "yarn", "harpe_uniform", "harpe_peak_valley"]  # abf_multi ends as abf
    for i, a in enumerate(distinct):
        for b in distinct[i + 1:]:
            assert (inv_freqs[a] - inv_freqs[b]).abs().max() > 1e-9, (a, b)
    assert (inv_freqs["pose"] == inv_freqs["vanilla"]).all() and (inv_freqs["pose_linear"] == inv_freqs["pi"]).all()
    assert (inv_freqs["harpe_pose"] == inv_freqs["harpe_uniform"]).all()
    # HARPE: four distinct bases per model, one per head
    for name in ("harpe_uniform", "harpe_peak_valley"):
        bases = RopeConfig(**methods[name].stages[0].rope).group_bases(4)
        assert len(set(bases.tolist())) == 4, name
    ladder = methods["abf_multi"].stages
    assert [stage.seq_length for stage in ladder] == [512, 1024, 2048]
    assert ladder[0].rope["base"] < ladder[1].rope["base"] < ladder[2].rope["base"]
    assert ladder[2].rope["base"] == methods["abf"].stages[0].rope["base"]


@pytest.mark.parametrize("override, message", [
    ("methods=[original,nope]", "methods: unknown 'nope'"),
    ("methods=[vanilla]", "must include 'original'"),
    ("scale=6", "scale .6. must be a power of two"),
    ("extend.tokens_per_iter=3000", "extend.tokens_per_iter .3000. must be a multiple of the target length"),
    ("seeds=[]", r"seeds \(\[\]\) must be distinct and non-empty"),
    ("extend.iters=2", "extend.iters .2. must give each of up to 3 stages"),
    ("data.pretrain_passkey_chars=[50,10]", r"data.pretrain_passkey_chars .\[50, 10\]."),
    ("eval.perplexity_data=[/nowhere/*.txt]", "eval.perplexity_data: '/nowhere/.*' .* matches no file"),
])
def test_bad_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_repro_config(CONFIG, [override])


def test_shipped_config_and_smoke_settings_validate():
    config = load_repro_config(CONFIG)
    assert config.target_length == 2048 and config.eval_lengths() == [256, 512, 1024, 2048]
    assert load_repro_config(CONFIG, SMOKE_OVERRIDES).extend.iters == 3


def _fake_result(method, seed, ppl, stages=1):
    stage = dict(iterations=3, global_batch=1, seq_length=2048, pose={}, last_loss=2.0 + seed)
    return dict(method=method, seed=seed, description=f"{method} (fake)", stages=[stage] * stages, seconds=10.0 * seed,
                peak_rss_mib=500.0 + seed, tokens=6144 * bool(stages),
                perplexity={"256": ppl, "512": ppl * 2, "1024": ppl * 3, "2048": ppl * 4},
                passkey={"256": 0.5, "512": 0.25, "1024": 0.0, "2048": 0.0},
                passkey_token_accuracy={"256": 0.8, "512": 0.6, "1024": 0.4, "2048": 0.2}, entropy=5.0 + seed)


def test_report_shows_mean_and_spread_over_seeds(tmp_path):
    from megatron_ext.repro.report import results_table, spread, write_report

    assert spread([1.0]) == "1.00" and spread([10.0, 20.0]) == "15.00 ± 7.07" and spread([None]) == "–"
    assert spread([100.0, 300.0], 0) == "200 ± 141"
    config = load_repro_config(CONFIG, ["seeds=[1,2]", f"output_dir={tmp_path}"])
    results = {(seed, method): _fake_result(method, seed, ppl, stages)
               for seed in (1, 2) for method, ppl, stages in (("original", 30.0, 0), ("pi", 20.0 + seed, 1))}
    table = results_table(config, results)
    assert "| `pi` | 15 ± 7 | 502 ± 1 | 6,144 | 21.50 ± 0.71 | 43.00 ± 1.41 |" in table
    assert "| `original` | – | – | 0 | 30.00 | 60.00 |" in table  # identical seeds: a spread of 0 is shown
    pretrain = dict(first_loss=7.0, last_loss=2.0, seconds=100.0)
    report = write_report(config, pretrain, results, None, tmp_path, command="megatron-ext repro ...", seconds=60.0)
    text = report.read_text()
    assert "Extension seeds: 1, 2" in text and "## Perplexity track" in text
    assert (tmp_path / "ppl_vs_length.png").stat().st_size > 1000


# --- one smoke run, end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    command = [sys.executable, "-m", "megatron_ext.cli", "repro", "--config", str(CONFIG), "--smoke",
               "--set", f"output_dir={out}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), done.stdout


@pytest.mark.slow
def test_smoke_run_reports_every_method_with_finite_numbers(smoke_run):
    out, results, stdout = smoke_run
    config = load_repro_config(CONFIG, SMOKE_OVERRIDES)
    names = [r["method"] for r in results["results"]]
    assert names == list(config.method_table(config.model))
    lengths = [str(n) for n in config.eval_lengths()]
    for result in results["results"]:
        assert sorted(result["perplexity"], key=int) == lengths and sorted(result["passkey"], key=int) == lengths
        assert all(math.isfinite(v) and v > 1 for v in result["perplexity"].values()), result["method"]
        assert all(0 <= v <= 1 for v in result["passkey"].values())
        assert math.isfinite(result["entropy"]) and result["entropy"] > 0
        if result["stages"]:
            assert result["seconds"] > 0 and result["peak_rss_mib"] > 50
    trained = {r["tokens"] for r in results["results"] if r["stages"]}
    assert trained == {config.extend.iters * config.extend.tokens_per_iter}  # one token budget for all
    report = (out / "report.md").read_text()
    for name in names:
        assert f"| `{name}` |" in report
    for picture in ("ppl_vs_length.png", "passkey_heatmap.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({picture})" in report
    assert "megatron-ext repro --config" in report and "Machine:" in report
    assert "report:" in stdout


def _stages(results, method):
    return next(r for r in results["results"] if r["method"] == method)["stages"]


def _saved_state(checkpoint):
    return json.loads((Path(checkpoint) / "megatron_ext.json").read_text())["state"]


@pytest.mark.slow
def test_smoke_pose_batches_are_short_with_long_position_ids(smoke_run, single_rank):
    from megatron_ext.data import SentencePieceTokenizer
    from megatron_ext.training.train import build_batches

    out, results, _ = smoke_run
    for method in ("pose", "pose_linear", "pose_yarn", "harpe_pose"):
        (stage,) = _stages(results, method)
        config = load_config(out / "seed1" / method / "stage0" / "train.yaml")
        assert config.model.seq_length == 256 and config.pose.enabled and config.pose.target_length == 2048
        batches = build_batches(config, SentencePieceTokenizer(config.data.tokenizer_model),
                                config.data.train_data, 0).next_iteration()
        ids = [batch["position_ids"] for batch in batches]
        assert all(i.shape[-1] == 256 for i in ids)
        largest = max(int(i.max()) for i in ids)
        assert 0.6 * 2048 <= largest < 2048, (method, largest)
        assert all((i.diff(dim=-1) >= 1).all() for i in ids)  # increasing, with skips
        assert any((i.diff(dim=-1) > 1).any() for i in ids)
    (vanilla,) = _stages(results, "vanilla")
    assert vanilla["seq_length"] == 2048 and not vanilla["pose"]


@pytest.mark.slow
def test_smoke_harpe_checkpoints_hold_the_requested_bases(smoke_run):
    out, results, _ = smoke_run
    config = load_repro_config(CONFIG, SMOKE_OVERRIDES)
    methods = config.method_table(config.model)
    heads = config.model.num_attention_heads
    for name in ("harpe_uniform", "harpe_peak_valley", "harpe_pose"):
        (stage,) = _stages(results, name)
        saved = _saved_state(stage["checkpoint"])["head_bases"]
        requested = RopeConfig(**{"base": config.model.rope_base, **methods[name].stages[0].rope}).group_bases(heads)
        assert saved == pytest.approx(requested.tolist(), rel=1e-12), name
        assert len(set(saved)) == heads
    (vanilla,) = _stages(results, "vanilla")
    assert len(set(_saved_state(vanilla["checkpoint"])["head_bases"])) == 1


@pytest.mark.slow
def test_smoke_abf_multi_runs_its_stages_in_order(smoke_run):
    out, results, _ = smoke_run
    stages = _stages(results, "abf_multi")
    assert [s["seq_length"] for s in stages] == [512, 1024, 2048]
    bases = [s["rope"]["base"] for s in stages]
    assert bases == sorted(bases) and len(set(bases)) == 3
    base_checkpoint = json.loads((out / "pretrain" / "summary.json").read_text())["checkpoint"]
    previous = base_checkpoint
    for index, stage in enumerate(stages):
        raw = yaml.safe_load((out / "seed1" / "abf_multi" / f"stage{index}" / "train.yaml").read_text())
        assert raw["checkpoint"]["pretrained"] == previous  # each stage starts from the one before
        saved = _saved_state(stage["checkpoint"])["config"]
        assert saved["model"]["seq_length"] == stage["seq_length"] and saved["rope"]["base"] == stage["rope"]["base"]
        assert stage["iterations"] >= 1
        previous = stage["checkpoint"]
    assert sum(s["iterations"] for s in stages) == load_repro_config(CONFIG, SMOKE_OVERRIDES).extend.iters


@pytest.mark.slow
def test_changed_settings_in_a_used_output_dir_fail_before_any_work(smoke_run):
    out, _, _ = smoke_run
    command = [sys.executable, "-m", "megatron_ext.cli", "repro", "--config", str(CONFIG), "--smoke",
               "--set", f"output_dir={out}", "--set", "extend.lr=1e-3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "[repro" not in done.stdout  # nothing started
    assert f"output_dir ({out}) holds a perplexity track made with other extend settings" in done.stderr


def test_a_bad_generated_training_setting_is_named_before_any_work(tmp_path):
    from megatron_ext.repro.runner import check_settings

    config = load_repro_config(CONFIG, [f"output_dir={tmp_path}", "extend.min_lr=1.0"])
    message = r"vanilla stage 1 \(extend\.\*\): optimizer.lr .0.0005. must be > 0 and optimizer.min_lr .1.0. in"
    with pytest.raises(ConfigError, match=message):
        check_settings(config, tmp_path)
    assert not (tmp_path / "settings.json").exists()


@pytest.mark.slow
def test_a_finished_run_is_reused(smoke_run):
    out, _, _ = smoke_run
    command = [sys.executable, "-m", "megatron_ext.cli", "repro", "--config", str(CONFIG), "--smoke",
               "--set", f"output_dir={out}", "--set", "methods=[original,pose]"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pretraining: reusing" in done.stdout and "pose: kept from an earlier run" in done.stdout


# --- the retrieval track ----------------------------------------------------------------------


def _retrieval(out):
    return json.loads((out / "retrieval" / "results.json").read_text())


@pytest.mark.slow
def test_smoke_retrieval_track_reports_every_method_and_budget_with_intervals(smoke_run):
    import re

    out, _, stdout = smoke_run
    config = load_repro_config(CONFIG, SMOKE_OVERRIDES)
    track = config.retrieval
    retrieval = _retrieval(out)
    rows = {(r["method"], r["budget"]) for r in retrieval["results"]}
    pose_family = {"pose", "pose_linear", "pose_yarn", "harpe_pose"}
    expected = {("original", "none")} | {(m, b) for m in config.method_table(config.model) if m != "original"
                                         for b in ("small", "large")} | {(m, "large_equal_tokens") for m in pose_family}
    assert rows == expected
    lengths = [str(n) for n in track.eval_lengths()]
    for result in retrieval["results"]:
        assert list(result["trials"]) == lengths
        assert [len(result["trials"][n]) for n in lengths] == [track.trials_at(int(n)) for n in lengths]
    equal = next(r for r in retrieval["results"] if r["method"] == "pose" and r["budget"] == "large_equal_tokens")
    large = next(r for r in retrieval["results"] if r["method"] == "vanilla" and r["budget"] == "large")
    assert equal["tokens"] == large["tokens"] and equal["steps"] == track.scale * large["steps"]
    report = (out / "report.md").read_text()
    assert "## Perplexity track" in report and "## Retrieval track" in report
    interval = r"(\d\.\d\d) \[(\d\.\d\d), (\d\.\d\d)\]"
    for method, budget in expected:
        label = {"none": "–", "small": "small (2 steps)", "large": "large (3 steps)",
                 "large_equal_tokens": "large equal tokens"}[budget]
        retrieval_part = report.split("## Retrieval track")[1]
        line = next(l for l in retrieval_part.splitlines() if l.startswith(f"| `{method}` | {label} |"))
        cells = re.findall(interval, line)
        assert len(cells) == len(lengths), line
        assert all(float(low) <= float(mean) <= float(high) for mean, low, high in cells), line
    # the perplexity track's rows carry intervals too (a later test reruns it with fewer methods: read what is there)
    for name in [r["method"] for r in json.loads((out / "results.json").read_text())["results"]]:
        perplexity_part = report.split("## Retrieval track")[0]
        line = next(l for l in perplexity_part.splitlines() if l.startswith(f"| `{name}` | "))
        assert re.search(interval.replace("\\d\\.\\d\\d", "[\\d.]+"), line), line
    for picture in ("retrieval_longest.png", "retrieval_needle_small.png", "retrieval_needle_large.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({picture})" in report
    assert "### The papers' claims at this scale" in report
    assert "retrieval pretraining seed 1" in stdout


@pytest.mark.slow
def test_retrieval_evaluation_prompts_are_held_out_of_training(smoke_run):
    from megatron_ext.repro.retrieval import check_draws, evaluation_draws

    out, _, _ = smoke_run
    track = load_repro_config(CONFIG, SMOKE_OVERRIDES).retrieval
    training = set()
    for keys in (out / "retrieval" / "data").glob("*/*.keys.jsonl"):
        training |= {(d["key"], d["depth"], d["filler_seed"]) for d in map(json.loads, keys.read_text().splitlines())}
    assert len(training) > 20
    evaluation = {(key, depth, 0) for seed in track.seeds for draws in evaluation_draws(track, seed).values()
                  for key, depth in draws}  # evaluation prompts cycle the filler from its start
    evaluation |= {(key, depth, 0) for seed in track.seeds for key, depth in check_draws(track, seed)}
    assert not training & evaluation
    assert not {key for key, _, _ in training} & {key for key, _, _ in evaluation}  # not even a key


@pytest.mark.slow
def test_retrieval_pretraining_that_does_not_retrieve_stops_the_run(tmp_path):
    command = [sys.executable, "-m", "megatron_ext.cli", "repro", "--config", str(CONFIG), "--smoke",
               "--set", f"output_dir={tmp_path}", "--set", "tracks=[retrieval]",
               "--set", "retrieval.min_accuracy=0.95", "--set", "retrieval.pretrain.iters=2",
               "--set", "retrieval.pretrain.extra_iters=2", "--set", "retrieval.pretrain.max_extra_rounds=1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    (line,) = [l for l in done.stderr.splitlines() if l.startswith("megatron-ext repro:")]  # one line, no others
    assert line.startswith("megatron-ext repro: retrieval pretraining seed 1 reaches passkey exact match 0.000 at 192 "
                           "tokens after 4 iterations, below retrieval.min_accuracy (0.95)")
    assert "retrieval.pretrain.iters, now 2" in line and "max_extra_rounds, now 1" in line
    assert done.stdout.count("2 more iterations at lr") == 1  # one extra round, checked again, then the stop
    assert not (tmp_path / "retrieval" / "seed1").exists()  # no extension started


@pytest.mark.parametrize("override, message", [
    ("retrieval.base_length=100", r"retrieval.base_length \(100\) must be a multiple of 16"),
    ("retrieval.extend.budgets={small: 0}", r"retrieval.extend.budgets \(\{'small': 0\}\) must map names"),
    ("retrieval.min_accuracy=1.5", r"retrieval.min_accuracy \(1.5\) must lie in \[0, 1\]"),
    ("tracks=[retrieval,speed]", r"tracks \(\['retrieval', 'speed'\]\) must be distinct names"),
])
def test_bad_retrieval_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_repro_config(CONFIG, ["tracks=[perplexity,retrieval]", override])


@pytest.mark.parametrize("section", ["", "retrieval."])
@pytest.mark.parametrize("override, message", [
    ("scale=6", r"{section}scale \(6\) must be a power of two >= 2"),
    ("seeds=[1,1]", r"{section}seeds \(\[1, 1\]\) must be distinct and non-empty"),
    ("methods=[original,nope]", r"{section}methods: unknown 'nope'; choose from \['original', "),
    ("pretrain.global_batch_size=20", r"{section}pretrain.global_batch_size \(20\) must be a multiple of "
                                      r"{section}pretrain.micro_batch_size"),
    ("pretrain.warmup_iters=5000", r"{section}pretrain.warmup_iters \(5000\) must be below {section}pretrain.iters"),
    ("base_length=72", r"{section}base_length \(72\) must be a multiple of 16 and >= "),
])
def test_both_tracks_follow_one_set_of_rules_each_naming_its_own_keys(section, override, message):
    """The settings both tracks have (L, scale, seeds, methods, the pretraining optimizer) are checked by one
    path, the same mistake refused in either track with the key as the YAML spells it."""
    with pytest.raises(ConfigError, match=message.format(section=section.replace(".", r"\."))):
        load_repro_config(CONFIG, ["tracks=[perplexity,retrieval]", section + override])


def test_a_track_that_does_not_run_is_not_checked():
    config = load_repro_config(CONFIG, ["tracks=[retrieval]", "extend.tokens_per_iter=3000"])
    assert config.track("retrieval") is config.retrieval and config.track("perplexity") is config
    with pytest.raises(ConfigError, match="retrieval.scale"):
        load_repro_config(CONFIG, ["tracks=[retrieval]", "retrieval.scale=6"])


def test_shipped_configs_read_as_the_results_files_record_them():
    """The YAML keys people have, and what the results files record of a run's settings, stay as they were:
    cpu_8x.yaml gives the settings docs/results/reproduction/results.json was made with, and the retrieval
    section of cpu_study.yaml (docs/results/reproduction/retrieval_results.json) the same nested keys."""
    from dataclasses import asdict

    recorded = json.loads((CONFIG.parents[2] / "docs/results/reproduction/results.json").read_text())["config"]
    settings = asdict(load_repro_config(CONFIG))
    assert {key: settings[key] for key in recorded if key != "output_dir"} == {
        key: value for key, value in recorded.items() if key != "output_dir"}
    study = load_repro_config(CONFIG.parent / "cpu_study.yaml")
    retrieval = asdict(study.retrieval)
    assert retrieval == dict(
        base_length=128, scale=8, seeds=[1, 2, 3, 4], methods=None, max_failed_seeds=1, min_accuracy=0.95,
        check_trials=200,
        pretrain=dict(iters=1200, global_batch_size=32, micro_batch_size=32, lr=2e-3, min_lr=2e-4, warmup_iters=30,
                      extra_iters=300, max_extra_rounds=2),
        extend=dict(micro_batch_tokens=8192, lr=3e-4, min_lr=3e-4, warmup_iters=5, budgets={"small": 10, "large": 40},
                    sequences_per_iter=8, equal_tokens=True),
        eval=dict(batch_size=16, trials=100, longest_trials=256, depth_bins=5, key_max=50_000, bootstrap=2000))
    assert study.tracks == ["perplexity", "retrieval"] and study.eval_lengths() == [256, 512, 1024, 2048]
    assert study.retrieval.eval_lengths() == [128, 256, 512, 1024]


@pytest.mark.slow
def test_a_child_run_that_refuses_its_settings_is_one_user_error_not_a_traceback(tmp_path):
    """A study's training child exits 2 with one `megatron-ext train: ...` line: the study says that line (a
    UserError: one line from `megatron-ext repro`, exit 2); a crash keeps the log's tail and the traceback."""
    from megatron_ext.errors import UserError
    from megatron_ext.repro.runner import run_training

    raw = {"data": {"tiny_corpus": True}, "optimizer": {"lrr": 1e-3}, "logging": {"metrics_file": str(tmp_path / "m")}}
    with pytest.raises(UserError, match=r"refused its settings .*unknown key 'optimizer.lrr'") as refused:
        run_training(raw, tmp_path / "run")
    assert "\n" not in str(refused.value) and "Traceback" not in str(refused.value)
