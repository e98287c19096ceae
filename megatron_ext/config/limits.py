"""The range of every size and count in a training config: zero, negative and absurdly large values refused
before any work, each in one line naming the setting, the value, the range and why.

Upper bounds sit far above any run that exists (the figure each comment gives) and far below what would
exhaust memory or never end: a value above one is a typo (a misplaced exponent, 1e12 for 1e3) or a hostile
input, and it used to surface as a hang or a MemoryError long after start-up. Called by
megatron_ext.config.train.validate; plain numbers, no torch.
"""

from __future__ import annotations

from megatron_ext.config.reader import check

# model shape: the largest published decoders have ~126 layers (Llama 3.1 405B), hidden 16-25k, FFN 53-74k,
# vocabularies of 256k ids; 8-16x those is room for any real model, not for a typo
MAX_LAYERS = 1024
MAX_HIDDEN = 2**17  # 131072
MAX_FFN = 2**20
MAX_VOCAB = 2**24  # 16.7M ids; megatron's indexed datasets store ids as int32, far below that
MAX_PARAMETERS = 10**14  # 100T: 50x the largest models trained; the embedding, layer and mlp products combined
# the longest contexts trained are ~10M tokens; RoPE tables, masks and per-sample position ids scale with it
MAX_SEQ_LENGTH = 2**24
MAX_PARALLEL = 2**16  # TP / PP / CP / VPP sizes: more GPUs per model replica than any cluster has
# batches and run length: megatron indexes every sample of the run up front (about 30 bytes each), so
# train_iters x global_batch_size samples are allocated before the first step. The largest published run
# (15.6T tokens, Llama 3) is ~4e9 samples of 4k tokens; 2^33 samples is twice that (~250 GB of index)
MAX_SAMPLES = 2**33
MAX_TOKENS = 2**53  # samples x seq_length: exact in float64 (throughput, token counters) and int64
MAX_ITERS = 2**31 - 1  # iteration counters, LR schedules and checkpoint names take int32; runs take ~1-2M steps
MAX_GLOBAL_BATCH = 2**20  # samples per step: 100x Llama 3's 16M-token steps at 8k tokens
MAX_SEED = 2**32 - 1  # numpy's and megatron's seeds are uint32
# the tiny corpus is the offline demo: it writes every document (times its upsample factor) to disk
MAX_TINY_DOCUMENTS = 10**6
MAX_UPSAMPLE_FACTOR = 1000
MAX_INTERVAL = MAX_ITERS  # save / log / eval / exit intervals: anything above train_iters means "at the end"


def validate_sizes(c) -> None:
    """Every size and count of TrainConfig `c` in its range; ConfigError (one line) for the first that is not."""
    m, p, t, o, d, pose = c.model, c.parallel, c.training, c.optimizer, c.data, c.pose
    ranges = [  # (setting, value, lowest, highest); None values are "use the default" and not checked here
        ("model.num_layers", m.num_layers, 1, MAX_LAYERS),
        ("model.hidden_size", m.hidden_size, 1, MAX_HIDDEN),
        ("model.num_attention_heads", m.num_attention_heads, 1, MAX_HIDDEN),
        ("model.num_query_groups", m.num_query_groups, 1, MAX_HIDDEN),
        ("model.ffn_hidden_size", m.ffn_hidden_size, 1, MAX_FFN),
        ("model.vocab_size", m.vocab_size, 2, MAX_VOCAB),
        ("model.seq_length", m.seq_length, 1, MAX_SEQ_LENGTH),
        ("parallel.tensor_model_parallel_size", p.tensor_model_parallel_size, 1, MAX_PARALLEL),
        ("parallel.pipeline_model_parallel_size", p.pipeline_model_parallel_size, 1, MAX_PARALLEL),
        ("parallel.context_parallel_size", p.context_parallel_size, 1, MAX_PARALLEL),
        ("parallel.virtual_pipeline_model_parallel_size", p.virtual_pipeline_model_parallel_size, 1, MAX_PARALLEL),
        ("parallel.ddp_bucket_size", p.ddp_bucket_size, 1, MAX_PARAMETERS),
        ("training.train_iters", t.train_iters, 1, MAX_ITERS),
        ("training.micro_batch_size", t.micro_batch_size, 1, MAX_GLOBAL_BATCH),
        ("training.global_batch_size", t.global_batch_size, 1, MAX_GLOBAL_BATCH),
        ("training.seed", t.seed, 0, MAX_SEED),
        ("training.exit_interval", t.exit_interval, 0, MAX_INTERVAL),
        ("training.eval_interval", t.eval_interval, 1, MAX_INTERVAL),
        ("training.eval_iters", t.eval_iters, 1, MAX_ITERS),
        ("training.nonfinite_patience", t.nonfinite_patience, 0, MAX_ITERS),
        ("training.fp8_amax_history_len", t.fp8_amax_history_len, 1, 2**16),  # TE keeps it on the device per GEMM
        ("training.fp8_margin", t.fp8_margin, 0, 127),  # a power of two: 2^-margin of FP8's range
        ("optimizer.warmup_iters", o.warmup_iters, 0, MAX_ITERS),
        ("optimizer.lr_decay_iters", o.lr_decay_iters, 1, MAX_ITERS),
        ("optimizer.lr_wsd_decay_iters", o.lr_wsd_decay_iters, 1, MAX_ITERS),
        ("checkpoint.save_interval", c.checkpoint.save_interval, 1, MAX_INTERVAL),
        ("checkpoint.keep_last", c.checkpoint.keep_last, 1, MAX_ITERS),
        ("logging.log_interval", c.logging.log_interval, 1, MAX_INTERVAL),
        ("data.tiny_corpus_documents", d.tiny_corpus_documents, 1, MAX_TINY_DOCUMENTS),
        ("data.tiny_corpus_passkey_prompts", d.tiny_corpus_passkey_prompts, 0, MAX_TINY_DOCUMENTS),
        ("data.tokenizer_vocab_size", d.tokenizer_vocab_size, 2, MAX_VOCAB),
        ("pose.target_length", pose.target_length, 0, MAX_SEQ_LENGTH),
        ("pose.num_chunks", pose.num_chunks, 1, MAX_SEQ_LENGTH),
    ]
    for key, value, lowest, highest in ranges:
        if value is None:
            continue
        check(value >= lowest, f"{key} ({value}) must be >= {lowest} (and at most {_number(highest)})")
        check(value <= highest, f"{key} ({_number(value)}) must be <= {_number(highest)}: far beyond any real run "
                                "(megatron_ext/config/limits.py gives each bound's reason); check the exponent")
    for key, values in (("parallel.hierarchical_context_parallel_sizes", p.hierarchical_context_parallel_sizes),
                        ("training.rampup_batch_size", t.rampup_batch_size)):
        for i, value in enumerate(values or ()):
            check(1 <= value <= MAX_SAMPLES, f"{key}[{i}] ({_number(value)}) must be in [1, {_number(MAX_SAMPLES)}]")
    _validate_run_length(c)
    _validate_model_size(c)
    _validate_upsample(d.upsample)
    if pose.enabled:
        check(pose.num_chunks <= m.seq_length,
              f"pose.num_chunks ({pose.num_chunks}) must be at most model.seq_length ({m.seq_length}): every chunk "
              "holds at least one token")


def validate_tiny_vocabulary(c) -> None:
    """The tiny corpus trains its own tokenizer of data.tokenizer_vocab_size ids: a smaller model.vocab_size would be
    indexed past its embedding in the first step (train's data check; `plan` plans the shape as given)."""
    m, d = c.model, c.data
    check(not d.tiny_corpus or m.vocab_size is None or m.vocab_size >= d.tokenizer_vocab_size,
          f"model.vocab_size ({m.vocab_size}) is smaller than the tiny corpus' tokenizer (data.tokenizer_vocab_size "
          f"{d.tokenizer_vocab_size}): its ids would index past the embedding; leave model.vocab_size out (null) "
          "to take the tokenizer's")


def _validate_run_length(c) -> None:
    """The samples megatron indexes up front (train_iters x global_batch_size, eval_iters x it) and their tokens."""
    t, m = c.training, c.model
    for key, iters in (("training.train_iters", t.train_iters), ("training.eval_iters", t.eval_iters)):
        samples = iters * t.global_batch_size
        check(samples <= MAX_SAMPLES,
              f"{key} x training.global_batch_size = {iters} x {t.global_batch_size} = {_number(samples)} samples, "
              f"more than {_number(MAX_SAMPLES)} (2x the largest published run; megatron indexes every sample "
              "before the first step): lower them")
        check(samples * m.seq_length <= MAX_TOKENS,
              f"{key} x training.global_batch_size x model.seq_length = {_number(samples * m.seq_length)} tokens, "
              f"more than {_number(MAX_TOKENS)}: lower them")


def _validate_model_size(c) -> None:
    """Parameters of the model as configured (the tokenizer's vocabulary when model.vocab_size is null)."""
    from megatron_ext.sizes import matmul_parameters

    m = c.model
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads < 1 or m.hidden_size % m.num_attention_heads:
        return  # the divisibility rule reports it
    parameters = matmul_parameters(m.num_layers, m.hidden_size, m.ffn_size, m.num_attention_heads, groups,
                                   m.vocab_size or 0, m.swiglu)
    check(parameters <= MAX_PARAMETERS,
          f"the model has {_number(parameters)} parameters (model.num_layers {m.num_layers}, hidden_size "
          f"{m.hidden_size}, ffn_hidden_size {m.ffn_size}, vocab_size {m.vocab_size}), more than "
          f"{_number(MAX_PARAMETERS)}: check those sizes")


def _validate_upsample(upsample: dict) -> None:
    """data.upsample: {source: {min_tokens: >= 0, factor: 1..MAX_UPSAMPLE_FACTOR}} (megatron_ext/data/preprocess)."""
    for source, rule in upsample.items():
        key = f"data.upsample.{source}"
        check(set(rule) == {"min_tokens", "factor"},
              f"{key} has keys {sorted(map(str, rule))}: give exactly min_tokens and factor, e.g. "
              "{min_tokens: 512, factor: 2}")
        check(0 <= rule["min_tokens"] <= MAX_SEQ_LENGTH * 1024,
              f"{key}.min_tokens ({_number(rule['min_tokens'])}) must be >= 0 tokens (and below "
              f"{_number(MAX_SEQ_LENGTH * 1024)})")
        check(1 <= rule["factor"] <= MAX_UPSAMPLE_FACTOR,
              f"{key}.factor ({_number(rule['factor'])}) must be in [1, {MAX_UPSAMPLE_FACTOR}]: how many times each "
              "long document is written")


def _number(value) -> str:
    """An integer for a message: as written when short, else in scientific notation (a 30-digit value is noise)."""
    if isinstance(value, int) and abs(value) >= 10**7:
        return f"{value:.3g}"  # ints are int64 by now (megatron_ext/config/types.py), floats hold them
    return str(value)
