"""Trainer start-up with and without megatron-core's random initialisation, side by side in one run.

The trainer's policy and reference are built, the HF weights imported into the reference and
copied into the policy (Trainer.__init__: Engine(policy, optimizer) + Engine(ref) +
import_hf_weights(ref) + policy.load_state_from(ref) + optimizer.reload_model_params()).
The random init that the import then overwrites is the wasted work measured here.

    python bench/startup.py [--repeats 3] [--cache runs/bench_startup]

Model: Qwen2.5-0.5B's config.json (24 layers, hidden 896, vocabulary 151,936, tied), random
weights initialised and written by transformers (bf16, like the published checkpoint), built
once under --cache. Single process, TP=1, fp32 parameters (the CPU default). Each measurement
runs in a fresh child process so its peak RSS is its own; init on / off alternate.

Reading the table: without init, the first touch of each weight's memory (page faults) moves
from the build into the import, so import_ref grows while the builds shrink; compare totals.
CPU seconds are steadier than wall seconds on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Qwen2.5-0.5B's config.json as published (transformers 4 spelling).
QWEN25_0_5B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936,
}


def build_hf_model(cache: Path) -> Path:
    """The random Qwen2.5-0.5B-shaped folder, written by transformers once."""
    out = cache / "qwen2.5-0.5b-random"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    fields = {k: v for k, v in QWEN25_0_5B.items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**fields), dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s() -> float:
    """CPU seconds of this process (all threads, user + system): steadier than wall time on a
    shared machine, and it counts the kernel's page-fault work that first touches cost."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(hf_dir: str, init_weights: bool) -> dict:
    """One start-up in this process: seconds per phase, RSS before and peak (MiB)."""
    import torch

    from megatron_tbrm.engine import Engine, OptimSettings
    from megatron_tbrm.hf_mapping import import_hf_weights
    from megatron_tbrm.model import ModelConfig
    from megatron_tbrm.parallel import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=1)
    cfg = ModelConfig.from_hf(hf_dir, dtype="fp32")
    rss0 = _rss_mib()
    t, cpu = [time.perf_counter()], [_cpu_s()]

    def lap():
        t.append(time.perf_counter())
        cpu.append(_cpu_s())

    policy = Engine(cfg, OptimSettings(lr=1e-6, total_steps=10), init_weights=init_weights)
    lap()
    ref = Engine(cfg, None, init_weights=init_weights)
    lap()
    import_hf_weights(ref.chunks, cfg, hf_dir)
    lap()
    policy.load_state_from(ref)
    policy.optimizer.reload_model_params()
    lap()
    # The loaded weights are the file's: a start-up that skipped work must still be right.
    from safetensors import safe_open

    with safe_open(str(Path(hf_dir) / "model.safetensors"), framework="pt") as f:
        want = f.get_tensor("model.layers.23.mlp.down_proj.weight").float()
    from megatron_tbrm.model import unwrap

    got = dict(unwrap(policy.chunks[0]).named_parameters())["decoder.layers.23.mlp.linear_fc2.weight"]
    assert torch.equal(got.detach(), want), "policy weights differ from the HF file"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    destroy_distributed()
    names = ("build_policy", "build_ref", "import_ref", "copy_to_policy")
    return {"init_weights": init_weights, **{n: t[i + 1] - t[i] for i, n in enumerate(names)},
            "total": t[-1] - t[0], "total_cpu": cpu[-1] - cpu[0], "rss_before_mib": rss0, "peak_rss_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="runs per setting (alternating on/off)")
    ap.add_argument("--cache", default=str(REPO / "runs" / "bench_startup"), help="where the random HF model is kept")
    ap.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(measure(a.hf_dir, a.child == "on")), flush=True)
        return

    t0 = time.perf_counter()
    hf_dir = build_hf_model(Path(a.cache))
    print(f"model: {hf_dir} (ready in {time.perf_counter() - t0:.1f} s)", flush=True)
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for _ in range(a.repeats):
        for mode in ("on", "off"):
            r = subprocess.run([sys.executable, __file__, "--child", mode, "--hf-dir", str(hf_dir)],
                               capture_output=True, text=True)
            line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
            if r.returncode or line is None:
                sys.exit(f"child (init {mode}) failed:\n{r.stderr[-3000:]}")
            runs[mode].append(json.loads(line[len("RESULT "):]))
            print(f"init {mode:3s}: " + ", ".join(f"{k} {v:.1f}" for k, v in runs[mode][-1].items()
                                                 if isinstance(v, float)), flush=True)

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    print(f"\nQwen2.5-0.5B-shaped, fp32, TP=1, 1 process, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; median of {a.repeats} per setting")
    print(f"{'':24s} {'init on':>10s} {'init off':>10s} {'off/on':>8s}")
    for key, unit in (("build_policy", "s"), ("build_ref", "s"), ("import_ref", "s"), ("copy_to_policy", "s"),
                      ("total", "s"), ("total_cpu", "CPU s"), ("peak_rss_mib", "MiB")):
        on, off = median("on", key), median("off", key)
        print(f"{key + ' (' + unit + ')':24s} {on:10.1f} {off:10.1f} {off / on:8.2f}")


if __name__ == "__main__":
    main()
