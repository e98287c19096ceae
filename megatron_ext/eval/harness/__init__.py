"""EleutherAI's lm-evaluation-harness on our models: `megatron-ext eval lm-eval` and the suite's `lm_eval` section.

Names: the registry task is `lm_eval` (an identifier: the suite's YAML section and `tasks:` entry, like the
harness's own Python package); the command users type is `megatron-ext eval lm-eval`, the spelling of the
harness's own command (`eval lm_eval` works too). Modules:

- settings.py: `LmEvalSettings` (every default) and the install check; standard library only, as the
  command line is built from it at every start.
- tasks.py: which harness tasks a setting names, checked and built offline before any model loads.
- lm.py: `EvalModelLM`, the harness's `LM` over an `EvalModel` (our checkpoints with their own RoPE, HF dirs).
- decoding.py: greedy generation with a KV cache for `generate_until`: which cache a model gets (our checkpoints:
  megatron-core's static inference context, in megatron_ext/models/decoding.py; transformers' cache; else none).
- task.py: the registry's hooks (prepare, evaluate, report_section, output_files) and the result.

Importing this package imports nothing: lm-eval, torch and megatron load when a run starts.
"""
