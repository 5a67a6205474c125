"""Where a rollout's time goes, request by request: the rollout time's heavy tail.

One vLLM CPU server on a demo folder's warm start; 64-prompt batches from its training set
(temperature 1, 32 tokens, the demo recipe's sampling), each followed by an idle gap (the
trainer's update). Per batch: wall seconds, how long after the batch began its last request
left the client (RolloutClient's threads: the server's HTTP handling cannot delay that, its
CPU load can), and the slowest request's own latency (sent -> answered).

    python bench/rollout_client.py [--demo runs/demo] [--batches 60] [--gap 0.4]

docs/throughput.md, "The rollout time's tail".
"""
from __future__ import annotations

import argparse
import json
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
    a = ap.parse_args()
    model, data = a.demo / "sft_model", a.demo / "data" / "train.jsonl"
    for p in (model / "config.json", data):
        if not p.exists():
            ap.error(f"--demo {a.demo}: {p} is missing (run `make demo` first)")

    from transformers import AutoTokenizer

    from megatron_tbrm.rollout.client import RolloutClient, end_of_turn_token_ids
    from megatron_tbrm.rollout.server import VLLMServer
    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    need = a.prompts * (a.batches + 1)
    rows = (rows * (need // len(rows) + 1))[:need]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                                  add_generation_prompt=True, tokenize=False), add_special_tokens=False)
               for r in rows]
    server = VLLMServer(model, dtype="float32", max_model_len=128, kv_cache_bytes=256 << 20, max_num_seqs=a.prompts,
                        enforce_eager=True, work_dir=tempfile.mkdtemp(prefix="bench-rollout-client-"),
                        shm_busy_loop_s=0.05)
    server.start()
    server.wait_healthy(timeout=300)
    client = RolloutClient.for_server(server, max_concurrency=a.prompts)
    sent: list[float] = []
    latency: list[float] = []
    post = client._post

    def timed_post(path, body):  # when each request leaves the client, and its own latency
        t = time.perf_counter()
        sent.append(t)
        out = post(path, body)
        latency.append(time.perf_counter() - t)
        return out

    client._post = timed_post
    res: list[tuple[float, float, float]] = []
    try:
        for b in range(a.batches + 1):
            sent.clear()
            latency.clear()
            t0 = time.perf_counter()
            client.generate(prompts[a.prompts * b:a.prompts * (b + 1)], temperature=1.0, max_tokens=32, seed=b,
                            stop_token_ids=end_of_turn_token_ids(tok), progress=False)
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
