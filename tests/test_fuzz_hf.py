"""Property-based fuzz of the Hugging Face model directories users hand us (issue 30): a sound tiny Llama directory
(tests/test_hf_hostile.py's `write_tiny_hf_dir`) with one part made hostile by hypothesis (config.json values of the
wrong type, huge or negative sizes, unknown model types and RoPE garbage; safetensors headers that lie; index
files; tokenizer files), fed to `megatron-ext convert hf-to-mcore` and `megatron-ext eval perplexity`. Every case
must end in success or a one-line error with exit 2, within the time and memory bounds of tests/fuzz_harness.py,
never a traceback, a hang or a memory blow-up.

Seeded (derandomize): CI runs the same cases every time. Each case is a fork of the preloaded CLI.
"""

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

SECONDS = 30  # per case: a refusal takes milliseconds, a successful conversion or evaluation about a second
MEMORY_MB = 2048  # address space a case may add to the harness's zygote
EXAMPLES = int(os.environ.get("FUZZ_HF_EXAMPLES", 8))  # per test: 64 cases, ~35 s (FUZZ_HF_EXAMPLES=40: deeper)
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
COMMANDS = ("convert", "eval")
PRELOAD = ("megatron_ext.eval.models", "megatron_ext.eval.perplexity", "megatron_ext.convert.from_hf",
           "megatron_ext.convert.mcore_io", "transformers.models.llama.modeling_llama",
           "transformers.models.auto.tokenization_auto")
ENDINGS: Counter = Counter()  # (test family, command, exit code) -> cases, printed at the end of the module
REFUSALS: Counter = Counter()  # the first words of each refusal -> cases

# --- values ---------------------------------------------------------------------------------------

HUGE = st.sampled_from([0, -1, -2**31, 2**31, 2**40, 2**63, 10**12, 10**30, 2**70])
NUMBERS = st.one_of(HUGE, st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True))
JUNK = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12), st.lists(st.integers(-2, 4), max_size=3),
                 st.dictionaries(st.text(max_size=6), st.integers(-2, 4), max_size=2))
ROPE_TYPES = st.one_of(st.sampled_from(["default", "linear", "dynamic", "yarn", "llama3", "longrope", "harpe",
                                        "megatron_ext", "su", "bogus", ""]), JUNK)
ROPE = st.one_of(JUNK, st.fixed_dictionaries(
    {"rope_type": ROPE_TYPES},
    optional={key: st.one_of(JUNK, st.floats(0.5, 64)) for key in (
        "factor", "rope_theta", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
        "beta_fast", "beta_slow", "attention_factor", "head_bases", "short_factor", "long_factor")}))
CONFIG_KEYS = {  # config.json key -> the values a hostile file gives it
    "vocab_size": st.one_of(JUNK, HUGE), "hidden_size": st.one_of(JUNK, HUGE),
    "intermediate_size": st.one_of(JUNK, HUGE), "num_hidden_layers": st.one_of(JUNK, HUGE),
    "num_attention_heads": st.one_of(JUNK, HUGE), "num_key_value_heads": st.one_of(JUNK, HUGE),
    "head_dim": st.one_of(JUNK, HUGE), "max_position_embeddings": st.one_of(JUNK, HUGE),
    "rms_norm_eps": JUNK, "rope_theta": JUNK, "rope_scaling": ROPE, "rope_parameters": ROPE,
    "model_type": st.one_of(st.sampled_from(["llama", "mistral", "qwen2", "gpt2", "bert", "evil", ""]), JUNK),
    "architectures": st.one_of(JUNK, st.lists(st.sampled_from(
        ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel", "EvilForCausalLM"]),
        max_size=2)),
    "hidden_act": st.one_of(st.sampled_from(["silu", "gelu", "relu", "evil"]), JUNK),
    "tie_word_embeddings": JUNK, "dtype": st.one_of(st.sampled_from(["float32", "bfloat16", "int8", "evil"]), JUNK),
    "torch_dtype": JUNK, "bos_token_id": JUNK, "eos_token_id": JUNK, "attention_bias": JUNK, "sliding_window": JUNK,
    "auto_map": JUNK, "initializer_range": JUNK, "attention_dropout": JUNK,
}
DELETE = object()

# --- the seed directory and one case --------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory):
    from fuzz_harness import preload
    from test_hf_hostile import write_tiny_hf_dir

    preload()
    preload(PRELOAD)
    directory = write_tiny_hf_dir(tmp_path_factory.mktemp("fuzz_hf") / "seed")
    yield directory
    print("\nfuzz_hf endings (family, command, exit code): cases")
    for key, count in sorted(ENDINGS.items(), key=str):
        print(f"  {key}: {count}")
    print("refusals, by their first words:")
    for words, count in REFUSALS.most_common():
        print(f"  {count:4d}  {words}")


def run_case(seed: Path, command: str, family: str, mutate) -> None:
    """Copy the seed directory, let `mutate` make it hostile, run `command` on it: it must end cleanly."""
    from fuzz_harness import assert_clean_ending, run_cli_bounded
    from test_hf_hostile import command_argv

    with tempfile.TemporaryDirectory(prefix="fuzz_hf_") as scratch:
        model = Path(scratch) / "model"
        shutil.copytree(seed, model)
        mutate(model)
        outcome = run_cli_bounded(command_argv(command, model), cwd=scratch, seconds=SECONDS, memory_mb=MEMORY_MB)
        ENDINGS[(family, command, outcome.exit_code)] += 1
        if outcome.exit_code == 2:  # what the refusals say, by their first words (paths left out)
            message = outcome.stderr.strip().splitlines()[-1].replace(str(scratch), "")
            REFUSALS[" ".join(message.split()[2:8])] += 1
        ENDINGS[(family, command, "slowest seconds")] = max(ENDINGS[(family, command, "slowest seconds")],
                                                            math.ceil(outcome.seconds))
        if outcome.seconds > 5:
            print(f"\nslow case ({outcome.seconds:.1f} s, exit {outcome.exit_code}): {family} {command}")
        assert_clean_ending(outcome, command)


def rewrite_json(path: Path, changes: dict) -> None:
    settings_ = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            settings_.pop(key, None)
        else:
            settings_[key] = value
    path.write_text(json.dumps(settings_))


# --- config.json ------------------------------------------------------------------------------------

CONFIG_CHANGES = st.dictionaries(st.sampled_from(sorted(CONFIG_KEYS)), st.just(None), min_size=1, max_size=3).flatmap(
    lambda keys: st.fixed_dictionaries({key: st.one_of(st.just(DELETE), CONFIG_KEYS[key]) for key in keys}))


@pytest.mark.parametrize("command", COMMANDS)
@FUZZ
@given(changes=CONFIG_CHANGES)
def test_hostile_config_json_ends_cleanly(seed_dir, command, changes):
    run_case(seed_dir, command, "config.json", lambda model: rewrite_json(model / "config.json", changes))


# --- safetensors headers -----------------------------------------------------------------------------

OFFSET = st.one_of(HUGE, st.integers(-8, 20000), JUNK)
HEADER_CHANGE = st.one_of(
    st.tuples(st.just("dtype"), st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F8_E4M3", "F4", "C64",
                                                           "bogus"]), JUNK)),
    st.tuples(st.just("shape"), st.one_of(JUNK, st.lists(st.one_of(HUGE, st.integers(-2, 70)), max_size=4))),
    st.tuples(st.just("data_offsets"), st.one_of(JUNK, st.lists(OFFSET, min_size=0, max_size=3))),
    st.tuples(st.just("entry"), JUNK),  # the whole entry replaced
    st.tuples(st.just("rename"), st.text(max_size=30)),
    st.tuples(st.just("__metadata__"), JUNK),
)


@st.composite
def header_mutations(draw):
    changes = draw(st.lists(st.tuples(st.integers(0, 100), HEADER_CHANGE), min_size=0, max_size=3))
    # the header length and the file's end are left alone in 3 cases of 4: the header's own lies get through to
    # the checks of its entries
    length = draw(st.sampled_from(["as written"] * 3 + ["any"]).flatmap(
        lambda how: st.none() if how == "as written" else st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 20000))))
    cut = draw(st.sampled_from([0, 0, 0, None]).flatmap(lambda c: st.just(0) if c == 0 else st.integers(1, 64)))
    return changes, length, cut


def mutate_safetensors(changes, length, cut):
    def mutate(model: Path) -> None:
        path = model / "model.safetensors"
        raw = path.read_bytes()
        size = int.from_bytes(raw[:8], "little")
        header, data = json.loads(raw[8:8 + size]), raw[8 + size:]
        for pick, (field, value) in changes:
            names = sorted(name for name in header if name != "__metadata__")
            name = names[pick % len(names)] if names else "x"
            if field == "__metadata__":
                header["__metadata__"] = value
            elif field == "entry":
                header[name] = value
            elif field == "rename":
                header[value] = header.pop(name, None)
            elif isinstance(header.get(name), dict):
                header[name][field] = value
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        prefix = (len(text) if length is None else length).to_bytes(8, "little")
        blob = prefix + text + data
        path.write_bytes(blob[:len(blob) - cut])
    return mutate


@pytest.mark.parametrize("command", COMMANDS)
@FUZZ
@given(mutation=header_mutations())
def test_hostile_safetensors_header_ends_cleanly(seed_dir, command, mutation):
    run_case(seed_dir, command, "safetensors", mutate_safetensors(*mutation))


# --- model.safetensors.index.json --------------------------------------------------------------------

SOUND = "the weight file's own name"
SHARD_NAMES = st.one_of(st.sampled_from([SOUND, SOUND, "model.safetensors", "../model.safetensors", "/etc/hostname",
                                         "missing.bin",
                                         "", ".", "sub/../model.safetensors", "config.json", "tokenizer.json",
                                         "model.safetensors\0x", "../seed/model.safetensors"]), JUNK)
INDEX = st.one_of(  # ("every tensor in", shard name) or ("as written", the index file's JSON)
    st.tuples(st.just("every tensor in"), SHARD_NAMES),
    st.tuples(st.just("every tensor in"), SHARD_NAMES),
    st.tuples(st.just("as written"), st.fixed_dictionaries(
        {"weight_map": st.one_of(JUNK, st.dictionaries(st.text(max_size=30), SHARD_NAMES, max_size=3))},
        optional={"metadata": JUNK})),
    st.tuples(st.just("as written"), JUNK),
)


def mutate_index(index, keep_single_file: bool):
    def mutate(model: Path) -> None:
        how, body = index
        own_name = "model.safetensors" if keep_single_file else "model-00001-of-00001.safetensors"
        if how == "every tensor in":
            raw = (model / "model.safetensors").read_bytes()
            names = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
            body = {"weight_map": {name: body for name in names if name != "__metadata__"}}
        if isinstance(body, dict) and isinstance(body.get("weight_map"), dict):
            body["weight_map"] = {name: own_name if shard == SOUND else shard
                                  for name, shard in body["weight_map"].items()}
        (model / "model.safetensors.index.json").write_text(json.dumps(body))
        if not keep_single_file:
            (model / "model.safetensors").rename(model / own_name)
    return mutate


@pytest.mark.parametrize("command", COMMANDS)
@FUZZ
@given(index=INDEX, keep_single_file=st.booleans())
def test_hostile_index_file_ends_cleanly(seed_dir, command, index, keep_single_file):
    run_case(seed_dir, command, "index", mutate_index(index, keep_single_file))


# --- tokenizer files ------------------------------------------------------------------------------------

TOKENIZER_CONFIG_KEYS = {
    "tokenizer_class": st.one_of(st.sampled_from(["PreTrainedTokenizerFast", "LlamaTokenizer", "LlamaTokenizerFast",
                                                  "GPT2Tokenizer", "Qwen2Tokenizer", "TokenizersBackend",
                                                  "EvilTokenizer", ""]), JUNK),
    "bos_token": JUNK, "eos_token": JUNK, "unk_token": JUNK, "pad_token": JUNK, "model_max_length": NUMBERS,
    "added_tokens_decoder": JUNK, "chat_template": JUNK, "auto_map": JUNK, "padding_side": JUNK,
    "extra_special_tokens": JUNK,
}
TOKENIZER_JSON_KEYS = ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder", "version")
TOKENIZER_CHANGE = st.one_of(
    st.tuples(st.just("tokenizer_config.json"), st.sampled_from(sorted(TOKENIZER_CONFIG_KEYS)).flatmap(
        lambda key: st.tuples(st.just(key), st.one_of(st.just(DELETE), TOKENIZER_CONFIG_KEYS[key])))),
    st.tuples(st.just("tokenizer.json"), st.tuples(st.sampled_from(TOKENIZER_JSON_KEYS), st.one_of(
        st.just(DELETE), JUNK, st.fixed_dictionaries({"type": st.sampled_from(["BPE", "WordLevel", "Unigram", "Evil"])},
                                                     optional={"vocab": JUNK, "merges": JUNK, "unk_token": JUNK})))),
    st.tuples(st.sampled_from(["tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                               "added_tokens.json", "vocab.json", "merges.txt"]),
              st.one_of(st.just(DELETE), st.binary(max_size=40), st.just(b"{}"), st.just(b"[]"))),
)


def mutate_tokenizer(changes):
    def mutate(model: Path) -> None:
        for name, change in changes:
            path = model / name
            if isinstance(change, bytes):
                path.write_bytes(change)
            elif change is DELETE:
                path.unlink(missing_ok=True)
            elif path.exists():
                try:
                    rewrite_json(path, dict([change]))
                except (ValueError, AttributeError, TypeError):  # an earlier change left it no JSON object
                    path.write_text(json.dumps(dict([change]), default=str))
    return mutate


@pytest.mark.parametrize("command", COMMANDS)
@FUZZ
@given(changes=st.lists(TOKENIZER_CHANGE, min_size=1, max_size=3))
def test_hostile_tokenizer_files_end_cleanly(seed_dir, command, changes):
    run_case(seed_dir, command, "tokenizer", mutate_tokenizer(changes))
