"""Where a rollout's time goes, request by request: the rollout time's heavy tail.

One vLLM CPU server on a demo folder's warm start, set up as recipes/tiny_cpu.yaml sets it;
64-prompt batches from its training set, templated and sampled as the trainer does (the
recipe's temperature, max_tokens, end-of-turn stop), each followed by an idle gap (the
trainer's update). Per batch: wall seconds, how long after the batch began its last request
left the client (RolloutClient's sender: the server's HTTP handling cannot delay that, its
CPU load can), and the slowest request's own latency (sent -> answered).

    python bench/rollout_client.py [--demo runs/demo] [--batches 60] [--gap 0.4] [--nice N]

docs/throughput.md, "The rollout time's tail".
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, default=REPO / "runs" / "demo", help="a demo folder (sft_model, data/)")
    ap.add_argument("--batches", type=int, default=60, help="batches after the warm-up batch")
    ap.add_argument("--gap", type=float, default=0.4, help="idle seconds after each batch")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--nice", type=int, default=0, help="renice the server's processes by this much once healthy")
    a = ap.parse_args()
    model, data = a.demo / "sft_model", a.demo / "data" / "train.jsonl"
    for p in (model / "config.json", data):
        if not p.exists():
            ap.error(f"--demo {a.demo}: {p} is missing (run `make demo` first)")

    from megatron_tbrm.config import load_config
    from megatron_tbrm.data import PromptDataset, PromptSampler, load_tokenizer
    from megatron_tbrm.rollout.client import RolloutClient, end_of_turn_token_ids
    from megatron_tbrm.rollout.manager import VLLM_DTYPES
    from megatron_tbrm.rollout.server import VLLMServer

    # The demo recipe's server and sampling settings, and its prompts as the trainer templates them.
    cfg = load_config(REPO / "recipes" / "tiny_cpu.yaml")
    r, d = cfg.rollout, cfg.data
    tok = load_tokenizer(model)
    stop = end_of_turn_token_ids(tok)
    sampler = PromptSampler(PromptDataset(data, tok, d.prompt_key, d.answer_key, d.system_prompt,
                                          max_prompt_tokens=d.max_prompt_tokens), a.prompts, seed=d.seed)
    dtype = r.dtype or cfg.model.dtype
    server = VLLMServer(model, dtype=VLLM_DTYPES.get(dtype, dtype), max_model_len=r.max_model_len,
                        kv_cache_bytes=r.kv_cache_bytes, max_num_seqs=a.prompts, seed=cfg.parallel.seed,
                        work_dir=tempfile.mkdtemp(prefix="bench-rollout-client-"), shm_busy_loop_s=r.shm_busy_loop_s)
    server.start()
    server.wait_healthy(timeout=r.startup_timeout_s)
    if a.nice:
        import psutil
        import os
        for p in [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]:
            for t in p.threads():  # Linux: a nice value is per thread
                os.setpriority(os.PRIO_PROCESS, t.id, os.getpriority(os.PRIO_PROCESS, t.id) + a.nice)
    client = RolloutClient.for_server(server, max_concurrency=a.prompts)
    sent: list[float] = []
    latency: list[float] = []
    post = client._post

    async def timed_post(http, path, body):  # when each request leaves the client, and its own latency
        t = time.perf_counter()
        sent.append(t)
        out = await post(http, path, body)
        latency.append(time.perf_counter() - t)
        return out

    client._post = timed_post
    res: list[tuple[float, float, float]] = []
    try:
        for b in range(a.batches + 1):
            sent.clear()
            latency.clear()
            t0 = time.perf_counter()
            client.generate([p.prompt_ids for p in sampler.next_batch()], temperature=r.temperature, top_p=r.top_p,
                            max_tokens=r.max_tokens, stop_token_ids=stop, seed=b, progress=False)
            if b:  # batch 0 warms the server up
                res.append((time.perf_counter() - t0, max(sent) - t0, max(latency)))
            time.sleep(a.gap)
    finally:
        server.stop()
    t = [x for x, _, _ in res]
    med = statistics.median(t)
    slow = [r for r in res if r[0] > 2 * med]
    print(f"{a.prompts}-prompt batches, {a.gap} s idle after each, one vLLM CPU server: {len(t)} batches, "
          f"mean {statistics.mean(t):.3f} s, median {med:.3f} s, max {max(t):.2f} s; {len(slow)} over 2x the median")
    print(f"  last request sent after (s): all batches mean {statistics.mean(s for _, s, _ in res):.3f}; slowest "
          f"request's latency: mean {statistics.mean(m for _, _, m in res):.3f}")
    print("  slow batches (batch s / last request sent after s / slowest request's latency s): "
          + ", ".join(f"{x:.2f} / {s:.2f} / {m:.2f}" for x, s, m in slow))


if __name__ == "__main__":
    main()
