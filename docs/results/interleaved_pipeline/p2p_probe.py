"""One forward-backward of 4 micro-batches of a 4-layer LongContextGPTModel through megatron-core's pipeline
schedules on gloo (CPU): the per-micro-batch losses and every parameter's gradient norm, written as JSON.

    torchrun --nproc-per-node 1 p2p_probe.py --pp 1 --out pp1.json
    torchrun --nproc-per-node 2 p2p_probe.py --pp 2 --vpp 2 --batched-p2p --out vpp2_batched.json
    torchrun --nproc-per-node 2 p2p_probe.py --pp 2 --vpp 2 --out vpp2.json
"""

import argparse
import json

import torch

from megatron_ext.compat import prepare_megatron


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--vpp", type=int)
    parser.add_argument("--batched-p2p", action="store_true", help="megatron's batch_isend_irecv path")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    prepare_megatron()
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ext.config import TrainConfig, from_dict
    from megatron_ext.models import LongContextGPTModel, layer_spec
    from megatron_ext.models.builder import transformer_config
    from megatron_ext.models.init import global_param_name, layout_independent_init

    torch.distributed.init_process_group("gloo")
    ps.initialize_model_parallel(pipeline_model_parallel_size=args.pp, virtual_pipeline_model_parallel_size=args.vpp)
    config = from_dict(TrainConfig, dict(model=dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32),
                                         data=dict(tiny_corpus=True), training=dict(precision="fp32"),
                                         parallel=dict(pipeline_model_parallel_size=args.pp,
                                                       virtual_pipeline_model_parallel_size=args.vpp)), prefix="")
    tc = transformer_config(config, torch.device("cpu"))
    tc.batch_p2p_comm = args.batched_p2p
    chunks = []
    for vp_stage in range(args.vpp or 1):
        chunk = LongContextGPTModel(
            tc, layer_spec(normalization="RMSNorm"), 256, 32,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage if args.vpp else None),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage if args.vpp else None),
            vp_stage=vp_stage if args.vpp else None)
        layout_independent_init(chunk, 7)
        chunks.append(chunk)
    generator = torch.Generator().manual_seed(0)
    micro_batches = [dict(tokens=torch.randint(0, 256, (1, 32), generator=generator),
                          labels=torch.randint(0, 256, (1, 32), generator=generator),
                          position_ids=torch.arange(32)[None]) for _ in range(4)]

    def loss_func(per_token):
        total = per_token.float().sum()
        return total, torch.tensor(per_token.numel()), {"lm loss": total.detach() / per_token.numel()}

    def forward_step(iterator, model):
        batch = next(iterator)
        return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]), loss_func

    data = [iter(micro_batches) for _ in chunks] if args.vpp else iter(micro_batches)
    losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data, model=chunks,
                                         num_microbatches=4, seq_length=32, micro_batch_size=1, forward_only=False)
    result = {"micro_batch_losses": [round(float(l["lm loss"]), 6) for l in losses]} if losses else {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            result[global_param_name(name, chunk)] = float(param.grad.norm())
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, result)
    if torch.distributed.get_rank() == 0:
        merged = {key: value for part in gathered for key, value in part.items()}
        with open(args.out, "w") as f:
            json.dump(merged, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
