"""Hugging Face <-> megatron-core weights: one declarative table per model family.

Every consumer (the conversion tools, the trainer's weight sync to vLLM) goes through the
same table and the same two functions, so a naming or layout bug shows up everywhere at
once instead of silently corrupting only the rollout policy:

    import_hf_weights(chunks, cfg, hf_dir)      # HF folder -> this rank's TP/PP shards
    export_hf_weights(chunks, cfg)              # -> (hf_name, full tensor), on global rank 0
    hf_config_for(cfg)                          # the HF config.json to write next to them

Megatron layouts the table's kinds encode (TP rank r of tp):
- column: dim 0 split in tp equal blocks; row: dim 1 split.
- vocab: dim 0 of the *padded* vocabulary (cfg.padded_vocab_size(tp)) split; the padding
  rows are zero on import and stripped on export.
- qkv: rows interleaved per KV group, [q heads of group g; k_g; v_g] for g = 0..kv-1; TP
  rank r holds groups r*kv/tp .. (r+1)*kv/tp.  The q/k/v biases follow the same rule.
- gated_mlp: linear_fc1 on rank r is [gate_r; up_r], so the full (TP=1-equivalent) tensor
  is [gate_0; up_0; gate_1; up_1; ...], not [gate; up].
- replicated: the same full tensor on every rank (norms).

megatron-core imports lazily: the tools validate inputs and fail fast without it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .hf_weights import HFWeights, WeightsError  # noqa: F401 (WeightsError re-exported)
from .log import on_terminal
from .model import ModelConfig, unwrap

REPLICATED, COLUMN, ROW, VOCAB, QKV, GATED_MLP = "replicated", "column", "row", "vocab", "qkv", "gated_mlp"


@dataclass(frozen=True)
class Row:
    """One Megatron parameter <-> its HF tensor(s).

    `megatron`/`hf` use `{i}` for the layer index (local to the stage in Megatron names,
    global in HF names); `shapes` gives each HF tensor's shape in config symbols
    (h hidden, q = heads*head_dim, kv = kv_heads*head_dim, f ffn, v vocab); `when` says
    which configs have the tensor.
    """

    megatron: str
    hf: tuple[str, ...]
    kind: str
    shapes: tuple[str, ...]
    when: Optional[Callable[[ModelConfig], bool]] = None

    def applies(self, cfg: ModelConfig) -> bool:
        return self.when is None or self.when(cfg)


def _has_qkv_bias(cfg: ModelConfig) -> bool:
    return cfg.qkv_bias


def _untied(cfg: ModelConfig) -> bool:
    return not cfg.tie_word_embeddings


_ATTN = "model.layers.{i}.self_attn."
_MLP = "model.layers.{i}.mlp."

# Qwen2: Llama's architecture with q/k/v biases (the `when` on the bias row covers both).
QWEN2: tuple[Row, ...] = (
    Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB, ("v h",)),
    Row("decoder.layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",), REPLICATED, ("h",)),
    # Transformer Engine spec: the norm lives inside the fused linear (same HF tensor).
    Row("decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight", ("model.layers.{i}.input_layernorm.weight",),
        REPLICATED, ("h",)),
    Row("decoder.layers.{i}.self_attention.linear_qkv.weight",
        (_ATTN + "q_proj.weight", _ATTN + "k_proj.weight", _ATTN + "v_proj.weight"), QKV, ("q h", "kv h", "kv h")),
    Row("decoder.layers.{i}.self_attention.linear_qkv.bias",
        (_ATTN + "q_proj.bias", _ATTN + "k_proj.bias", _ATTN + "v_proj.bias"), QKV, ("q", "kv", "kv"), _has_qkv_bias),
    Row("decoder.layers.{i}.self_attention.linear_proj.weight", (_ATTN + "o_proj.weight",), ROW, ("h q",)),
    Row("decoder.layers.{i}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",),
        REPLICATED, ("h",)),
    Row("decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight", ("model.layers.{i}.post_attention_layernorm.weight",),
        REPLICATED, ("h",)),
    Row("decoder.layers.{i}.mlp.linear_fc1.weight", (_MLP + "gate_proj.weight", _MLP + "up_proj.weight"), GATED_MLP,
        ("f h", "f h")),
    Row("decoder.layers.{i}.mlp.linear_fc2.weight", (_MLP + "down_proj.weight",), ROW, ("h f",)),
    Row("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED, ("h",)),
    # Absent when tied: the first stage's embedding is the output layer (a copy on the last
    # stage with PP>1, which mcore names output_layer.weight; see _rows_for).
    Row("output_layer.weight", ("lm_head.weight",), VOCAB, ("v h",), _untied),
)

# Llama: the same names; q/k/v biases only with `attention_bias` (cfg.qkv_bias).
LLAMA: tuple[Row, ...] = QWEN2

TABLES: dict[str, tuple[Row, ...]] = {"qwen2": QWEN2, "llama": LLAMA}

# HF tensors that are buffers, not weights (older checkpoints store them).
_IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def hf_config_for(model_cfg: ModelConfig) -> dict:
    """The HF config.json of the model: the source's, unchanged (architecture fields only
    come from it; trainer settings never leak into it)."""
    return copy.deepcopy(model_cfg.hf_config)


# ---------------------------------------------------------------------------------------
# Table lookups


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


def _match(cfg: ModelConfig, name: str) -> tuple[Row, Optional[int]]:
    """The table row of a Megatron parameter name and its local layer index."""
    for row in TABLES[cfg.family]:
        m = _pattern(row.megatron).match(name)
        if m:
            return row, int(m.group(1)) if m.groups() else None
    raise WeightsError(f"Megatron parameter {name!r} has no Hugging Face mapping in the {cfg.family} table")


def _dims(cfg: ModelConfig) -> dict[str, int]:
    return {
        "h": cfg.hidden_size,
        "q": cfg.num_attention_heads * cfg.kv_channels,
        "kv": cfg.num_kv_heads * cfg.kv_channels,
        "f": cfg.ffn_hidden_size,
        "v": cfg.vocab_size,
    }


def _shape(spec: str, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(dims[s] for s in spec.split())


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of the model with the shape its config.json implies, in HF order."""
    dims = _dims(cfg)
    out: dict[str, tuple[int, ...]] = {}
    rows = [r for r in TABLES[cfg.family] if r.applies(cfg)]
    for layer in [None, *range(cfg.num_layers)]:
        for row in rows:
            if ("{i}" in row.megatron) != (layer is not None):
                continue
            for name, spec in zip(row.hf, row.shapes):
                out[name.format(i=layer)] = _shape(spec, dims)
    # Keep HF's order: embeddings, layers, final norm, lm_head.
    tail = [k for k in ("model.norm.weight", "lm_head.weight") if k in out]
    return {**{k: v for k, v in out.items() if k not in tail}, **{k: out[k] for k in tail}}


def _global_layer(chunk, local: Optional[int]) -> Optional[int]:
    return None if local is None else chunk.decoder.layers[local].layer_number - 1


def _local_params(model_chunks: list, cfg: ModelConfig) -> list[tuple[int, str, torch.nn.Parameter, Row, Optional[int]]]:
    """(chunk index, Megatron name, parameter, row, global layer) for this rank's weights.

    The last stage's tied copy of the embedding (output_layer.weight with PP>1 and tied
    embeddings) is imported from the embedding and never exported twice: `row` is the
    embedding row for it.
    """
    out = []
    for c, chunk in enumerate(model_chunks):
        model = unwrap(chunk)
        for name, p in model.named_parameters():
            if _is_tied_copy(name, cfg):
                out.append((c, name, p, _match(cfg, "embedding.word_embeddings.weight")[0], None))
                continue
            row, local = _match(cfg, name)
            if not row.applies(cfg):
                raise WeightsError(f"Megatron parameter {name!r} exists but the config says it should not "
                                   f"(qkv_bias={cfg.qkv_bias}, tie_word_embeddings={cfg.tie_word_embeddings})")
            out.append((c, name, p, row, _global_layer(model, local)))
    return out


def _is_tied_copy(name: str, cfg: ModelConfig) -> bool:
    return name == "output_layer.weight" and cfg.tie_word_embeddings


def check_hf_weights(weights: HFWeights, cfg: ModelConfig) -> None:
    """Every tensor the config implies is present with the implied shape; nothing unmapped."""
    expected = expected_hf_shapes(cfg)
    for name, shape in expected.items():
        if name not in weights.shapes:
            raise WeightsError(f"tensor {name!r} is missing from {weights.dir} (expected shape {list(shape)})")
        if weights.shapes[name] != shape:
            raise WeightsError(f"tensor {name!r} in {weights.files[name]} has shape {list(weights.shapes[name])}, "
                               f"but config.json implies {list(shape)}")
    for name in weights.shapes:
        tied_head = name == "lm_head.weight" and cfg.tie_word_embeddings
        if name not in expected and not tied_head and not _IGNORED_HF.fullmatch(name):
            raise WeightsError(f"tensor {name!r} in {weights.files[name]} has no Megatron counterpart "
                               f"in the {cfg.family} table (unsupported model variant?)")


# ---------------------------------------------------------------------------------------
# Import: read this rank's slice of each tensor


def _rank_slice(weights: HFWeights, row: Row, names: list[str], cfg: ModelConfig, tp: int, r: int) -> torch.Tensor:
    kind = row.kind
    if kind == REPLICATED:
        return weights.slice(names[0])[:]
    if kind in (COLUMN, ROW):
        full = weights.shapes[names[0]]
        dim = 0 if kind == COLUMN else 1
        n = full[dim] // tp
        return weights.slice(names[0])[r * n:(r + 1) * n] if dim == 0 else weights.slice(names[0])[:, r * n:(r + 1) * n]
    if kind == VOCAB:
        # Rows [r*Vp/tp, (r+1)*Vp/tp) of the padded table: real rows from the file, zeros beyond.
        n = cfg.padded_vocab_size(tp) // tp
        lo, hi = r * n, min((r + 1) * n, cfg.vocab_size)
        part = weights.slice(names[0])[lo:hi] if lo < hi else None
        out = torch.zeros((n, *weights.shapes[names[0]][1:]), dtype=part.dtype if part is not None else torch.float32)
        if part is not None:
            out[: hi - lo] = part
        return out
    if kind == QKV:
        hd, groups = cfg.kv_channels, cfg.num_kv_heads
        per_rank, q_per_group = groups // tp, cfg.num_attention_heads // groups
        g0, g1 = r * per_rank, (r + 1) * per_rank
        q = weights.slice(names[0])[g0 * q_per_group * hd:g1 * q_per_group * hd]
        k = weights.slice(names[1])[g0 * hd:g1 * hd]
        v = weights.slice(names[2])[g0 * hd:g1 * hd]
        rest = q.shape[1:]
        qkv = torch.cat([q.reshape(per_rank, q_per_group * hd, *rest), k.reshape(per_rank, hd, *rest),
                         v.reshape(per_rank, hd, *rest)], dim=1)
        return qkv.reshape(-1, *rest)
    if kind == GATED_MLP:
        n = cfg.ffn_hidden_size // tp
        return torch.cat([weights.slice(names[0])[r * n:(r + 1) * n], weights.slice(names[1])[r * n:(r + 1) * n]])
    raise AssertionError(kind)


@torch.no_grad()
def import_hf_weights(model_chunks: list, model_cfg: ModelConfig, hf_dir: str | Path, progress: bool = False) -> None:
    """Load an HF folder into this rank's chunks at the current TP/PP layout.

    Reads only this rank's slices (safetensors get_slice), one tensor at a time. Import
    before building an optimizer: a distributed optimizer keeps its own fp32 copies.
    """
    from megatron.core import parallel_state as mpu

    tp, r = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
    model_cfg.check_parallel(tp)
    params = _local_params(model_chunks, model_cfg)
    with HFWeights(hf_dir) as weights:
        check_hf_weights(weights, model_cfg)
        if progress and on_terminal():
            from tqdm import tqdm

            params = tqdm(params, desc="import", unit="tensor")
        for _, name, p, row, layer in params:
            names = [n.format(i=layer) for n in row.hf]
            local = _rank_slice(weights, row, names, model_cfg, tp, r)
            if local.shape != p.shape:
                raise WeightsError(f"{name}: the slice of {names} for TP rank {r}/{tp} has shape {list(local.shape)}, "
                                   f"the Megatron parameter {list(p.shape)}")
            p.copy_(local)


# ---------------------------------------------------------------------------------------
# Export: gather TP shards and PP stages to global rank 0


def _gather_tp(local: torch.Tensor, kind: str, tp_group, tp: int) -> torch.Tensor:
    """The TP=1-equivalent Megatron tensor (padded vocab, per-rank gate/up blocks)."""
    import torch.distributed as dist

    if kind == REPLICATED or tp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=tp_group)
    return torch.cat(parts, dim=1 if kind == ROW else 0)


def _to_hf(kind: str, full: torch.Tensor, cfg: ModelConfig, tp: int) -> list[torch.Tensor]:
    """Split/un-interleave a gathered Megatron tensor into its HF tensors."""
    if kind in (REPLICATED, COLUMN, ROW):
        return [full]
    if kind == VOCAB:
        return [full[: cfg.vocab_size]]
    if kind == QKV:
        hd, groups = cfg.kv_channels, cfg.num_kv_heads
        qg = cfg.num_attention_heads // groups * hd
        rest = full.shape[1:]
        q, k, v = full.reshape(groups, qg + 2 * hd, *rest).split([qg, hd, hd], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]
    if kind == GATED_MLP:
        blocks = full.reshape(tp, 2, cfg.ffn_hidden_size // tp, *full.shape[1:])
        return [blocks[:, 0].reshape(cfg.ffn_hidden_size, -1), blocks[:, 1].reshape(cfg.ffn_hidden_size, -1)]
    raise AssertionError(kind)


def _order(row_idx: int, layer: Optional[int], row: Row, cfg: ModelConfig) -> tuple[int, int]:
    """Sort key giving HF order: embedding (-1), layers 0..L-1, final norm and lm_head (L).
    The first element doubles as the `{i}` of layer rows."""
    if layer is not None:
        return (layer, row_idx)
    return (-1 if row.megatron.startswith("embedding.") else cfg.num_layers, row_idx)


_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


@torch.no_grad()
def export_hf_weights(model_chunks: list, model_cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full unpadded HF-shaped tensor) one parameter at a time, on global
    rank 0 only, in HF order. Every rank must iterate the generator to the end: it runs
    the TP all-gathers and PP sends. Only DP rank 0's replica takes part (the others
    return at once). Tensors are on the parameters' device and dtype.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    if mpu.get_data_parallel_rank(with_context_parallel=True) != 0:
        return
    tp, tp_rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
    pp_rank = mpu.get_pipeline_model_parallel_rank()
    tp_group, pp_group = mpu.get_tensor_model_parallel_group(), mpu.get_pipeline_model_parallel_group()
    first_rank = mpu.get_pipeline_model_parallel_first_rank()
    rows = TABLES[model_cfg.family]
    dims = _dims(model_cfg)
    device = next(unwrap(model_chunks[0]).parameters()).device

    local = [x for x in _local_params(model_chunks, model_cfg) if not _is_tied_copy(x[1], model_cfg)]
    # Every stage learns every stage's list, so all ranks walk one global plan in HF order.
    meta = [(_order(rows.index(row), layer, row, model_cfg), j, str(p.dtype)) for j, (_, _, p, row, layer) in enumerate(local)]
    all_meta: list = [None] * mpu.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(all_meta, meta, group=pp_group)
    plan = sorted((key, owner, j, dtype) for owner, m in enumerate(all_meta) for key, j, dtype in m)

    for (layer, row_idx), owner, j, dtype in plan:
        row = rows[row_idx]
        names = [n.format(i=layer) for n in row.hf]
        tensors: Optional[list[torch.Tensor]] = None
        if owner == pp_rank:
            p = local[j][2]
            full = _gather_tp(p.detach(), row.kind, tp_group, tp)
            tensors = [t.contiguous() for t in _to_hf(row.kind, full, model_cfg, tp)]
        if tp_rank == 0 and owner != 0:
            if pp_rank == owner:
                for t in tensors:
                    dist.send(t, dst=first_rank)
            elif pp_rank == 0:
                src = dist.get_global_rank(pp_group, owner)
                tensors = [torch.empty(_shape(s, dims), dtype=_DTYPES[dtype], device=device) for s in row.shapes]
                for t in tensors:
                    dist.recv(t, src=src)
        if dist.get_rank() == 0:
            yield from zip(names, tensors)
