#!/usr/bin/env python
"""Weight-sync time per GB: our CPU transports (http, shm) vs vLLM's own reload from a saved
HF folder (`reload_weights(weights_path=...)`), side by side on one running server.

    .venv/bin/python bench/weight_sync.py [--hidden 512 --layers 8 --ffn 1536 --vocab 32000]

Builds a random-weight Qwen2 (~60M params, fp32 ~0.24 GB), starts one vLLM CPU server,
and times each path `--repeats` times (median), every path wrapped in the same
pause / reset_prefix_cache / resume. The disk path is shown twice: reload alone (files
already in the page cache) and save + reload (what a trainer would pay to go through disk).
Each push is checked: the server's log-probs of fixed tokens must equal those after the
disk reload of the same weights.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tbrm.rollout import RolloutClient, VLLMServer  # noqa: E402
from megatron_tbrm.demo.tiny import TinyModelSpec, cached_tiny_model  # noqa: E402
from megatron_tbrm.weight_sync import WeightSync  # noqa: E402

PROMPT, RESPONSE = [5, 17, 33, 101, 250, 7], [12, 99, 140, 3, 77, 210, 45, 8]


def make_model(out: Path, args) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok_src = cached_tiny_model(Path(args.work) / "tiny", TinyModelSpec())
    out.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_src / f, out / f)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=1024,
                      tie_word_embeddings=False, torch_dtype="float32")
    cfg.save_pretrained(out)
    state = {k: v.contiguous() for k, v in Qwen2ForCausalLM(cfg).state_dict().items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return state


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--bucket-mb", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir, removed)")
    args = p.parse_args()
    own = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-ws-"))
    args.work = str(work)
    try:
        run(args, work)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> None:
    from safetensors.torch import save_file

    state = make_model(work / "model", args)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    gb = nbytes / 1e9
    print(f"model: {sum(t.numel() for t in state.values()) / 1e6:.1f}M params, {gb:.3f} GB fp32, "
          f"{len(state)} tensors; bucket {args.bucket_mb} MB; torch threads {torch.get_num_threads()}", flush=True)

    server = VLLMServer(work / "model", dtype="float32", max_model_len=512, kv_cache_bytes=256 * 2**20,
                        max_num_seqs=8, work_dir=work / "server", env={"HF_HUB_OFFLINE": "1"})
    t0 = time.perf_counter()
    with server:
        print(f"server healthy after {time.perf_counter() - t0:.0f} s", flush=True)
        client = RolloutClient.for_server(server, timeout=300)
        times: dict[str, list[float]] = {"http": [], "shm": [], "disk reload": [], "disk save+reload": []}
        max_diff = 0.0
        for rep in range(args.repeats):
            new = perturbed(state, seed=rep + 1)
            # vLLM's own path: the trainer saves an HF folder, the worker reloads it.
            folder = work / f"hf-{rep}"
            folder.mkdir()
            shutil.copy(work / "model" / "config.json", folder / "config.json")
            t0 = time.perf_counter()
            save_file(new, folder / "model.safetensors", metadata={"format": "pt"})
            t_save = time.perf_counter() - t0
            t0 = time.perf_counter()
            server.pause("wait")
            server.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
            server.reset_prefix_cache()
            server.resume()
            t_reload = time.perf_counter() - t0
            times["disk reload"].append(t_reload)
            times["disk save+reload"].append(t_save + t_reload)
            ref = client.score_logprobs(PROMPT, RESPONSE)
            # Back to the base weights through the disk path, then the same `new` via ours.
            for transport in ("http", "shm"):
                WeightSync(server, transport="shm", bucket_bytes=args.bucket_mb * 2**20).push(state.items())
                m = WeightSync(server, transport=transport, bucket_bytes=args.bucket_mb * 2**20).push(new.items())
                times[transport].append(m["duration_s"])
                got = client.score_logprobs(PROMPT, RESPONSE)
                max_diff = max(max_diff, max(abs(a - b) for a, b in zip(got, ref)))
            shutil.rmtree(folder)
            print(f"repeat {rep}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)

    base = statistics.median(times["disk reload"]) / gb
    print(f"\nmax |logprob(ours) - logprob(disk reload)| over all pushes: {max_diff:.2e}")
    print(f"{'path':<18} {'median s':>9} {'s per GB':>9} {'vs disk reload':>15}")
    for name, ts in times.items():
        s_per_gb = statistics.median(ts) / gb
        print(f"{name:<18} {statistics.median(ts):>9.3f} {s_per_gb:>9.3f} {s_per_gb / base:>14.2f}x")
    print(json.dumps({k: [round(x, 4) for x in v] for k, v in times.items()}))


if __name__ == "__main__":
    main()
