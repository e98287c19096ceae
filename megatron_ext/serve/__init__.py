"""Serving exports with vLLM: the HARPE plugin (per-KV-group RoPE bases) and `megatron-ext serve`.

plugin.py is vLLM's entry point; vllm_models.py the model classes it registers (vLLM's own Llama / Mistral /
Qwen2 with the rotation of rotary.py); export_rope.py reads and checks an export's RoPE. Only vllm_models.py
imports vllm. Above hf/ and convert/ in the floors; imports nothing of training/.
"""
