"""torchrun worker for tests/test_hf_mapping.py: import HF weights at several TP/PP layouts,
run a forward pass, and write what the test compares against transformers and the source:

    torchrun --nproc-per-node N tests/workers/convert_worker.py OUT TOKENS LAYOUTS HF_DIR...

LAYOUTS is e.g. "1x1,2x1,1x2" (TPxPP, optionally xVPP). For each HF folder and layout, the
ranks that hold the full logits write OUT/<folder>_tp{T}_pp{P}[_vpp{V}].logits.pt
(vocab-gathered, padding stripped) and global rank 0 writes export_hf_weights' tensors to
OUT/<folder>_tp..._pp....safetensors (metadata "order": the names in the order yielded).
"""
from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist


def forward_logits(chunks, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocab logits [b, s, V_padded] on the last stage (None elsewhere), through
    megatron-core's pipeline schedule (forward only)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0)

    def step(data_iterator, model):
        sample = next(data_iterator)
        out = model(sample, position_ids, attention_mask=None)
        return out, lambda output, non_loss_data=False: output

    # One micro-batch per sample: the interleaved schedule needs at least PP of them.
    iters = [iter(tokens.split(1)) for _ in chunks]
    out = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iters if len(chunks) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=b, seq_length=s,
        micro_batch_size=1, forward_only=True, collect_non_loss_data=True)
    if not mpu.is_pipeline_last_stage(ignore_virtual=True):
        return None
    local = torch.cat(out).contiguous()
    tp = mpu.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local, group=mpu.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def main() -> None:
    from safetensors.torch import save_file

    from megatron_tbrm.hf_mapping import export_hf_weights, import_hf_weights
    from megatron_tbrm.model import ModelConfig, build_model
    from megatron_tbrm.parallel import current_state, destroy_distributed, init_distributed

    out, tokens_file, layouts, *hf_dirs = sys.argv[1:]
    tokens = torch.load(tokens_file)
    torch.set_num_threads(1)
    for layout in layouts.split(","):
        tp, pp, *vpp = (int(x) for x in layout.split("x"))
        vpp = vpp[0] if vpp else None
        ps = init_distributed(tp=tp, pp=pp, vpp=vpp)
        for hf_dir in hf_dirs:
            cfg = ModelConfig.from_hf(hf_dir)
            chunks = build_model(cfg)
            import_hf_weights(chunks, cfg, hf_dir)
            for c in chunks:
                c.eval()
            tag = f"{Path(hf_dir).name}_tp{tp}_pp{pp}" + (f"_vpp{vpp}" if vpp else "")
            with torch.no_grad():
                logits = forward_logits(chunks, tokens)
            ps = current_state()
            if logits is not None and ps.tp_rank == 0 and ps.dp_rank == 0:
                torch.save(logits[..., : cfg.vocab_size].clone(), f"{out}/{tag}.logits.pt")
            exported = dict(export_hf_weights(chunks, cfg))
            if ps.rank == 0:
                save_file(exported, f"{out}/{tag}.safetensors", metadata={"order": json.dumps(list(exported))})
            else:
                assert not exported, "export_hf_weights yielded on a rank other than 0"
    destroy_distributed()


if __name__ == "__main__":
    main()
