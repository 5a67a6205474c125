"""`make demo`: the main job on a fresh 2-core machine, end to end, nothing downloaded.

1. build a tiny Qwen2 chat model (random weights, offline-trained tokenizer);
2. generate a verifiable task (2-digit arithmetic with \\boxed{} answers), disjoint train/test;
3. warm-start it with a short supervised Megatron run, so it is right sometimes, not often;
4. train it with TBRM (n=1) through the real vLLM CPU server, 2 processes over gloo,
   evaluating greedy accuracy on held-out problems before, during and after;
5. write runs/demo/summary.json and runs/demo/curves.png.

    python -m megatron_tbrm.demo [--out runs/demo] [--steps N] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny_cpu.yaml"


def _run(cmd: list[str], what: str) -> None:
    print(f"\n[demo] {what}\n[demo] $ {' '.join(cmd)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"[demo] {what} failed (exit {proc.returncode})")


def torchrun(nproc: int, module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={_free_port()}", "-m", module, *args]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(run_dir: Path, out: Path, t0: float) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [(r["step"], r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None]
    steps = max(r["step"] for r in rows)
    rewards = [(r["step"], r["reward_mean"]) for r in rows if r.get("reward_mean") is not None]
    last = [a for _, a in evals[-3:]]
    summary = {
        "accuracy_before": evals[0][1],
        "accuracy_after": evals[-1][1],
        # TBRM runs oscillate (shared/notes/tbrm.md): the mean of the last evaluations is the
        # steadier number.
        "accuracy_after_mean_last3": sum(last) / len(last),
        "steps": steps,
        "wall_seconds": round(time.time() - t0, 1),
        "eval_curve": [{"step": s, "accuracy": a} for s, a in evals],
        "train_reward_curve": [{"step": s, "reward": r} for s, r in rewards],
        "train_reward_first5": sum(r for _, r in rewards[:5]) / max(len(rewards[:5]), 1),
        "train_reward_last5": sum(r for _, r in rewards[-5:]) / max(len(rewards[-5:]), 1),
        "eval": "greedy exact answer (Math-Verify) on held-out problems, via the vLLM server",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _plot(evals, rewards, out / "curves.png")
    return summary


def _plot(evals, rewards, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot([s for s, _ in evals], [a for _, a in evals], marker="o")
    ax[0].set(title="held-out accuracy (greedy)", xlabel="TBRM step", ylim=(0, 1))
    ax[1].plot([s for s, _ in rewards], [r for _, r in rewards], alpha=0.8)
    ax[1].set(title="train reward (n=1, T=1)", xlabel="TBRM step", ylim=(0, 1))
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--steps", type=int, default=None, help="TBRM steps (default: the recipe's)")
    ap.add_argument("--sft-match", type=float, default=0.3,
                    help="warm start until the training-batch greedy exact match reaches this")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides for the TBRM recipe")
    a = ap.parse_args(argv)

    from .data import make_arithmetic_splits
    from .sft import DEMO_DATA, DEMO_MODEL_SPEC
    from .tiny import TinyModelSpec, write_tiny_model

    t0 = time.time()
    out = (REPO / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base, sft_model, data_dir, run_dir = out / "base_model", out / "sft_model", out / "data", out / "tbrm"

    print("[demo] 1/4 tiny model + tokenizer", flush=True)
    write_tiny_model(base, TinyModelSpec(**DEMO_MODEL_SPEC))
    train, test = make_arithmetic_splits(data_dir, n_train=4000, n_test=200, seed=0, **DEMO_DATA)

    # Stop the warm start once it is right sometimes, not often (see megatron_tbrm/sft.py).
    sft = ["--model", str(base), "--data", str(train), "--out", str(sft_model), "--steps", "400",
           "--stop-at-match", str(a.sft_match)]
    _run(torchrun(a.nproc, "megatron_tbrm.sft", *sft), "2/4 supervised warm start (Megatron, DP=2)")

    if run_dir.exists():  # a fresh run each time: the demo's numbers are for this run
        import shutil

        shutil.rmtree(run_dir)
    overrides = [f"model.path={sft_model}", f"data.train_path={train}", f"eval.path={test}", f"run.dir={run_dir}"]
    if a.steps is not None:
        overrides.append(f"train.steps={a.steps}")
    _run(torchrun(a.nproc, "megatron_tbrm.train", "--config", str(RECIPE), *overrides, *a.overrides),
         "3/4 TBRM (n=1) through the vLLM CPU server")

    print("\n[demo] 4/4 summary", flush=True)
    s = summarize(run_dir, out, t0)
    print(json.dumps({k: s[k] for k in ("accuracy_before", "accuracy_after", "accuracy_after_mean_last3", "steps",
                                        "wall_seconds", "train_reward_first5", "train_reward_last5")}, indent=1))
    print(f"[demo] wrote {out / 'summary.json'} and {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
