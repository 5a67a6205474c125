"""Memory plan: what a recipe puts on each GPU, as ESTIMATES from published formulas.

    python -m megatron_tbrm.plan --config recipes/X.yaml [--gpus-per-node 8 --nodes 1 --gpu-memory-gb 80]
                                 [--hf-config FILE_OR_DIR] [key.sub=value ...]

The recipe is read by the trainer's own loader (config.load_config, overrides included); the
model's shape comes from its HF config.json (model.path, or --hf-config). Nothing is allocated
and no GPU is needed. Exit 0 when every GPU fits, 2 when one does not (the message names the
knob to change and, where a single change fits, its value), 1 for a missing or bad file.

Formulas (docs/memory_plan.md has them in full; GB = 10^9 bytes; P = this rank's parameters,
d = DP x CP, s = data.max_prompt_tokens + rollout.max_tokens, b = train.micro_batch_size; with
train.max_tokens_per_microbatch B a micro-batch holds up to B tokens in trajectories of up to s:
b = B / s rows' worth, so the token terms scale with B and the attention scores with s * B, as
packed (THD) attention per trajectory or B / s padded rows of s have them):
- weights 2P (bf16), fp32 main gradients 4P (grad_reduce_in_fp32), Adam's fp32 master + two
  moments 12P / d with the distributed optimizer: megatron-core's distributed-optimizer
  accounting, "6 + 12/d bytes per parameter".
- activations per layer and micro-batch: s*b*h*(34 + 5*a*s/h) bytes (Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models", arXiv 2205.05198, eq. 1-2,
  Table 2): 10*s*b*h split over TP only with sequence parallelism, the rest always; selective
  recompute drops 5*a*s/h; full keeps the layer input 2*s*b*h plus one layer's working set;
  1F1B stage k holds min(p - k, micro-batches) in flight, interleaving x (1 + (p-1)/(p*vpp)).
  One change for this model family: the published MLP term counts a 4h GeLU MLP (16*s*b*h
  inside it); a gated MLP of width f keeps fc1's output and fc2's input, 6f/h instead.
- logits: b*s*V'/t elements kept + their gradient in the model dtype, + vocab_parallel.py's fp32
  chunk temporary (last stage); the reference's weights unless train.ref_offload (then only in
  the reference-forward phase); vLLM: rollout.gpu_memory_utilization x GPU memory (or weights +
  rollout.kv_cache_bytes) on each GPU an engine runs on, its KV cache 2 * L * kv_heads *
  head_dim * bytes per token; RESERVE_GB per trainer GPU (assumed).
- phases of a GPU: the trainer's update and reference forward, with what vLLM holds meanwhile
  (all of it; with sleep mode only what sleep does not release, VLLM_RUNTIME_GB assumed), and
  the rollout: the trainer's resident state (weights, gradients, optimizer, reserve, a resident
  reference) + vLLM awake. Peak = the largest phase: without sleep max(trainer phases) + vLLM,
  with sleep about max(trainer phases, rollout) (rollout.sleep_mode; auto sleeps on GPUs
  unless attached or train.max_staleness > 0).

Where things run (today's trainer): rank r on node r // G, GPU r % G, TP fastest, then CP, DP,
PP; trainer rank 0 starts rollout.engines vLLM engines on node 0, engine i on GPUs
i*T .. (i+1)*T - 1 (T = rollout.tensor_parallel_size; auto: G // T engines, every GPU); none
with rollout.server_url(s).
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

GB = 1e9
RESERVE_GB = 3.0  # per trainer GPU: CUDA context, NCCL buffers, allocator fragmentation (assumed)
VLLM_RUNTIME_GB = 2.0  # inside vLLM's budget: its profiled activation peak and CUDA graphs (assumed)
LOGITS_CHUNK = 512  # vocab_parallel.DEFAULT_CHUNK_SIZE (not imported: that module imports torch)
BYTES = {"fp32": 4, "float32": 4, "float": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2}


class PlanError(ValueError):
    """The plan cannot be made (a layout the trainer or vLLM refuses)."""


@dataclass
class Layout:
    gpus_per_node: int = 8
    nodes: int = 1
    gpu_memory_gb: float = 80.0

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


# ------------------------------------------------------------------------------ formulas


def layer_params(m, tp: int) -> float:
    """One transformer layer's parameters on one TP rank (norms replicated, the rest split)."""
    h, d = m.hidden_size, m.kv_channels
    qkv_out = (m.num_attention_heads + 2 * m.num_kv_heads) * d
    split = h * qkv_out + (qkv_out if m.qkv_bias else 0) + m.num_attention_heads * d * h + 3 * h * m.ffn_hidden_size
    return split / tp + 2 * h


def stage_params(m, tp: int, pp: int, stage: int) -> float:
    """Parameters on one rank of pipeline stage `stage`: its layers, the embedding on the first
    stage, the final norm and output layer on the last (a tied embedding is copied there when
    pp > 1, as megatron-core does)."""
    params = m.num_layers // pp * layer_params(m, tp)
    vocab = m.padded_vocab_size(tp) * m.hidden_size / tp
    if stage == 0:
        params += vocab
    if stage == pp - 1:
        params += m.hidden_size + (vocab if (not m.tie_word_embeddings or pp > 1) else 0)
    return params


def hf_params(m) -> float:
    """The whole model's parameters as vLLM loads them (true vocabulary)."""
    embed = m.vocab_size * m.hidden_size
    return m.num_layers * layer_params(m, 1) + m.hidden_size + embed * (1 if m.tie_word_embeddings else 2)


def layer_activation_bytes(s: int, b: int, h: int, a: int, f: int, tp: int, sp: bool, recompute: str,
                           dtype_bytes: int = 2, gated: bool = True) -> float:
    """Activation bytes one layer keeps for backward, one micro-batch (Korthikanti et al. 2022;
    the MLP term generalised to width f, see the module docstring). `recompute`: none,
    selective or full (full: the layer input only; the recompute working set is not here)."""
    scale = dtype_bytes / 2  # the paper counts 16-bit activations
    replicated = 10 / (tp if sp else 1)  # layer-norm inputs, dropout masks, column-linear inputs
    if recompute == "full":
        return s * b * h * 2 / (tp if sp else 1) * scale
    mlp = 6 * f / h if gated else 4 * f / h  # gated: fc1 output 4f + fc2 input 2f bytes / token
    split = (8 + mlp) / tp  # Q, K, V, attention-proj input + the MLP's inner activations
    attention = 0.0 if recompute == "selective" else 5 * a * s / (h * tp)  # softmax, its dropout
    return s * b * h * (replicated + split + attention) * scale


def kv_bytes_per_token(m, dtype_bytes: int) -> float:
    """vLLM's KV cache for one token, the whole model: K and V per layer per KV head."""
    return 2 * m.num_layers * m.num_kv_heads * m.kv_channels * dtype_bytes


# ------------------------------------------------------------------------------ the plan


@dataclass
class Group:
    """GPUs with the same contents: a pipeline stage, with or without a vLLM engine."""
    stage: int
    vllm: bool
    gpus: list = field(default_factory=list)  # (node, local gpu)
    rows: dict = field(default_factory=dict)  # component -> bytes
    phases: dict = field(default_factory=dict)  # phase -> bytes (trainer only)
    vllm_held: float = 0.0  # what vLLM holds during the trainer's phases (all, or asleep: its residue)
    rollout: float = 0.0  # the rollout phase: the trainer's resident state + vLLM awake

    @property
    def total(self) -> float:
        return max(max(self.phases.values()) + self.vllm_held, self.rollout)

    @property
    def peak_phase(self) -> str:
        trainer = max(self.phases, key=self.phases.get)
        if self.rollout > self.phases[trainer] + self.vllm_held:
            return "rollout phase (vLLM awake)"
        return f"{trainer} phase" + (" + vLLM" if self.vllm_held else "")

    def label(self) -> str:
        by_node: dict = {}
        for node, gpu in self.gpus:
            by_node.setdefault(node, []).append(gpu)
        if len(by_node) == 1 and 0 in by_node:
            return _span(by_node[0])
        parts = [f"n{node}:{_span(g)}" for node, g in sorted(by_node.items())]
        return ",".join(parts) if len(parts) <= 2 else f"{parts[0]},...,{parts[-1]}"


def _span(ids: list) -> str:
    return str(ids[0]) if len(ids) == 1 else f"{ids[0]}-{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) \
        else "+".join(map(str, ids))


@dataclass
class Plan:
    groups: list
    layout: Layout
    problems: list  # (knob, message): a layout vLLM or the trainer cannot run at all
    info: dict

    @property
    def worst(self) -> Group:
        return max(self.groups, key=lambda g: g.total)

    @property
    def fits(self) -> bool:
        return not self.problems and self.worst.total <= self.layout.gpu_memory_gb * GB


def model_shape(cfg, hf_config: Optional[str] = None):
    """ModelConfig of the recipe's model (model.path or hf_config), with the recipe's padding."""
    from .model import ModelConfig, ModelConfigError

    source = hf_config or cfg.model.path
    if not source:
        raise PlanError("config key 'model.path' is empty: give the model's config.json with --hf-config")
    try:
        return ModelConfig.from_hf(source, make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
                                   dtype=cfg.model.dtype)
    except ModelConfigError as e:
        where = "--hf-config" if hf_config else "config key 'model.path' (or give the shape with --hf-config)"
        raise PlanError(f"{where}: {e}") from None


def make_plan(cfg, m, layout: Layout, reserve_gb: float = RESERVE_GB) -> Plan:
    from .model import ModelConfigError

    par, r, tr = cfg.parallel, cfg.rollout, cfg.train
    tp, pp, cp = par.tp, par.pp, par.cp
    if layout.world % (tp * pp * cp):
        raise PlanError(f"config keys 'parallel.tp' x 'parallel.pp' x 'parallel.cp' = {tp * pp * cp} do not divide "
                        f"the {layout.world} GPUs ({layout.nodes} nodes x {layout.gpus_per_node})")
    try:
        m.check_parallel(tp, pp, par.vpp)
    except ModelConfigError as e:
        raise PlanError(f"config key '{'parallel.pp' if 'pipeline' in str(e) else 'parallel.tp'}': {e}") from None
    dp = layout.world // (tp * pp * cp)
    wbytes = BYTES[cfg.model.dtype]
    seq = cfg.data.max_prompt_tokens + r.max_tokens
    s, b = -(-seq // cp), tr.micro_batch_size
    n_mb = max(1, cfg.trajectories_per_step() // (dp * b))
    if tr.max_tokens_per_microbatch:  # the budget, not a row count, sizes a micro-batch
        b = tr.max_tokens_per_microbatch / cp / s
        # at most: every trajectory at the longest, as many as fit in a micro-batch
        n_mb = -(-cfg.trajectories_per_step() // (dp * max(1, tr.max_tokens_per_microbatch // seq)))
    vocab_local = m.padded_vocab_size(tp) / tp
    act = dict(s=s, b=b, h=m.hidden_size, a=m.num_attention_heads, f=m.ffn_hidden_size, tp=tp,
               sp=par.sequence_parallel, dtype_bytes=wbytes)
    one_layer = layer_activation_bytes(recompute="none", **act)  # the working set of one layer
    per_layer = layer_activation_bytes(recompute=cfg.model.recompute, **act)
    logits_elems = b * s * vocab_local
    chunk_tmp = min(LOGITS_CHUNK, b * s) * vocab_local * 4
    shard = (dp * cp) if par.distributed_optimizer else 1
    info = dict(dp=dp, seq=seq, n_mb=n_mb, params=hf_params(m), vocab_padded=m.padded_vocab_size(tp))

    problems: list = []
    vllm_gpus: set = set()
    vllm_rows: dict = {}
    sleep = info["sleep"] = cfg.engines_sleep(cuda=True)  # the trainer's rule, on GPUs
    if not r.attach_urls:
        rtp = r.tensor_parallel_size
        engines = r.engine_count(layout.gpus_per_node)
        info["engines"] = engines
        vbytes = BYTES.get(str(r.dtype or cfg.model.dtype), wbytes)
        if rtp > layout.gpus_per_node:
            problems.append(("rollout.tensor_parallel_size", f"vLLM's tensor_parallel_size {rtp} exceeds the "
                             f"{layout.gpus_per_node} GPUs of a node (engines are started on node 0)"))
        elif engines * rtp > layout.gpus_per_node:
            problems.append(("rollout.engines", f"{engines} vLLM engines x tensor_parallel_size {rtp} need "
                             f"{engines * rtp} GPUs; node 0 has {layout.gpus_per_node} (rollout.engines=auto: "
                             f"{layout.gpus_per_node // rtp})"))
        for what, n in (("num_attention_heads", m.num_attention_heads), ("num_key_value_heads", m.num_kv_heads)):
            if n % rtp and not (what == "num_key_value_heads" and rtp % n == 0):  # vLLM replicates KV heads
                problems.append(("rollout.tensor_parallel_size", f"vLLM's tensor_parallel_size {rtp} does not "
                                 f"divide {what}={n}"))
        vllm_gpus = {(0, g) for g in range(min(engines * rtp, layout.gpus_per_node))}
        weights = info["params"] / rtp * vbytes
        budget = (weights + r.kv_cache_bytes + VLLM_RUNTIME_GB * GB if r.kv_cache_bytes
                  else r.gpu_memory_utilization * layout.gpu_memory_gb * GB)
        kv = budget - weights - VLLM_RUNTIME_GB * GB
        kv_token = kv_bytes_per_token(m, vbytes) / min(rtp, m.num_kv_heads)
        info.update(vllm_kv_tokens=max(kv, 0) / kv_token, vllm_budget=budget)
        vllm_rows = {"vllm weights": weights, "vllm kv cache": max(kv, 0.0), "vllm": budget}
        if kv < r.max_model_len * kv_token:
            knob = "rollout.kv_cache_bytes" if r.kv_cache_bytes else "rollout.gpu_memory_utilization"
            problems.append((knob, f"vLLM's budget ({budget / GB:.1f} GB per GPU: weights {weights / GB:.1f} GB + "
                             f"{VLLM_RUNTIME_GB:.0f} GB runtime) leaves KV cache for {max(kv, 0) / kv_token:.0f} "
                             f"tokens, fewer than rollout.max_model_len={r.max_model_len}: vLLM refuses to start"))

    groups: dict = {}
    for rank in range(layout.world):
        gpu = (rank // layout.gpus_per_node, rank % layout.gpus_per_node)
        stage = rank // (tp * cp * dp)
        groups.setdefault((stage, gpu in vllm_gpus), Group(stage, gpu in vllm_gpus)).gpus.append(gpu)
    for g in groups.values():
        params = stage_params(m, tp, pp, g.stage)
        in_flight = min(pp - g.stage, n_mb) * ((1 + (pp - 1) / (pp * par.vpp)) if par.vpp else 1)
        acts = m.num_layers // pp * per_layer * in_flight + (one_layer if cfg.model.recompute == "full" else 0)
        last = g.stage == pp - 1
        g.rows = {
            "weights": params * wbytes,
            "gradients": params * 4,
            "optimizer": params * (12 if wbytes < 4 else 8) / shard,
            "activations": acts,
            "logits": (2 * logits_elems * wbytes + chunk_tmp) if last else 0.0,
            "reference": 0.0 if tr.ref_offload else params * wbytes,
            "reserve": reserve_gb * GB,
        }
        if g.vllm:
            g.rows.update(vllm_rows)
            g.rows["vllm asleep"] = min(VLLM_RUNTIME_GB * GB, vllm_rows["vllm"]) if sleep else vllm_rows["vllm"]
        static = sum(g.rows[k] for k in ("weights", "gradients", "optimizer", "reserve"))
        ref_forward = one_layer + ((logits_elems * wbytes + chunk_tmp) if last else 0.0)
        g.phases = {"update": static + acts + g.rows["logits"] + g.rows["reference"],
                    "reference forward": static + params * wbytes + ref_forward}
        g.vllm_held = g.rows.get("vllm asleep", 0.0)
        g.rollout = static + g.rows["reference"] + g.rows.get("vllm", 0.0)
    return Plan(sorted(groups.values(), key=lambda g: (not g.vllm, g.stage)), layout, problems, info)


# ------------------------------------------------------------------------ what to change


def _candidates(cfg, m, layout: Layout):
    """Single-knob changes, cheapest first: (knob, value, apply(cfg))."""
    budget = cfg.train.max_tokens_per_microbatch
    if budget:  # halve the budget down to the longest trajectory (validation's floor)
        floor = -(-(cfg.data.max_prompt_tokens + cfg.rollout.max_tokens) // 8) * 8
        v = budget // 2 // 8 * 8
        while v >= floor:
            yield "train.max_tokens_per_microbatch", v, lambda c, v=v: setattr(c.train, "max_tokens_per_microbatch", v)
            v = v // 2 // 8 * 8
    mbs = cfg.train.micro_batch_size
    for v in sorted((d for d in range(1, mbs) if mbs % d == 0 and not budget), reverse=True):
        yield "train.micro_batch_size", v, lambda c, v=v: setattr(c.train, "micro_batch_size", v)
    if cfg.parallel.tp > 1 and not cfg.parallel.sequence_parallel:
        yield "parallel.sequence_parallel", "true", lambda c: setattr(c.parallel, "sequence_parallel", True)
    for v in {"none": ["selective", "full"], "selective": ["full"]}.get(cfg.model.recompute, []):
        yield "model.recompute", v, lambda c, v=v: setattr(c.model, "recompute", v)
    if not cfg.train.ref_offload:
        yield "train.ref_offload", "true", lambda c: setattr(c.train, "ref_offload", True)
    if not cfg.engines_sleep(cuda=True) and not cfg.train.max_staleness:
        yield "rollout.sleep_mode", "always", lambda c: setattr(c.rollout, "sleep_mode", "always")
    u = cfg.rollout.gpu_memory_utilization
    for i in range(1, 20):
        v = round(u - 0.05 * i, 2)
        if v <= 0:
            break
        yield "rollout.gpu_memory_utilization", v, lambda c, v=v: setattr(c.rollout, "gpu_memory_utilization", v)
    tp = cfg.parallel.tp * 2
    while tp <= layout.world:
        yield "parallel.tp", tp, lambda c, tp=tp: setattr(c.parallel, "tp", tp)
        tp *= 2


def suggest(cfg, m, layout: Layout, reserve_gb: float = RESERVE_GB) -> Optional[tuple]:
    """The first single-knob change with which the plan fits: (knob, value, plan), or None."""
    for knob, value, apply in _candidates(cfg, m, layout):
        trial = copy.deepcopy(cfg)
        apply(trial)
        try:
            plan = make_plan(trial, m, layout, reserve_gb)
        except PlanError:
            continue
        if plan.fits:
            return knob, value, plan
    return None


def verdict(cfg, m, plan: Plan, reserve_gb: float = RESERVE_GB) -> Optional[str]:
    """None when the plan fits, else the message naming the knob to change."""
    if plan.fits:
        return None
    limit = plan.layout.gpu_memory_gb
    worst = plan.worst
    trainer = max(max(g.phases.values()) for g in plan.groups)
    if plan.problems and trainer <= limit * GB:  # the trainer fits by itself: vLLM's setting is the problem
        knob, why = plan.problems[0]
        return f"does not fit: {why}; change '{knob}'"
    head = (f"does not fit: GPUs {worst.label()} need an estimated {worst.total / GB:.1f} GB of "
            f"{limit:g} GB ({worst.peak_phase})")
    found = suggest(cfg, m, plan.layout, reserve_gb)
    if found:
        knob, value, fixed = found
        return f"{head}; change '{knob}' ({knob}={value} fits: {fixed.worst.total / GB:.1f} GB)"
    return (f"{head}; no single change of train.micro_batch_size (or max_tokens_per_microbatch), model.recompute, "
            "parallel.sequence_parallel, train.ref_offload, rollout.sleep_mode, "
            "rollout.gpu_memory_utilization or parallel.tp fits: change 'parallel.tp' / 'parallel.pp' together "
            "with more GPUs (--nodes)")


ROWS = [
    ("weights", "policy weights ({dtype})"),
    ("gradients", "gradients (fp32 main grads)"),
    ("optimizer", "optimizer (fp32 master + Adam m, v){dist}"),
    ("activations", "activations ({tokens}, recompute {rc}, SP {sp})"),
    ("logits", "logits shard + fp32 chunk temporary"),
    ("reference", "reference model, resident{ref}"),
    ("reserve", "CUDA context, NCCL, allocator (assumed)"),
    ("vllm weights", "  vLLM weights"),
    ("vllm kv cache", "  vLLM KV cache"),
    ("vllm", "vLLM in all (gpu_memory_utilization x memory)"),
    ("vllm asleep", "vLLM during the update{held}"),
]


def _rows(n: int) -> str:
    return f"{n} row{'s' if n != 1 else ''}"


def _microbatches(cfg, info: dict) -> str:
    t = cfg.train
    if not t.max_tokens_per_microbatch:
        return f"{info['n_mb']} micro-batches of {_rows(t.micro_batch_size)}"
    how = "packed rows" if t.pack_sequences else "padded rows"
    return f"up to {info['n_mb']} micro-batches of <= {t.max_tokens_per_microbatch} tokens ({how})"


def render(cfg, m, plan: Plan, config_name: str) -> str:
    L, par, r, info = plan.layout, cfg.parallel, cfg.rollout, plan.info
    out = [f"Memory plan for {config_name}: ESTIMATES from Megatron's published formulas (megatron_tbrm/plan.py, "
           "docs/memory_plan.md), GB = 1e9 bytes, per GPU",
           f"model: {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_attention_heads}/{m.num_kv_heads} KV, "
           f"FFN {m.ffn_hidden_size}, vocab {m.vocab_size} (padded {info['vocab_padded']} at TP={par.tp}), "
           f"{info['params'] / 1e9:.2f} B parameters, {cfg.model.dtype}",
           f"layout: {L.nodes} node(s) x {L.gpus_per_node} GPUs x {L.gpu_memory_gb:g} GB; TP={par.tp} PP={par.pp} "
           f"CP={par.cp} DP={info['dp']}; {_microbatches(cfg, info)} per DP rank "
           f"and step; longest row {info['seq']} tokens (data.max_prompt_tokens + rollout.max_tokens)",
           f"hosts: trainer rank r on node r // {L.gpus_per_node}, GPU r % {L.gpus_per_node} (TP fastest, then CP, DP, PP)"]
    if r.attach_urls:
        out.append(f"       vLLM: attached at {', '.join(r.attach_urls)}, on GPUs of its own (not counted here)")
    else:
        n, t = info["engines"], r.tensor_parallel_size
        spans = ", ".join(_span(list(range(i * t, (i + 1) * t))) for i in range(n))
        out.append(f"       vLLM: {n} engine{'s' if n > 1 else ''} (rollout.engines) x tensor_parallel_size {t} on node 0 "
                   f"GPUs {spans}, colocated with trainer ranks; "
                   + ("asleep during the update (rollout.sleep_mode: weights and KV cache released)" if info["sleep"]
                      else "its memory held through the update (no sleep mode)")
                   + f"; KV cache ~{info['vllm_kv_tokens']:,.0f} tokens per engine "
                   f"(~{info['vllm_kv_tokens'] / r.max_model_len:.0f} sequences of max_model_len {r.max_model_len})")
    budget = cfg.train.max_tokens_per_microbatch
    tokens = f"{budget} tokens a micro-batch" if budget else f"{cfg.train.micro_batch_size} x {info['seq']} tokens"
    fmt = dict(dtype=cfg.model.dtype, tokens=tokens, rc=cfg.model.recompute,
               sp="on" if par.sequence_parallel else "off",
               dist=f" / {info['dp'] * par.cp} (distributed)" if par.distributed_optimizer else "",
               ref=" (ref_offload: on GPU only for its forward)" if cfg.train.ref_offload else "",
               held=" (asleep: what sleep keeps, assumed)" if info["sleep"] else " (held: no sleep mode)")
    width = max(len(label.format(**fmt)) for _, label in ROWS) + 2
    cols = [f"{'PP' + str(g.stage) + ' ' if par.pp > 1 else ''}GPUs {g.label()}" for g in plan.groups]
    cw = [max(12, len(c) + 2) for c in cols]
    out += ["", "component".ljust(width) + "".join(c.rjust(w) for c, w in zip(cols, cw))]

    def line(label: str, values: list) -> str:
        return label.ljust(width) + "".join(v.rjust(w) for v, w in zip(values, cw))

    for key, label in ROWS:
        if key.startswith("vllm") and not any(g.vllm for g in plan.groups):
            continue
        out.append(line(label.format(**fmt), [f"{g.rows[key] / GB:.1f}" if key in g.rows else "-"
                                              for g in plan.groups]))
    out.append(line("-" * (width - 2), ["-" * (w - 2) for w in cw]))
    for phase in ("update", "reference forward"):
        out.append(line(f"trainer, {phase} phase", [f"{g.phases[phase] / GB:.1f}" for g in plan.groups]))
    if any(g.vllm for g in plan.groups):
        out.append(line("rollout phase (trainer resident + vLLM awake)",
                        [f"{g.rollout / GB:.1f}" if g.vllm else "-" for g in plan.groups]))
    out.append(line(f"peak per GPU (of {L.gpu_memory_gb:g} GB)",
                    [f"{g.total / GB:.1f}{'' if g.total <= L.gpu_memory_gb * GB else ' !'}" for g in plan.groups]))
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from .config import load_config

    p = argparse.ArgumentParser(prog="megatron-tbrm-plan", description=__doc__.split("\n\n")[0],
                                epilog="Exit 0: fits; 2: does not fit (the message names the knob); 1: bad input.")
    p.add_argument("--config", required=True, help="recipe YAML (inheritance and overrides as in training)")
    p.add_argument("--hf-config", help="the model's config.json or its folder (default: model.path)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="per GPU, GB = 1e9 bytes")
    p.add_argument("--reserve-gb", type=float, default=RESERVE_GB,
                   help="per trainer GPU for the CUDA context, NCCL and allocator slack (assumed)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    a = p.parse_args(argv)
    if a.gpus_per_node < 1 or a.nodes < 1 or a.gpu_memory_gb <= 0:
        raise PlanError("--gpus-per-node, --nodes and --gpu-memory-gb must be positive")
    if a.hf_config and not Path(a.hf_config).exists():
        raise FileNotFoundError(f"--hf-config {a.hf_config}: no such file or folder")
    cfg = load_config(a.config, a.overrides)
    m = model_shape(cfg, a.hf_config)
    plan = make_plan(cfg, m, Layout(a.gpus_per_node, a.nodes, a.gpu_memory_gb), a.reserve_gb)
    print(render(cfg, m, plan, a.config))
    message = verdict(cfg, m, plan, a.reserve_gb)
    if message:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
    print("fits (estimate)")


if __name__ == "__main__":
    from .cli import plan as _cli

    sys.exit(_cli())
