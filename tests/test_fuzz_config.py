"""Property-based fuzz of training configs (issue 30): hostile YAML documents, made by mutating a valid tiny config,
fed to `megatron-ext train --config` (and `plan --config`, and `train --set` overrides) through tests/fuzz_harness.py. Every case ends cleanly
within its bounds: success up to the point where training would begin (the harness stops it there), or exit 2 with
one line `megatron-ext train: ...`; never a traceback, a hang (> SECONDS) or a memory blow-up (> MEMORY_MB).

Mutations: a setting (any field of any section, nested RoPE parameters included) replaced by a value of the wrong
type, a nested wrong type, a huge / negative / zero / non-finite number, a big string or deep nesting; unknown
keys; sections that are not mappings; YAML aliases ("billion laughs", self-reference); the YAML text cut short or
with characters spliced in. Seeded (derandomize=True): CI runs the same cases every time.
"""

import dataclasses
import math

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzz_harness import assert_clean_ending, run_cli_bounded  # noqa: E402

SECONDS = 20  # per case: validation of a tiny config takes ~0.1 s; the bound is for hangs
MEMORY_MB = 1024  # per case, beyond the harness's zygote's address space: a billion laughs needs GBs
TRAIN_EXAMPLES = 150
PLAN_EXAMPLES = 40
OVERRIDE_EXAMPLES = 40
STOP = "megatron_ext.training.train:train"

BASE = {
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64, "vocab_size": 2000},
    "rope": {"head_base_strategy": "uniform", "head_base_params": {"b_min": 10000, "b_max": 500000}},
    "data": {"tiny_corpus": True, "cache_dir": "cache"},
    "training": {"train_iters": 20, "micro_batch_size": 2, "global_batch_size": 4},
    "optimizer": {"lr": 1.0e-3, "min_lr": 1.0e-4, "warmup_iters": 2},
    "checkpoint": {"dir": "ckpt", "save_interval": 10},
    "logging": {"tensorboard_dir": None, "metrics_file": None, "log_interval": 5},
}


def setting_paths() -> list[tuple[str, ...]]:
    """Every (section, key) of the training config, plus nested keys of its free-form mappings."""
    from megatron_ext.config import TrainConfig

    paths = []
    for section in dataclasses.fields(TrainConfig):
        paths += [(section.name, f.name) for f in dataclasses.fields(section.default_factory)]
    paths += [("rope", "head_base_params", "b_min"), ("rope", "head_base_params", "b_max"),
              ("rope", "scaling_params", "factor"), ("data", "upsample", "web"),
              ("data", "upsample", "web", "factor"), ("logging", "profile", "start_iter")]
    return paths


def nested(depth: int, leaf):
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


scalars = st.one_of(
    st.booleans(), st.none(),
    st.integers(-3, 3), st.integers(-2**70, 2**70),
    st.sampled_from([0, -1, 10**9, 10**12, 4 * 10**12, 10**29, 2**63, -2**63 - 1, 2**31, 2**32]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e39, -1e39, 1e-320, -0.0, math.inf, -math.inf, math.nan, 3.4e38, 0.5, 2.0]),
    st.text(max_size=20), st.sampled_from(["", "auto", "none", "WSD", "a2a+p2p", "../../etc/passwd", "/dev/zero",
                                           "1e-4", "nan", "12abc", "a\x00b", "d/" + "n" * 300]),
    st.builds(lambda: "x" * 100_000),  # a big string (built, so that the strategy's repr stays short)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-2, 2)), inner, max_size=4)),
    max_leaves=20,

)
values = st.one_of(values, values, values, st.builds(nested, st.integers(20, 150), scalars))  # deep: 1 in 4


def plausible(path: tuple[str, ...]):
    """A value of the setting's declared kind in an ordinary range: such mutations often keep the config valid, so
    the accepting path (up to where training begins) is fuzzed too, not only refusals."""
    import typing

    from megatron_ext.config import TrainConfig

    if len(path) != 2:
        return st.integers(1, 10)
    section = typing.get_type_hints(TrainConfig)[path[0]]
    hint = typing.get_type_hints(section)[path[1]]
    kinds = [arg for arg in typing.get_args(hint) if arg is not type(None)] or [hint]
    options = []
    for kind in kinds:
        if kind is bool:
            options.append(st.booleans())
        elif kind is int:
            options.append(st.sampled_from([1, 2, 4, 8, 16, 64]))
        elif kind is float:
            options.append(st.sampled_from([1e-5, 1e-4, 1e-3, 0.01, 0.1, 0.5, 1.0]))
        elif kind is str:
            options.append(st.sampled_from(["none", "auto", "code", "paper", "uniform", "cosine", "p2p", "x"]))
    return st.one_of(options) if options else st.none()


@st.composite
def mutated_config(draw) -> str:
    """A YAML document: the tiny config with 1-3 mutations (of values, keys, sections, aliases or the text)."""
    import copy

    raw = copy.deepcopy(BASE)
    alias_prelude = ""
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["value", "value", "plausible", "plausible", "plausible", "unknown", "section",
                                     "alias", "none"]))
        path = draw(st.sampled_from(setting_paths()))
        if kind == "value":
            _set(raw, path, draw(values))
        elif kind == "plausible":
            _set(raw, path, draw(plausible(path)))
        elif kind == "unknown":
            section = draw(st.sampled_from([None, *BASE]))
            name = draw(st.text(min_size=1, max_size=30) | st.sampled_from(["lrr", "num_layer"])
                    | st.builds(lambda: "k" * 5000))
            target = raw if section is None or not isinstance(raw.get(section), dict) else raw[section]
            target[name] = draw(values)
        elif kind == "section":
            raw[draw(st.sampled_from(list(BASE)))] = draw(values)
        elif kind == "none":
            _set(raw, path, None)
        else:  # an alias: to a small shared value, to itself, or to 10^levels values
            levels = draw(st.integers(1, 9))
            alias_prelude = "\n".join([f"l0: &l0 [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]"] + [
                f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels + 1)]) + "\n"
            _set(raw, path, f"__ALIAS__l{levels}")
    text = alias_prelude + yaml.safe_dump(raw, sort_keys=False, width=2**20).replace("__ALIAS__", "*")
    if draw(st.integers(0, 9)) == 0:  # the text itself damaged: cut short, or characters spliced in
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["", "\x00", "[", "{{", "&a [*a]", ": :", "\t", "é"]))
    return text


def _set(raw: dict, path: tuple[str, ...], value) -> None:
    node = raw
    for name in path[:-1]:
        if not isinstance(node.get(name), dict):
            node[name] = {}
        node = node[name]
    node[path[-1]] = value


FUZZ = settings(max_examples=TRAIN_EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.mark.slow
@FUZZ
@given(text=mutated_config())
def test_train_ends_cleanly_on_any_config(tmp_path_factory, text):
    work = tmp_path_factory.mktemp("fuzz_train")
    path = work / "config.yaml"
    path.write_text(text)
    outcome = run_cli_bounded(["train", "--config", str(path)], cwd=work, seconds=SECONDS, memory_mb=MEMORY_MB,
                              stop_before=[STOP])
    assert_clean_ending(outcome, "train")
    assert outcome.exit_code == 2 or outcome.reached == STOP, f"exit 0 without reaching training:\n{outcome.describe()}"
    event(f"exit {outcome.exit_code}")  # pytest --hypothesis-show-statistics: how the cases ended


@pytest.mark.slow
@settings(FUZZ, max_examples=PLAN_EXAMPLES)
@given(text=mutated_config())
def test_plan_ends_cleanly_on_any_config(tmp_path_factory, text):
    work = tmp_path_factory.mktemp("fuzz_plan")
    path = work / "config.yaml"
    path.write_text(text)
    outcome = run_cli_bounded(["plan", "--config", str(path), "--gpus", "8"], cwd=work, seconds=SECONDS,
                              memory_mb=MEMORY_MB)
    assert_clean_ending(outcome, "plan")
    event(f"exit {outcome.exit_code}")


@st.composite
def override(draw) -> str:
    """A `--set` argument: a known or nested setting = a value written as YAML (inline), or arbitrary text."""
    path = ".".join(draw(st.sampled_from(setting_paths())))
    value = yaml.safe_dump(draw(values | plausible(tuple(path.split(".")))), default_flow_style=True,
                           width=2**20).strip().removesuffix("...").strip()
    return draw(st.sampled_from([f"{path}={value}", f"{path}=&a [*a]", f"{path}.x={value}", f"{path}",
                                 f"={value}", f"{path}=" + value.replace("'", ""), "..=1", ".=1"])
                 | st.text(max_size=40))


@pytest.mark.slow
@settings(FUZZ, max_examples=OVERRIDE_EXAMPLES)
@given(overrides=st.lists(override(), min_size=1, max_size=3))
def test_train_ends_cleanly_on_any_override(tmp_path_factory, overrides):
    work = tmp_path_factory.mktemp("fuzz_set")
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(BASE))
    argv = ["train", "--config", str(path)] + [part for item in overrides for part in ("--set", item)]
    outcome = run_cli_bounded(argv, cwd=work, seconds=SECONDS, memory_mb=MEMORY_MB, stop_before=[STOP])
    assert_clean_ending(outcome, "train")
    event(f"exit {outcome.exit_code}")


def test_the_base_config_is_valid(tmp_path):
    """The fuzz mutates a config that is itself accepted: refusals come from the mutations."""
    from megatron_ext.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    config = load_config(path, check_files=False)
    assert config.model.num_layers == 2 and config.data.tiny_corpus
