"""Tiny models and tokenizers for the evaluation tests, built in-process in a few seconds (no training, no files
from outside): a sentencepiece tokenizer and a HARPE LongContextGPTModel with GQA, and a Hugging Face Llama with
a byte-level BPE tokenizer. No tests here; the test_eval_*.py modules import these fixtures."""

import random

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.data.prompts import PASSKEY_FILLER, PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION

MAX_LENGTH = 512
SP_VOCAB = 600  # pieces of the sentencepiece tokenizer; the megatron models below have 640 (padded) rows


def training_text() -> list[str]:
    """Lines that cover the prompt templates, digits and some prose."""
    rng = random.Random(0)
    words = ("alpha beta gamma delta river stone green blue yellow magic number special hidden text quiz "
             "memorize chain variable assigned value answer question mentioned provided").split()
    lines = [PASSKEY_INTRO, PASSKEY_FILLER, PASSKEY_QUESTION, "One of the special magic numbers for key is: 1234567.",
             "VAR ABCDE = VAR FGHIJ. Find all variables that are assigned the value 12345."]
    lines += [PASSKEY_NEEDLE.format(key=rng.randint(1, 50000)).strip() for _ in range(50)]
    lines += [" ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(0, 10**7)}." for _ in range(300)]
    return lines


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    from megatron_ext.data import train_sentencepiece
    from megatron_ext.eval.tokenizers import SentencePieceEvalTokenizer

    model = train_sentencepiece(iter(training_text()), tmp_path_factory.mktemp("sp") / "tok", SP_VOCAB, seed=0)
    return SentencePieceEvalTokenizer(model)


def megatron_config(tp: int = 1, pp: int = 1):
    from megatron_ext.models import LongContextTransformerConfig
    from megatron_ext.rope import RopeConfig

    rope = RopeConfig(head_base_strategy="uniform", head_base_params={"b_min": 1e3, "b_max": 1e5})
    return LongContextTransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, init_method_std=0.3, rope=rope,
    )


def megatron_model(tokenizer, tp: int = 1, pp: int = 1):
    """A random LongContextGPTModel (HARPE bases, 4 heads in 2 KV groups) behind EvalModel; needs a process group."""
    from megatron.core import parallel_state as ps

    from megatron_ext.eval.models import MegatronExtModel
    from megatron_ext.models import LongContextGPTModel, local_layer_spec

    torch.manual_seed(0)
    model = LongContextGPTModel(megatron_config(tp, pp), local_layer_spec(), 640, MAX_LENGTH,
                                pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    return MegatronExtModel(model, tokenizer, name="tiny-megatron", context_window=128)


@pytest.fixture(scope="module")
def tiny_megatron(single_rank, sp_tokenizer):
    return megatron_model(sp_tokenizer)


def save_tiny_llama(directory, text_lines) -> None:
    """A random 2-layer Llama (GQA) and a byte-level BPE tokenizer trained on `text_lines`, saved to `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text_lines, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<s>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LENGTH,
                         initializer_range=0.3, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(directory)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    save_tiny_llama(directory, training_text())
    return directory


@pytest.fixture(scope="session")
def tiny_llama(llama_dir):
    from megatron_ext.eval.models import HFCausalLM

    return HFCausalLM(llama_dir, name="tiny-llama")


def network_logits(eval_model, ids: torch.Tensor) -> torch.Tensor:
    """Every position's logits [s, V] straight from the network an EvalModel wraps (not through its `logits`, which
    the tests check), over the model's vocabulary (no padding rows)."""
    with torch.no_grad():
        if hasattr(eval_model.model, "output_layer"):  # megatron's LongContextGPTModel
            logits = eval_model.model(ids, torch.arange(ids.size(1))[None], None)
        else:
            logits = eval_model.model(input_ids=ids).logits
    return logits[0, :, :eval_model.vocab_size]
