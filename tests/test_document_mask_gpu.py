"""Document masking on the GPU path: Transformer Engine attention over megatron's packed (THD) sequences gives
the per-token losses of the SDPA attention's block-causal mask from document ids (the path the CPU tests check
against documents run alone). Skipped without CUDA and Transformer Engine."""

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

SEQ, VOCAB = 64, 256
DOCUMENT_LENGTHS = ((20, 13, 31), (5, 59))
# the local spec keeps the layer norms apart; TE fuses them into the next linear layer
TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def build(use_transformer_engine: bool):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_ext.models import LongContextGPTModel, LongContextTransformerConfig, layer_spec
    from megatron_ext.rope import RopeConfig

    config = LongContextTransformerConfig(
        num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256,
        params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16, bf16=True, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, calculate_per_token_loss=True,
        rope=RopeConfig(head_base_strategy="uniform", head_base_params={"b_min": 1e4, "b_max": 1e6}),
    )
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    spec = layer_spec(use_transformer_engine, normalization="RMSNorm")
    return LongContextGPTModel(config, spec, VOCAB, SEQ, share_embeddings_and_output_weights=False).cuda().eval()


def copy_weights(local, te):
    te_params = dict(te.named_parameters())
    with torch.no_grad():
        for name, param in local.named_parameters():
            prefix, _, suffix = name.partition("layers.")
            layer, _, rest = suffix.partition(".")
            te_name = f"{prefix}layers.{layer}.{TE_NAMES[rest]}" if rest in TE_NAMES else name
            te_params.pop(te_name).copy_(param)
    assert not te_params, f"TE parameters without a local counterpart: {sorted(te_params)}"


def packed_batch():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (len(DOCUMENT_LENGTHS), SEQ + 1), generator=g)
    document_ids = torch.stack([torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
                                for lengths in DOCUMENT_LENGTHS])
    position_ids = torch.cat([torch.arange(n) for lengths in DOCUMENT_LENGTHS for n in lengths]).view(-1, SEQ)
    return dict(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(), position_ids=position_ids,
                loss_mask=torch.ones(len(DOCUMENT_LENGTHS), SEQ), document_ids=document_ids)


def per_token_losses(model, batch):
    from megatron_ext.training.train import batch_on_this_rank, forward_step

    local, _, _ = batch_on_this_rank(batch, [model], torch.device("cuda"))
    with torch.no_grad():
        output, _ = forward_step(iter([local]), model)
    return local, output.float().reshape(len(DOCUMENT_LENGTHS), SEQ)  # THD: rows were laid end to end


def test_transformer_engine_packed_sequences_match_the_sdpa_document_mask(single_rank):
    pytest.importorskip("transformer_engine", reason="the THD path is Transformer Engine's")
    local_model, te_model = build(False), build(True)
    assert local_model.takes_document_ids and not te_model.takes_document_ids
    copy_weights(local_model, te_model)
    batch = packed_batch()
    sdpa_batch, sdpa = per_token_losses(local_model, batch)
    thd_batch, thd = per_token_losses(te_model, batch)
    assert "document_ids" in sdpa_batch and "packed_seq_params" in thd_batch
    assert thd_batch["packed_seq_params"].cu_seqlens_q.tolist() == [0, 20, 33, 64, 69, 128]
    torch.testing.assert_close(thd, sdpa, atol=3e-2, rtol=1e-2)  # bf16
    without_documents = {name: value for name, value in batch.items() if name != "document_ids"}
    _, crossing = per_token_losses(te_model, without_documents)
    assert (crossing - sdpa).abs().max() > 0.1  # control: attention across documents changes the losses
