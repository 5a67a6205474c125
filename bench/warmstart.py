"""The demo's warm start alone (no RL), over several SFT seeds: does every seed reach the band?

    python bench/warmstart.py [--seeds 0 1 2 ...] [--out runs/warmstart/NAME] [knob=value ...]

Knobs are DemoWarmStart fields (megatron_tbrm/demo/sft.py), e.g. `batch=64 adam_beta2=0.999
sft_pool=4000`; the default is the demo's recipe. For each seed: write the demo's data and tiny
base model once under OUT, run `torchrun --nproc-per-node 2 -m megatron_tbrm.demo.sft` with the
recipe's flags (under `flock /tmp/heavy.lock` unless --no-lock), one seed at a time, and keep
OUT/seed<S>.json (sft.py --metrics-out). Prints a table: seed, band status, the step it
stopped at, the probe there and the one before it (how far one probe interval jumps: a jump
over the band is a failed warm start too), the training loop's seconds; and OUT/table.json.
`--table-only` re-prints the table from OUT's seed<S>.json files without running anything.
Exit status 1 if any seed ended outside the band.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_tbrm.demo.sft import DEMO_MODEL_SPEC, DemoWarmStart  # noqa: E402
from megatron_tbrm.demo.tiny import TinyModelSpec, write_tiny_model  # noqa: E402
from megatron_tbrm.ports import torchrun_command  # noqa: E402


def parse_knobs(items: list[str]) -> DemoWarmStart:
    """key=value strings -> a DemoWarmStart; values typed by the field's default."""
    base = DemoWarmStart()
    kw = {}
    for item in items:
        key, _, value = item.partition("=")
        default = getattr(base, key)  # AttributeError: not a knob
        if isinstance(default, bool):
            kw[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, tuple):
            kw[key] = tuple(float(x) for x in value.split(","))
        else:
            kw[key] = type(default)(value)
    return dataclasses.replace(base, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    ap.add_argument("--out", default="runs/warmstart/demo")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--no-lock", action="store_true", help="do not wrap each run in flock /tmp/heavy.lock")
    ap.add_argument("--table-only", action="store_true", help="tabulate OUT/seed<S>.json, run nothing")
    ap.add_argument("knobs", nargs="*", help="DemoWarmStart field=value")
    a = ap.parse_args()
    ws = parse_knobs(a.knobs)
    out = (REPO / a.out).resolve()
    if a.table_only:
        return table(out, [_row(s, json.loads((out / f"seed{s}.json").read_text())) for s in a.seeds], ws)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(ws), indent=1) + "\n")
    data = ws.write_data(out / "data")
    base = out / "base_model"
    write_tiny_model(base, TinyModelSpec(**DEMO_MODEL_SPEC))
    print(f"[warmstart] {ws}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    rows = []
    for seed in a.seeds:
        metrics = out / f"seed{seed}.json"
        metrics.unlink(missing_ok=True)
        cmd = [*torchrun_command(a.nproc), "-m", "megatron_tbrm.demo.sft", "--model", str(base), "--data", str(data["sft_train"]),
               "--out", str(out / "sft_model"), "--seed", str(seed), "--probe", str(data["probe"]),
               "--no-progress", "--metrics-out", str(metrics), *ws.cli_args()]
        if not a.no_lock:
            cmd = ["flock", "/tmp/heavy.lock", *cmd]
        t0 = time.time()
        with open(out / f"seed{seed}.log", "w") as log:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if not metrics.exists():
            print(f"[warmstart] seed {seed}: no metrics (exit {rc}), see {out / f'seed{seed}.log'}", flush=True)
            rows.append({"seed": seed, "band_status": f"crashed (exit {rc})"})
            continue
        row = dict(_row(seed, json.loads(metrics.read_text())), wall_seconds=round(time.time() - t0, 1))
        rows.append(row)
        print(f"[warmstart] seed {seed}: {row}", flush=True)
    return table(out, rows, ws)


def _row(seed: int, r: dict) -> dict:
    """One seed's sft.py --metrics-out -> a table row."""
    probes = r["probe"]
    return {"seed": seed, "band_status": r["band_status"], "step": r["steps"], "probe": r["probe_accuracy"],
            "prev_probe": probes[-2]["greedy_exact"] if len(probes) > 1 else None,
            "best_probe": max(p["greedy_exact"] for p in probes), "seconds": round(r["seconds"], 1),
            "ce_last": r["ce_last"]}


def table(out: Path, rows: list[dict], ws: DemoWarmStart) -> int:
    """Print the markdown table, write OUT/table.json; 0 if every seed is in its band, else 1."""
    (out / "table.json").write_text(json.dumps({"recipe": dataclasses.asdict(ws), "rows": rows}, indent=1) + "\n")
    print(f"\n| seed | status | step | probe | probe before | seconds |\n|---|---|---|---|---|---|")
    for r in rows:
        if "step" in r:
            print(f"| {r['seed']} | {r['band_status']} | {r['step']} | {r['probe']:.3f} | {r['prev_probe']:.3f} | {r['seconds']:.0f} |")
        else:
            print(f"| {r['seed']} | {r['band_status']} | | | | |")
    return 0 if all(r["band_status"] == "in_band" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
