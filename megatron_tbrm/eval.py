"""Evaluation: sample k answers per problem from a vLLM server, grade them with the training
reward (Math-Verify), report avg@k and pass@k.

Library (the trainer's periodic eval and the demo):

    from megatron_tbrm.eval import evaluate
    res = evaluate(client, items, scorer, k=1, temperature=0.0, max_tokens=3072)
    res["avg_at_k"], res["pass_at_k"], res["mean_response_tokens"], res["seconds"]

CLI (serves the model itself, or uses a running server with --server-url):

    python -m megatron_tbrm.eval --model DIR_OR_CKPT --benchmarks aime24,amc23,math500 \
        [--data-dir DIR] [--k K] [--temperature T] [--max-tokens N] [--limit N] \
        [--out results.json] [--server-url URL] [--dtype bfloat16] [vLLM options]

DIR_OR_CKPT is an HF folder, or a trainer checkpoint (a folder with `latest`, or an iter_N
folder with metadata.json) converted to a temporary HF folder with
megatron-tbrm-convert-megatron-to-hf first. Each benchmark runs with its preset (see
benchmarks.py: the paper's avg@32 at T=1 for AIME/AMC, avg@1 greedy for the rest) unless
--k/--temperature/--top-p/--max-tokens override it. Prints a markdown table to stdout and
writes JSON with per-benchmark summaries and per-problem scores.

avg@k = mean over problems of the mean score of the problem's k samples; pass@k = fraction
of problems with at least one correct (score > 0) sample. At temperature 0 every sample is
the greedy answer, so one is generated and counted k times.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .log import get_logger, setup_logging

log = get_logger(__name__)

if TYPE_CHECKING:  # the library path needs neither torch nor vLLM
    from megatron_tbrm.data import PromptItem
    from megatron_tbrm.reward import RewardScorer
    from megatron_tbrm.rollout.client import RolloutClient, Trajectory
    from megatron_tbrm.rollout.server import VLLMServer

CONVERTER = "megatron_tbrm.convert.megatron_to_hf"  # megatron-tbrm-convert-megatron-to-hf


# ---------------------------------------------------------------------------------------
# Library


def prompt_ids_of(item: Any) -> list[int]:
    """The prompt token ids of a PromptItem (or anything with prompt_token_ids)."""
    ids = getattr(item, "prompt_ids", None)
    return list(ids if ids is not None else item.prompt_token_ids)


def avg_pass_at_k(scores: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(avg@k, pass@k) from per-problem sample scores. avg@k: mean over problems of the
    mean over that problem's samples; pass@k: fraction of problems with a sample > 0."""
    if not scores or any(len(s) == 0 for s in scores):
        raise ValueError("avg_pass_at_k needs at least one problem and one sample per problem")
    avg = sum(sum(s) / len(s) for s in scores) / len(scores)
    passed = sum(1 for s in scores if max(s) > 0) / len(scores)
    return avg, passed


def generate_and_score(client: "RolloutClient", items: Sequence["PromptItem"], scorer: "RewardScorer",
                       k: int = 1, temperature: float = 0.0, top_p: float = 1.0, max_tokens: int = 3072,
                       seed: int = 0, progress: bool = True, stop_token_ids: Optional[Sequence[int]] = None,
                       ) -> tuple[dict, list[list["Trajectory"]], list[list[float]]]:
    """The work behind evaluate(): (summary, trajectories per problem, scores per problem).
    At temperature 0 one greedy sample per problem is generated and repeated k times. Each
    response may use min(max_tokens, the server's max_model_len - its own prompt length)."""
    if not items:
        raise ValueError("evaluate: no problems")
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    t0 = time.perf_counter()
    n = 1 if temperature == 0 else k
    trajs = client.generate([prompt_ids_of(it) for it in items], n=n, temperature=temperature, top_p=top_p,
                            max_tokens=max_tokens, seed=seed, progress=progress, stop_token_ids=stop_token_ids)
    if len(trajs) != len(items) * n:
        raise RuntimeError(f"the client returned {len(trajs)} samples for {len(items)} problems x {n}")
    t1 = time.perf_counter()
    answers = [items[t.prompt_index].answer for t in trajs]
    flat, stats = scorer.score_batch([t.text for t in trajs], answers)
    t2 = time.perf_counter()

    by_problem: list[list[Trajectory]] = [[] for _ in items]
    scores: list[list[float]] = [[] for _ in items]
    for t, s in zip(trajs, flat):
        by_problem[t.prompt_index].append(t)
        scores[t.prompt_index].append(float(s))
    if n < k:  # greedy: the same answer k times
        by_problem = [ts * k for ts in by_problem]
        scores = [s * k for s in scores]
    avg, passed = avg_pass_at_k(scores)
    lengths = [len(t.response_token_ids) for t in trajs]
    summary = {
        "problems": len(items),
        "k": k,
        "avg_at_k": avg,
        "pass_at_k": passed,
        "mean_response_tokens": sum(lengths) / len(lengths),
        "truncated": sum(t.finish_reason == "length" for t in trajs) / len(trajs),
        "reward_timeouts": int(stats.get("timeouts", 0)),
        "reward_errors": int(stats.get("errors", 0)),
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "generate_seconds": t1 - t0,
        "score_seconds": t2 - t1,
        "seconds": t2 - t0,
    }
    return summary, by_problem, scores


def evaluate(client: "RolloutClient", items: Sequence["PromptItem"], scorer: "RewardScorer", k: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, max_tokens: int = 3072, seed: int = 0,
             progress: bool = True, stop_token_ids: Optional[Sequence[int]] = None) -> dict:
    """Sample k responses per problem through `client` (a RolloutClient on a vLLM server
    holding the weights to evaluate), grade them with `scorer` against each item's answer.

    Returns a flat dict of numbers: problems, k, avg_at_k, pass_at_k (fractions in [0, 1]),
    mean_response_tokens, truncated (fraction of samples cut at max_tokens),
    reward_timeouts, reward_errors, temperature, top_p, max_tokens, generate_seconds,
    score_seconds, seconds. `stop_token_ids`: see RolloutClient.generate."""
    return generate_and_score(client, items, scorer, k=k, temperature=temperature, top_p=top_p,
                              max_tokens=max_tokens, seed=seed, progress=progress,
                              stop_token_ids=stop_token_ids)[0]


# ---------------------------------------------------------------------------------------
# Model folder / checkpoint


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A trainer checkpoint: a root with `latest`, or an iter_N folder with metadata.json."""
    p = Path(path)
    return (p / "latest").is_file() or (p / "metadata.json").is_file()


def convert_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """HF folder `out` from a trainer checkpoint, by the converter module (in a child process:
    its torch.distributed state and memory go away with it)."""
    from .convert.launch import module_command

    cmd = [*module_command(CONVERTER), "--ckpt", str(ckpt), "--out", str(out)]
    log.info(f"converting checkpoint {ckpt} -> {out}")
    rc = subprocess.call(cmd, stdout=sys.stderr)
    if rc != 0:
        raise RuntimeError(f"checkpoint conversion failed (exit code {rc}): {' '.join(cmd)}")
    return Path(out)


# ---------------------------------------------------------------------------------------
# Report


def metric_name(k: int) -> str:
    return f"avg@{k}"


def format_table(results: dict[str, dict]) -> str:
    """Markdown table: one row per benchmark (scores in %), then their average."""
    head = ["benchmark", "metric", "score", "pass@k", "problems", "mean tokens", "truncated", "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, r in results.items():
        metric = f"{metric_name(r['k'])} (T={r['temperature']:g})"
        lines.append("| " + " | ".join([
            name, metric, f"{100 * r['avg_at_k']:.1f}", f"{100 * r['pass_at_k']:.1f}", str(r["problems"]),
            f"{r['mean_response_tokens']:.0f}", f"{100 * r['truncated']:.1f}%", f"{r['seconds']:.0f}",
        ]) + " |")
    if len(results) > 1:
        mean = sum(r["avg_at_k"] for r in results.values()) / len(results)
        lines.append("| " + " | ".join(["average", "", f"{100 * mean:.1f}"] + [""] * (len(head) - 3)) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from megatron_tbrm.benchmarks import DATA_DIR_ENV, PAPER_BENCHMARKS, PRESETS

    p = argparse.ArgumentParser(prog="python -m megatron_tbrm.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="HF folder or trainer checkpoint (with --server-url: the tokenizer's folder)")
    p.add_argument("--benchmarks", default=",".join(PAPER_BENCHMARKS),
                   help=f"comma-separated presets ({', '.join(PRESETS)}) or data file paths")
    p.add_argument("--data-dir", default=None, help=f"folder with the benchmark files (default ${DATA_DIR_ENV} "
                   "or ./data/benchmarks)")
    g = p.add_argument_group("sampling (default: each benchmark's preset)")
    g.add_argument("--k", type=int, default=None, help="samples per problem")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--max-tokens", type=int, default=None, help="response token limit (preset: 3072)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop-token-ids", type=lambda v: [int(x) for x in v.split(",") if x.strip()], default=None,
                   metavar="IDS", help="comma-separated token ids that end a response besides EOS (default: the "
                   "chat template's end of turn, e.g. <|im_end|>; '' for none)")
    g.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark (smoke tests)")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("--save-responses", action="store_true", help="keep every response text in the JSON")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    p.add_argument("--reward-timeout", type=float, default=5.0, help="seconds per graded sample")
    p.add_argument("--reward-workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    p.add_argument("--request-timeout", type=float, default=3600.0)
    p.add_argument("--no-progress", action="store_true")
    v = p.add_argument_group("vLLM server (ignored with --server-url)")
    v.add_argument("--server-url", default=None, help="use this running vLLM server instead of starting one")
    v.add_argument("--dtype", default="auto")
    v.add_argument("--max-model-len", type=int, default=None)
    v.add_argument("--tensor-parallel-size", type=int, default=1)
    v.add_argument("--gpu-memory-utilization", type=float, default=None)
    v.add_argument("--kv-cache-bytes", type=int, default=None, help="--kv-cache-memory-bytes (needed on CPU)")
    v.add_argument("--max-num-seqs", type=int, default=None)
    v.add_argument("--port", type=int, default=None)
    v.add_argument("--server-start-timeout", type=float, default=900.0)
    v.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="extra vLLM CLI argument, repeatable (e.g. --vllm-arg=--enable-prefix-caching)")
    v.add_argument("--work-dir", default=None, help="server log, cache and converted model (default: temporary)")
    args = p.parse_args(argv)
    if args.k is not None and args.k < 1:
        p.error(f"--k {args.k}: must be >= 1")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit {args.limit}: must be >= 1")
    return args


def make_server(args: argparse.Namespace, model: str, work_dir: Path) -> "VLLMServer":
    """The (not yet started) vLLM server the CLI options describe."""
    from megatron_tbrm.rollout.server import VLLMServer

    extra: list[str] = list(args.vllm_arg)
    if args.gpu_memory_utilization is not None:
        extra += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    env = {"HF_HUB_OFFLINE": "1"} if Path(model).is_dir() else {}  # a local folder needs no hub
    return VLLMServer(model, port=args.port, dtype=args.dtype, max_model_len=args.max_model_len,
                      kv_cache_bytes=args.kv_cache_bytes, max_num_seqs=args.max_num_seqs,
                      tensor_parallel_size=args.tensor_parallel_size, seed=args.seed,
                      extra_args=extra, work_dir=work_dir, env=env)


def run(args: argparse.Namespace) -> dict:
    from megatron_tbrm.benchmarks import get_benchmark, load_benchmark
    from megatron_tbrm.data import load_tokenizer
    from megatron_tbrm.reward import RewardScorer
    from megatron_tbrm.rollout.client import RolloutClient, end_of_turn_token_ids
    from megatron_tbrm.rollout.server import VLLMServer

    t_start = time.perf_counter()
    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    if not names:
        raise ValueError("--benchmarks is empty")
    benches = [get_benchmark(b).with_overrides(k=args.k, temperature=args.temperature, top_p=args.top_p,
                                               max_tokens=args.max_tokens) for b in names]
    with ExitStack() as stack:
        own_work_dir = args.work_dir is None
        work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="tbrm-eval-"))
        work_dir.mkdir(parents=True, exist_ok=True)
        if own_work_dir:
            stack.callback(shutil.rmtree, work_dir, ignore_errors=True)

        model, source = args.model, "hf"
        if args.server_url is None and is_checkpoint(model):
            model, source = str(convert_checkpoint(model, work_dir / "hf")), "checkpoint"
        tok_dir = args.tokenizer or model
        if is_checkpoint(tok_dir) and (Path(tok_dir) / "latest").is_file():
            tok_dir = str(Path(tok_dir) / (Path(tok_dir) / "latest").read_text().strip())
        tokenizer = load_tokenizer(tok_dir)
        # Load every benchmark before starting a server: a missing file fails in seconds.
        data = {b.name: load_benchmark(b, tokenizer, data_dir=args.data_dir, limit=args.limit) for b in benches}

        if args.server_url:
            server = VLLMServer.attach(args.server_url)
        else:
            server = make_server(args, model, work_dir / "server")
            log.info(f"starting vLLM for {model} (log: {server.log_path})")
            stack.callback(server.stop)
            server.start().wait_healthy(timeout=args.server_start_timeout)
        client = RolloutClient.for_server(server, max_concurrency=args.concurrency, timeout=args.request_timeout)
        scorer = stack.enter_context(RewardScorer("math", timeout_s=args.reward_timeout,
                                                  num_workers=args.reward_workers))
        stop_ids = args.stop_token_ids if args.stop_token_ids is not None else end_of_turn_token_ids(tokenizer)
        max_len = client.max_model_len()

        results: dict[str, dict] = {}
        for bench in benches:
            items = data[bench.name]
            max_tokens = bench.max_tokens
            if max_len is not None:
                too_long = [it for it in items if len(it.prompt_ids) >= max_len]
                if too_long:
                    raise ValueError(f"{bench.name}: {len(too_long)} prompt(s) leave no room for a response within "
                                     f"max_model_len={max_len} (problem {too_long[0].index}: "
                                     f"{len(too_long[0].prompt_ids)} tokens)")
            log.info(f"{bench.name}: {len(items)} problems, {metric_name(bench.k)}, T={bench.temperature:g}, "
                     f"max_tokens={max_tokens}")
            summary, trajs, scores = generate_and_score(
                client, items, scorer, k=bench.k, temperature=bench.temperature, top_p=bench.top_p,
                max_tokens=max_tokens, seed=args.seed, progress=not args.no_progress, stop_token_ids=stop_ids)
            per_problem = []
            for it, ts, ss in zip(items, trajs, scores):
                row = {"index": it.index, "answer": it.answer, "scores": ss,
                       "response_tokens": [len(t.response_token_ids) for t in ts]}
                if args.save_responses:
                    row["responses"] = [t.text for t in ts]
                per_problem.append(row)
            results[bench.name] = {"metric": metric_name(bench.k), **summary, "per_problem": per_problem}

    out = {
        "model": args.model,
        "source": source,
        "server_url": args.server_url,
        "seed": args.seed,
        "limit": args.limit,
        "benchmarks": results,
        "average_avg_at_k": sum(r["avg_at_k"] for r in results.values()) / len(results),
        "total_seconds": time.perf_counter() - t_start,
    }
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    setup_logging()
    args = parse_args(argv)
    out = run(args)
    print(format_table(out["benchmarks"]))
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)
        log.info(f"wrote {path}")
    return out


if __name__ == "__main__":  # the reward workers are spawned: keep this guard
    from .cli import evaluate as _cli

    sys.exit(_cli())
