#!/usr/bin/env python
"""Rollout time, 1 vLLM engine vs 2 engines, the same prompts, side by side in one run
(issue 17 item 1; goal: 2 engines <= 0.65x the time of 1).

    .venv/bin/python bench/rollout.py [--prompts 256 --max-tokens 32 --repeats 3]

vLLM CPU servers of the demo's model shape (megatron_tbrm/demo/sft.py DEMO_MODEL_SPEC, random
weights; `--model wide` for a compute-bound one), started as the trainer starts them: first one
engine (vLLM's own CPU binding), then two, each bound to its own cores (engines.engine_cpu_binds).
Each arm is warmed up with one pass, then times `--repeats` passes of the same prompts (the
demo's 2-digit additions, its chat template) through a RolloutClient (least-outstanding
routing, rollout.max_concurrency requests in flight per engine, as the trainer does). Sampling follows the demo recipe
(recipes/tiny_cpu.yaml: n=1, T=1, max_tokens 32), with `ignore_eos` so that both arms generate
exactly prompts x max_tokens tokens whatever the random model writes. Per-request seeds make
the samples independent of the engine: the bench checks that both arms return the same tokens.
The trainer is idle meanwhile (not started). On 2 cores each vLLM CPU engine runs one torch
thread (shared/notes/cpu-stack.md), so one engine leaves a core idle.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tbrm.config import load_config  # noqa: E402
from megatron_tbrm.demo.arithmetic import arithmetic_problems, arithmetic_row  # noqa: E402
from megatron_tbrm.demo.sft import DEMO_MODEL_SPEC  # noqa: E402
from megatron_tbrm.demo.tiny import TinyModelSpec, cached_tiny_model  # noqa: E402
from megatron_tbrm.rollout import RolloutClient, VLLMServer  # noqa: E402
from megatron_tbrm.rollout.engines import each, engine_cpu_binds, start_all  # noqa: E402

# The demo's shape, and a wider one whose decode steps are compute-bound on this CPU.
MODELS = {"demo": DEMO_MODEL_SPEC, "wide": dict(layers=8, hidden=512, heads=8, kv_heads=4, ffn=1536)}
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml"


def prompt_ids(model: Path, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = [arithmetic_row(*p)["prompt"] for p in arithmetic_problems(count, seed=0, digits=2, ops="+")]
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in rows]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=None, help="default: the demo recipe's rollout.max_tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="demo", choices=list(MODELS),
                   help="demo: the demo's shape (overhead-bound on CPU); wide: 8 layers of 512 (compute-bound)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir, removed)")
    args = p.parse_args()
    own = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-rollout-"))
    try:
        run(args, work)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def cpu_seconds(servers: list) -> float:
    """User + system CPU seconds used so far by the servers' process trees (API server, engine
    core, workers)."""
    import psutil

    total = 0.0
    for s in servers:
        root = psutil.Process(s.proc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


def timed(servers: list, prompts, kwargs: dict, repeats: int, max_concurrency: int, timeout: float):
    """Start `servers`, warm them up with one pass, time `repeats` passes; stop them.
    Returns (seconds per pass, the last pass's token ids, requests per engine, cores busy: the
    servers' CPU seconds over the timed passes' wall seconds)."""
    t0 = time.perf_counter()
    start_all(servers, timeout)
    print(f"{len(servers)} engine(s) healthy after {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        client = RolloutClient(servers, max_concurrency=max_concurrency, timeout=600)
        client.generate(prompts, **kwargs)  # warm-up: the first batches allocate and pick kernels
        times, tokens = [], []
        cpu0 = cpu_seconds(servers)
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = client.generate(prompts, **kwargs)
            times.append(time.perf_counter() - t0)
            tokens = [t.response_token_ids for t in out]
        busy = (cpu_seconds(servers) - cpu0) / sum(times)
        return times, tokens, client.requests_per_engine(), busy
    finally:
        each(servers, lambda s: s.stop())


def run(args, work: Path) -> None:
    r = load_config(RECIPE).rollout
    max_tokens = args.max_tokens or r.max_tokens
    model = cached_tiny_model(work / "tiny", TinyModelSpec(**MODELS[args.model]))
    prompts = prompt_ids(model, args.prompts)

    def server(name: str, bind):
        env = {"HF_HUB_OFFLINE": "1"} | ({"VLLM_CPU_OMP_THREADS_BIND": bind} if bind else {})
        return VLLMServer(model, dtype="float32", max_model_len=r.max_model_len, kv_cache_bytes=r.kv_cache_bytes,
                          max_num_seqs=r.max_num_seqs, work_dir=work / name, env=env)

    print(f"model {args.model} {MODELS[args.model]}; {len(prompts)} prompts, n={r.n}, T={r.temperature}, "
          f"{max_tokens} tokens each (ignore_eos), max_concurrency {r.max_concurrency} per engine, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    kwargs = dict(n=r.n, temperature=r.temperature, max_tokens=max_tokens, seed=1, progress=False,
                  extra={"ignore_eos": True})
    binds = engine_cpu_binds(2, 1)
    arms = {"1 engine": [server("one", None)],  # as the trainer starts one: vLLM's own binding
            "2 engines": [server(f"pair{i}", b) for i, b in enumerate(binds)]}  # as it starts two
    times, tokens, per_engine, busy = {}, {}, {}, {}
    for name, servers in arms.items():
        times[name], tokens[name], per_engine[name], busy[name] = timed(
            servers, prompts, kwargs, args.repeats, r.max_concurrency, r.startup_timeout_s)
        print(f"{name}: " + ", ".join(f"{t:.2f} s" for t in times[name]) + f"; requests per engine {per_engine[name]}; "
              f"cores busy {busy[name]:.2f} of {len(os.sched_getaffinity(0))}", flush=True)
    same = tokens["1 engine"] == tokens["2 engines"]
    one, two = statistics.median(times["1 engine"]), statistics.median(times["2 engines"])
    gen = len(prompts) * max_tokens * r.n
    print(f"\nCPU binding of the 2 engines (VLLM_CPU_OMP_THREADS_BIND): {binds}")
    print(f"samples identical across arms (per-request seeds): {same}")
    print(f"{'arm':<10} {'median s':>9} {'tokens/s':>9} {'cores busy':>11} {'vs 1 engine':>12}")
    for name, t in (("1 engine", one), ("2 engines", two)):
        print(f"{name:<10} {t:>9.2f} {gen / t:>9.0f} {busy[name]:>11.2f} {t / one:>11.2f}x")
    print(json.dumps({k: [round(x, 3) for x in v] for k, v in times.items()}))
    if not same:
        raise SystemExit("the two arms returned different samples: routing changed what was generated")


if __name__ == "__main__":
    main()
