r"""Supervised warm start: token cross-entropy on chat-templated arithmetic solutions.

The CPU demo's base model is random; TBRM needs a policy that is right sometimes but not
often. This runs a short Megatron SFT on the synthetic arithmetic task and writes a complete
Hugging Face folder (transformers and vLLM load it) for the RL run to start from:

    python -m megatron_tbrm.demo.sft --model HF_DIR --data train.jsonl --out OUT_HF_DIR
    torchrun --nproc-per-node 2 -m megatron_tbrm.demo.sft --tp 2 --model ... --data ... --out ...

or in-process: `run_sft(model=..., data=..., out=...)`.

Each example is the prompt as the rollouts see it (megatron_tbrm.data's chat template with the paper's
system prompt, add_generation_prompt=True) followed by `arithmetic_solution(prompt)` and the
EOS token (<|im_end|>); the loss is -sum of log pi over the response tokens divided by their
number (megatron-core's per-token-loss convention, so the mean is over every response token
of the global batch whatever TP/PP/DP and the micro-batch size). Adam (decoupled weight
decay), linear warmup, cosine decay to `min_lr_ratio * lr`.

The demo's warm start is DemoWarmStart below (data splits, schedule, band); what it measured
over seeds: docs/learning.md section 1 (`bench/warmstart.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..data import PromptDataset, PromptSampler, SYSTEM_PROMPT, load_tokenizer
from ..log import get_logger, progress_bar, setup_logging
from .arithmetic import arithmetic_solution

log = get_logger(__name__)

# The CLI's defaults (docs/demo.md, "Warm start"); the demo's own settings: DemoWarmStart.
DEFAULT_STEPS = 230
DEFAULT_BATCH = 64
DEFAULT_LR = 2e-3
DEFAULT_WARMUP = 10
DEFAULT_MIN_LR_RATIO = 0.1
DEFAULT_DECAY_STEPS = 300
DEFAULT_PROBE_EVERY = 5
DEFAULT_ADAM_BETA2 = 0.999
DEMO_MODEL_SPEC = dict(layers=2, hidden=256, heads=8, kv_heads=4, ffn=512)  # TinyModelSpec(**...)
DEMO_DATA = dict(digits=2, ops="+")  # the task: 2-digit addition, 10,000 distinct problems


@dataclass(frozen=True)
class DemoWarmStart:
    """The demo's warm start, every knob in one place (measured: docs/learning.md section 1).

    Data: one seeded draw (`data_seed`) of every problem of DEMO_DATA, cut by position into
    the RL training set [0, n_rl_train), the RL eval set (n_rl_eval next), the probe
    (probe_size next), and the SFT pool: `sft_pool` problems taken from the positions outside
    the eval set and the probe, the RL training set first unless `sft_pool_disjoint_from_rl`
    (then only positions after the probe). The eval set and the probe never meet the SFT
    pool; a larger pool keeps the tiny model from memorizing its problems instead of learning
    addition.
    Training: `steps` (a cosine schedule over all of them, `warmup_steps` of linear warmup,
    down to lr x min_lr_ratio), `batch` examples per step, Adam (beta2 `adam_beta2`, decoupled
    `weight_decay`); stops at the first probe (every `probe_every` steps) inside `band`
    (greedy exact match on the probe: right sometimes, not often)."""

    steps: int = 600
    batch: int = 128
    lr: float = 2e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    adam_beta2: float = 0.95
    weight_decay: float = 0.0
    band: tuple[float, float] = (0.20, 0.30)
    probe_size: int = 400
    probe_every: int = 3
    n_rl_train: int = 4000
    n_rl_eval: int = 200
    sft_pool: int = 9400
    sft_pool_disjoint_from_rl: bool = False
    data_seed: int = 0

    def space(self) -> int:
        """Distinct problems of DEMO_DATA (2-digit addition: 10,000)."""
        return (10 ** DEMO_DATA["digits"]) ** 2 * len(DEMO_DATA["ops"])

    def sft_positions(self) -> list[int]:
        """Positions of the SFT pool in the seeded draw. Raises ValueError if the pool does
        not fit outside the eval set and the probe (and the RL set, if disjoint from it)."""
        held = self.n_rl_train + self.n_rl_eval + self.probe_size
        free = list(range(held, self.space()))
        if not self.sft_pool_disjoint_from_rl:
            free = list(range(self.n_rl_train)) + free
        if self.sft_pool > len(free):
            raise ValueError(f"sft_pool={self.sft_pool}: only {len(free)} problems lie outside the held-out sets")
        return free[:self.sft_pool]

    def write_data(self, data_dir: str | Path) -> dict[str, Path]:
        """train.jsonl / test.jsonl (RL), probe.jsonl, sft_train.jsonl in data_dir (JSONL rows
        {"prompt", "answer"}); returns their paths by name: rl_train, rl_eval, probe, sft_train."""
        from .arithmetic import arithmetic_problems, arithmetic_row, make_arithmetic_dataset, make_arithmetic_splits

        data_dir = Path(data_dir)
        train, test = make_arithmetic_splits(data_dir, self.n_rl_train, self.n_rl_eval, seed=self.data_seed, **DEMO_DATA)
        probe = make_arithmetic_dataset(data_dir / "probe.jsonl", self.probe_size, self.data_seed,
                                        skip=self.n_rl_train + self.n_rl_eval, **DEMO_DATA)
        draw = arithmetic_problems(self.space(), self.data_seed, **DEMO_DATA)
        sft = data_dir / "sft_train.jsonl"
        with open(sft, "w", encoding="utf-8") as f:
            for i in self.sft_positions():
                f.write(json.dumps(arithmetic_row(*draw[i])) + "\n")
        return {"rl_train": train, "rl_eval": test, "probe": probe, "sft_train": sft}

    def cli_args(self, steps: Optional[int] = None, band: Optional[tuple[float, float]] = None) -> list[str]:
        """The sft.py flags for this recipe (data, model, probe, seed and output paths not
        included); `steps`/`band` replace the recipe's."""
        steps, band = steps or self.steps, band or self.band
        return ["--steps", str(steps), "--decay-steps", str(steps), "--batch", str(self.batch), "--lr", str(self.lr),
                "--warmup-steps", str(self.warmup_steps), "--min-lr-ratio", str(self.min_lr_ratio),
                "--adam-beta2", str(self.adam_beta2), "--weight-decay", str(self.weight_decay),
                "--probe-every", str(self.probe_every), "--band", str(band[0]), str(band[1])]


DEMO_WARM_START = DemoWarmStart()

# Files of an HF folder that hold weights: never copied from the source, the exported
# model.safetensors replaces them.
_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth")


# ---------------------------------------------------------------------------------------
# Examples


def build_examples(data: str | Path, tokenizer, solution_fn: Callable[[str], str] = arithmetic_solution,
                   prompt_key: str = "prompt", answer_key: str = "answer",
                   system_prompt: Optional[str] = SYSTEM_PROMPT) -> list[dict[str, list]]:
    """Rows {tokens, labels, loss_mask} (labels already shifted: labels[t] is the token at
    t + 1; loss_mask[t] = 1 where labels[t] is a response token), one per prompt of `data`."""
    tok = load_tokenizer(tokenizer)
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token (expected <|im_end|>)")
    ds = PromptDataset(data, tok, prompt_key=prompt_key, answer_key=answer_key, system_prompt=system_prompt)
    solutions = [solution_fn(item.prompt) for item in ds]
    resp_ids = tok(solutions, add_special_tokens=False)["input_ids"]
    rows = []
    for item, resp in zip(ds, resp_ids):
        seq = list(item.prompt_ids) + list(resp) + [tok.eos_token_id]
        n_prompt = len(item.prompt_ids)
        rows.append({
            "tokens": seq[:-1],
            "labels": seq[1:],
            "loss_mask": [0.0] * (n_prompt - 1) + [1.0] * (len(seq) - n_prompt),
        })
    return rows


def make_loss_fn(vocab_size: int):
    """loss_fn(mb, logits) -> (-sum log pi over response tokens, #response tokens, metrics)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from ..vocab_parallel import VocabShard, local_max, vocab_parallel_logprob

    def loss_fn(mb, logits):
        mask = mb["loss_mask"].bool()
        tp_group = mpu.get_tensor_model_parallel_group() if mpu.get_tensor_model_parallel_world_size() > 1 else None
        logprob, lse = vocab_parallel_logprob(logits, mb["labels"], vocab_size, tp_group, mask=mask)
        loss_sum = -logprob.sum()
        count = mask.sum()
        with torch.no_grad():
            # Teacher-forced argmax on every response token = greedy decoding reproduces the
            # whole solution: the training-set greedy exact match, for free.
            shard = VocabShard(logits.shape[-1], vocab_size, tp_group)
            top = local_max(logits.detach().reshape(-1, logits.shape[-1]), shard.n_valid).view(mask.shape)
            if tp_group is not None:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp_group)
            hit = (logprob.detach() + lse.detach() >= top - 1e-4) | ~mask  # label logit = lse + logprob, to rounding
            exact = hit.all(dim=1).double()
            # Probability that sampling at temperature 1 reproduces the whole solution.
            p_seq = logprob.detach().double().sum(dim=1).exp()
        rows = torch.tensor(float(mask.shape[0]), dtype=torch.float64)
        metrics = {
            "ce": torch.stack([loss_sum.detach().double(), count.double()]),
            "greedy_match": torch.stack([exact.sum(), rows]),
            "sample_match": torch.stack([p_seq.sum(), rows]),
        }
        return loss_sum, count.to(torch.int), metrics

    return loss_fn


# ---------------------------------------------------------------------------------------
# Writing the HF folder


def write_hf_folder(engine, source: str | Path, out: str | Path) -> Optional[Path]:
    """Every rank must call this (export gathers TP/PP shards). Global rank 0 writes `out`:
    the source folder's non-weight files (config, generation config, tokenizer, chat
    template) and model.safetensors from export_hf_weights."""
    import fnmatch

    import torch.distributed as dist
    from safetensors.torch import save_file

    from ..hf_mapping import export_hf_weights

    weights = {name: t.detach().cpu().contiguous() for name, t in export_hf_weights(engine.chunks, engine.model_cfg)}
    path = None
    if dist.get_rank() == 0:
        source, path = Path(source), Path(out)
        path.mkdir(parents=True, exist_ok=True)
        for f in path.iterdir():  # a previous run's weights must not linger next to ours
            if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in _WEIGHT_FILES):
                f.unlink()
        for f in source.iterdir():
            if f.is_file() and not any(fnmatch.fnmatch(f.name, p) for p in _WEIGHT_FILES):
                shutil.copyfile(f, path / f.name)
        tmp = path / ".model.safetensors.tmp"
        save_file(weights, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / "model.safetensors")
        for f in path.iterdir():
            f.chmod(0o644)
    dist.barrier()
    return path


# ---------------------------------------------------------------------------------------
# Training


def probe_accuracy(eng, rows: list[dict], loss_fn, ps, pad_id: int = 0) -> float:
    """Fraction of `rows` (build_examples rows of held-out problems) whose every response
    token is the model's argmax given the solution so far: exactly the problems on which
    greedy decoding writes the whole solution (answer and <|im_end|> included). One forward
    pass, no gradients; every DP rank scores its slice, every rank gets the global number."""
    from ..engine import pad_batch, allreduce_metric_sums

    per = -(-len(rows) // ps.dp_size)
    mine = rows[ps.dp_rank * per:(ps.dp_rank + 1) * per]
    out = []
    if mine:
        mb = pad_batch(mine, pad_id=pad_id)
        out = eng.run([mb], loss_fn, forward_only=True)
    sums = allreduce_metric_sums(out)
    hits, n = sums["greedy_match"].tolist()
    return hits / n


def check_band(band: tuple[float, float]) -> None:
    """The warm-start stopping band: held-out probe greedy accuracies with 0 <= lo <= hi <= 1.
    Raises ValueError "LO HI: need ..." (callers put their option's name in front)."""
    lo, hi = band
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{lo:g} {hi:g}: need 0 <= LO <= HI <= 1 (held-out probe greedy accuracy)")


def run_sft(model: str | Path, data: str | Path, out: str | Path, steps: int = DEFAULT_STEPS,
            batch: int = DEFAULT_BATCH, lr: float = DEFAULT_LR, tp: int = 1, pp: int = 1,
            micro_batch_size: Optional[int] = None, seed: int = 0, warmup_steps: Optional[int] = None,
            min_lr_ratio: float = DEFAULT_MIN_LR_RATIO, decay_steps: Optional[int] = DEFAULT_DECAY_STEPS,
            progress: bool = True, stop_at_match: Optional[float] = None,
            probe: str | Path | None = None, probe_every: int = DEFAULT_PROBE_EVERY,
            band: Optional[tuple[float, float]] = None, adam_beta2: float = DEFAULT_ADAM_BETA2,
            weight_decay: float = 0.0) -> dict:
    """Train `model` (an HF folder) on the prompts of `data` and write the result to `out`.

    Works under torchrun (any TP x PP dividing the world; the rest is DP) and in a plain
    process (a world of one; a free port is picked). `batch` is the global number of
    examples per step; `micro_batch_size` defaults to the whole per-DP-rank share.
    Tears down torch.distributed at the end if this call set it up.
    Returns {"ce": per-step CE (mean per response token, before that step's update),
    "ce_first", "ce_last", "greedy_match_last" (fraction of the last batch whose every
    response token is the argmax: what greedy decoding would get right), "steps", "seconds"
    (the training loop, without start-up and export)}.
    `stop_at_match`: stop early once the training-batch greedy exact match, averaged over the
    last 3 steps, reaches this fraction. The warm start's accuracy jumps within a few tens of
    steps at a point that moves with float reduction order (thread count, machine), so a
    target beats a fixed step count for "right sometimes, not often".
    `probe`: a held-out JSONL/Parquet of problems (none of them in `data`), scored before the
    first step and every `probe_every` steps by `probe_accuracy`: greedy decoding reproduces
    the whole solution (teacher-forced argmax on every response token, one forward pass; the
    same outcome as greedy generation of the solution text). Logged as "probe".
    `band=(lo, hi)` (needs `probe`): the warm-start stopping rule. Training stops at the first
    probe evaluation with lo <= accuracy <= hi ("band_status": "in_band"); a probe above hi
    ("above_band": the transition jumped over the band between two probes) or the end of the
    schedule below lo ("below_band") also stop it, and the caller must treat those as a
    failed warm start (the CLI exits 3). The weights are written in every case.
    """
    import torch.distributed as dist

    from ..engine import Engine, OptimSettings, pad_batch, allreduce_metric_sums, split_microbatches
    from ..hf_mapping import import_hf_weights
    from ..model import ModelConfig
    from ..parallel import destroy_distributed, init_distributed

    if steps < 1 or batch < 1 or lr <= 0:
        raise ValueError(f"steps={steps}, batch={batch}, lr={lr}: need steps >= 1, batch >= 1, lr > 0")
    owns_dist = not dist.is_initialized()
    ps = init_distributed(tp=tp, pp=pp, seed=seed)
    try:
        if batch % ps.dp_size:
            raise ValueError(f"batch={batch} is not divisible by the data-parallel size {ps.dp_size}")
        per_dp = batch // ps.dp_size
        mbs = micro_batch_size or per_dp
        if per_dp % mbs:
            raise ValueError(f"the per-DP-rank batch {per_dp} does not split into micro-batches of {mbs}")

        tok = load_tokenizer(model)
        examples = build_examples(data, tok)
        cfg = ModelConfig.from_hf(model)
        if warmup_steps is None:
            warmup_steps = min(DEFAULT_WARMUP, steps // 10)
        eng = Engine(cfg, OptimSettings(lr=lr, min_lr=lr * min_lr_ratio, warmup_steps=warmup_steps,
                                        decay="cosine", total_steps=max(decay_steps or steps, steps),
                                        clip_grad=1.0, adam_beta2=adam_beta2, weight_decay=weight_decay),
                     init_weights=False)  # imported next
        import_hf_weights(eng.chunks, cfg, model)
        eng.optimizer.reload_model_params()  # the optimizer's main copies follow the imported weights
        loss_fn = make_loss_fn(cfg.vocab_size)
        if band is not None:
            if probe is None:
                raise ValueError("band needs a held-out probe set (probe=...)")
            check_band(band)
        if probe is not None and probe_every < 1:
            raise ValueError(f"probe_every={probe_every}: need >= 1")
        probe_rows = build_examples(probe, tok) if probe is not None else None
        probes: list[dict] = []
        status = None

        def run_probe(step: int) -> float:
            acc = probe_accuracy(eng, probe_rows, loss_fn, ps, pad_id=tok.pad_token_id or 0)
            probes.append({"step": step, "greedy_exact": acc})
            return acc

        if probe_rows is not None:
            run_probe(0)

        # The same seeded order on every rank; each DP rank takes its slice of the batch.
        sampler = PromptSampler(list(range(len(examples))), batch_size=batch, seed=seed)
        bar = progress_bar(steps, "sft", enabled=progress and ps.rank == 0, unit="step")
        ces: list[float] = []
        matches: list[float] = []
        t0 = time.perf_counter()
        for _ in range(steps):
            idx = sampler.next_batch()[ps.dp_rank * per_dp:(ps.dp_rank + 1) * per_dp]
            mb = pad_batch([examples[i] for i in idx], pad_id=tok.pad_token_id or 0)
            metrics = allreduce_metric_sums(eng.run(split_microbatches(mb, mbs), loss_fn))
            info = eng.step()
            total, count = metrics["ce"].tolist()
            ces.append(total / count)
            hits, rows = metrics["greedy_match"].tolist()
            match = hits / rows
            matches.append(match)
            if bar is not None:
                bar.set_postfix(ce=f"{ces[-1]:.4f}", match=f"{match:.2f}", lr=f"{info['lr']:.2e}")
                bar.update(1)
            elif progress:
                log.info(f"step {len(ces)}/{steps} ce={ces[-1]:.4f} match={match:.2f} lr={info['lr']:.2e}")
            # Every rank holds the same global metrics, so all stop at the same step.
            if stop_at_match is not None and len(matches) >= 3 and sum(matches[-3:]) / 3 >= stop_at_match:
                break
            if probe_rows is not None and len(ces) % probe_every == 0:
                acc = run_probe(len(ces))
                msg = f"step {len(ces)}: held-out probe greedy exact match {acc:.3f}" + (
                    f" (band [{band[0]:.2f}, {band[1]:.2f}])" if band else "")
                if bar is not None:
                    bar.write(f"sft {msg}")
                elif progress:
                    log.info(msg)
                if band is not None and acc > band[1]:
                    status = "above_band"
                    break
                if band is not None and acc >= band[0]:
                    status = "in_band"
                    break
        seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        if probe_rows is not None and probes[-1]["step"] != len(ces):
            run_probe(len(ces))  # the written model's own score
        if band is not None and status is None:
            acc = probes[-1]["greedy_exact"]
            status = "in_band" if band[0] <= acc <= band[1] else ("above_band" if acc > band[1] else "below_band")
        write_hf_folder(eng, model, out)
        res = {"ce_first": ces[0], "ce_last": ces[-1], "ce": ces, "greedy_match_last": match,
               "steps": len(ces), "seconds": seconds}
        if probe_rows is not None:
            res.update(probe=probes, probe_accuracy=probes[-1]["greedy_exact"], probe_size=len(probe_rows))
        if band is not None:
            res.update(band=list(band), band_status=status)
        return res
    finally:
        if owns_dist:
            destroy_distributed()


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="source HF model folder")
    ap.add_argument("--data", required=True, help="JSONL/Parquet of arithmetic prompts ({'prompt': 'What is 37 + 58?', ...})")
    ap.add_argument("--out", required=True, help="HF folder to write")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="global examples per step")
    ap.add_argument("--lr", type=float, default=DEFAULT_LR)
    ap.add_argument("--warmup-steps", type=int, default=None, help=f"default: min({DEFAULT_WARMUP}, steps/10)")
    ap.add_argument("--decay-steps", type=int, default=DEFAULT_DECAY_STEPS,
                    help="length of the cosine schedule (>= steps; a longer one stops before the end of the decay)")
    ap.add_argument("--min-lr-ratio", type=float, default=DEFAULT_MIN_LR_RATIO, help="cosine decay ends at lr x this")
    ap.add_argument("--adam-beta2", type=float, default=DEFAULT_ADAM_BETA2)
    ap.add_argument("--weight-decay", type=float, default=0.0, help="Adam's decoupled weight decay")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--micro-batch-size", type=int, default=None, help="default: the whole per-DP-rank batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--stop-at-match", type=float, default=None,
                    help="stop once the training-batch greedy exact match (mean of the last 3 steps) reaches this")
    ap.add_argument("--probe", default=None,
                    help="held-out JSONL/Parquet of problems (disjoint from --data): greedy exact match every --probe-every steps")
    ap.add_argument("--probe-every", type=int, default=DEFAULT_PROBE_EVERY)
    ap.add_argument("--band", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="stop at the first probe inside [LO, HI]; exit 3 if the run ends outside it")
    ap.add_argument("--metrics-out", default=None, help="write the per-step CE and timings here as JSON (rank 0)")
    a = ap.parse_args(argv)
    if a.band is not None:
        try:
            check_band(tuple(a.band))
        except ValueError as e:
            ap.error(f"--band {e}")
    setup_logging()
    res = run_sft(a.model, a.data, a.out, steps=a.steps, batch=a.batch, lr=a.lr, tp=a.tp, pp=a.pp,
                  micro_batch_size=a.micro_batch_size, seed=a.seed, warmup_steps=a.warmup_steps,
                  min_lr_ratio=a.min_lr_ratio, decay_steps=a.decay_steps, progress=not a.no_progress,
                  stop_at_match=a.stop_at_match, probe=a.probe, probe_every=a.probe_every,
                  band=tuple(a.band) if a.band else None, adam_beta2=a.adam_beta2, weight_decay=a.weight_decay)
    if int(os.environ.get("RANK", "0")) == 0:
        if a.metrics_out:
            Path(a.metrics_out).write_text(json.dumps(res, indent=1) + "\n")
        log.info(f"{res['steps']} steps in {res['seconds']:.1f} s, ce {res['ce_first']:.4f} -> {res['ce_last']:.4f}; "
                 f"wrote {a.out}")
        if "probe_accuracy" in res:
            log.info(f"held-out probe greedy exact match {res['probe_accuracy']:.3f} "
                     f"({res['probe_size']} problems) at step {res['steps']}")
        if res.get("band_status") not in (None, "in_band"):
            lo, hi = res["band"]
            log.error(f"WARM START FAILED: {res['band_status']}: probe {res['probe_accuracy']:.3f} is outside the band "
                      f"[{lo:.2f}, {hi:.2f}] after {res['steps']} steps")
    if res.get("band_status") not in (None, "in_band"):
        raise SystemExit(3)


if __name__ == "__main__":
    main()
