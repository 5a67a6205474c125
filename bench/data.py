"""Start-up cost of the training data per rank: the public DAPO-Math-17k parquet's shape and size.

    .venv/bin/python bench/data.py                      # 1.79 M rows, 4 ranks, old vs new
    .venv/bin/python bench/data.py --rows 200000 --old-rows 200000 --ranks 2

The public DAPO-Math-17k parquet holds ~1.79 M rows: ~17.4 k distinct prompts, each repeated
~100 times (shared/notes/tbrm.md). This writes a parquet of that shape (message-list prompts
wrapped in DAPO's instruction, nested reward_model.ground_truth, a per-row extra_info.index,
the duplication as ~100 concatenated copies, pyarrow's default row groups) and measures, in
one fresh process per rank, what Trainer.__init__ does with the training data there:

- old: the code before issue 14.2 (megatron_tbrm/data.py at OLD_COMMIT, read from git): every
  rank reads the whole table, templates and tokenises every row.
- new: rank 0 builds PromptDataset (streamed, needed columns only, duplicates dropped before
  templating) + PromptSampler; the other ranks hold a MirroredSampler, nothing else.

Printed per rank: seconds spent on the data (tokenizer load excluded: every rank needs it for
the pad id), the process's peak RSS, and the RSS before the data (imports + tokenizer). The
old path holds every row's token ids as Python ints, so at full size it needs far more memory
than a small machine has: --old-rows runs it on a prefix and the full-size figure is scaled
linearly (marked "est."). The tokenizer is the tiny test model's byte-level BPE (no download);
a Qwen tokenizer folder can be given with --tokenizer. Not a test.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "410e59a"  # the last commit before the rank-0-only, de-duplicating loader
PROMPT_KEY, ANSWER_KEY = "prompt", "reward_model.ground_truth"
MAX_PROMPT_TOKENS = 1024
BATCH = 128

_WORDS = ("let", "the", "integer", "sum", "of", "all", "positive", "real", "numbers", "such", "that", "find",
          "triangle", "circle", "radius", "probability", "digits", "remainder", "when", "divided", "by",
          "sequence", "polynomial", "roots", "$x^2+3x-7$", "$\\frac{a}{b}$", "$n$", "$m+n$", "area", "compute")


def make_dapo_parquet(path: Path, rows: int, distinct: int, seed: int = 0) -> Path:
    """A DAPO-Math-17k-shaped parquet: `distinct` problems (150-900 characters) in DAPO's
    instruction wrapper, integer answers, repeated as whole copies until `rows` rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_tbrm.data import DAPO_INSTRUCTION_PREFIX, DAPO_INSTRUCTION_SUFFIX

    rng = random.Random(seed)
    problems, answers = [], []
    for k in range(distinct):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(25, 150))]
        problems.append(f"Problem {k}: " + " ".join(words) + "?")
        answers.append(str(rng.randint(0, 10**6)))
    content = [f"{DAPO_INSTRUCTION_PREFIX}\n\n{p}\n\n{DAPO_INSTRUCTION_SUFFIX}" for p in problems]
    prompt = pa.array([[{"role": "user", "content": c}] for c in content])
    reward_model = pa.array([{"ground_truth": a, "style": "rule-based"} for a in answers])
    take = pa.array(np.arange(rows) % distinct)
    table = pa.table({
        "data_source": pa.array(["math_dapo"] * rows),
        "prompt": prompt.take(take),
        "ability": pa.array(["MATH"] * rows),
        "reward_model": reward_model.take(take),
        "extra_info": pa.StructArray.from_arrays([pa.array(np.arange(rows).astype(str))], names=["index"]),
    })
    pq.write_table(table, path)
    return path


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: on Linux that keeps the
    high-water mark of the parent it was forked from across exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _old_data_module():
    """megatron_tbrm/data.py as it was at OLD_COMMIT, imported under another name."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:megatron_tbrm/data.py"],
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "tbrm_data_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("tbrm_data_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def worker(impl: str, rank: int, data: str, tokenizer: str, strip: bool) -> dict:
    """One rank's data start-up, as Trainer.__init__ does it; returns the measurements."""
    import warnings

    import pyarrow.parquet  # noqa: F401  (imported by every rank either way)

    from megatron_tbrm.data import SYSTEM_PROMPT, MirroredSampler, PromptDataset, PromptSampler, load_tokenizer

    warnings.simplefilter("ignore")
    tok = load_tokenizer(tokenizer)  # every rank: the trainer needs the pad id
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    out: dict = {"impl": impl, "rank": rank}
    if impl == "old":
        old = _old_data_module()
        ds = old.PromptDataset(data, tok, PROMPT_KEY, ANSWER_KEY, SYSTEM_PROMPT, MAX_PROMPT_TOKENS)
        old.PromptSampler(ds, BATCH, seed=0)
        out.update(prompts=len(ds), rows=ds.stats.rows)
    elif rank == 0:
        ds = PromptDataset(data, tok, PROMPT_KEY, ANSWER_KEY, SYSTEM_PROMPT, MAX_PROMPT_TOKENS,
                           strip_instruction=strip)
        PromptSampler(ds, BATCH, seed=0)
        out.update(prompts=len(ds), rows=ds.stats.rows, duplicates=ds.stats.duplicates)
    else:
        MirroredSampler({"epoch": 0, "index": 0, "seed": 0, "size": 17_400, "shuffle": True})
    out.update(seconds=time.perf_counter() - t0, peak_rss_mb=_peak_rss_mb(), base_rss_mb=base)
    return out


def run_rank(impl: str, rank: int, data: Path, tokenizer: str, strip: bool) -> dict:
    cmd = [sys.executable, __file__, "--_worker", impl, str(rank), str(data), tokenizer] + (["--strip"] if strip else [])
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return {"impl": impl, "rank": rank, "error": f"exit {res.returncode}: {res.stderr.strip()[-400:]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_790_000)
    ap.add_argument("--distinct", type=int, default=17_400)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--old-rows", type=int, default=90_000,
                    help="rows for the old path (a prefix file of the same shape); full-size figures are scaled")
    ap.add_argument("--impl", default="old,new")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the tiny test model's)")
    ap.add_argument("--strip", action="store_true", help="new path: data.strip_instruction=true (the paper recipes)")
    ap.add_argument("--out", default=None, help="folder for the parquet files (default: a temporary one)")
    ap.add_argument("--_worker", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--_make", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._make:
        make_dapo_parquet(Path(args._make[0]), int(args._make[1]), int(args._make[2]))
        return
    if args._worker:
        impl, rank, data, tok = args._worker
        print(json.dumps(worker(impl, int(rank), data, tok, args.strip)))
        return

    sys.path.insert(0, str(ROOT))
    if args.tokenizer is None:
        from megatron_tbrm.demo.tiny import cached_tiny_model

        args.tokenizer = str(cached_tiny_model(ROOT / ".cache" / "tiny_models"))
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_data_"))
    out.mkdir(parents=True, exist_ok=True)
    impls = [s.strip() for s in args.impl.split(",") if s.strip()]
    print(f"tokenizer: {args.tokenizer}; parquet files in {out}")
    results = []
    for impl in impls:
        rows = min(args.old_rows, args.rows) if impl == "old" else args.rows
        data = out / f"dapo_{rows}.parquet"
        if not data.exists():
            t0 = time.perf_counter()
            # In a child process: the measured ranks are forked from this one, keep it small.
            subprocess.run([sys.executable, __file__, "--_make", str(data), str(rows), str(min(args.distinct, rows))],
                           check=True)
            print(f"wrote {data} ({rows} rows, {min(args.distinct, rows)} distinct, "
                  f"{data.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s", flush=True)
        scale = args.rows / rows
        for rank in range(args.ranks):
            r = run_rank(impl, rank, data, args.tokenizer, args.strip)
            r["file_rows"], r["scale"] = rows, scale
            results.append(r)
            if "error" in r:
                print(f"{impl:>3} rank {rank}: FAILED {r['error']}", flush=True)
                continue
            line = (f"{impl:>3} rank {rank}: {r['seconds']:7.1f} s, peak RSS {r['peak_rss_mb'] / 1024:5.2f} GiB "
                    f"(before the data {r['base_rss_mb'] / 1024:4.2f} GiB)")
            if scale != 1:
                est_s = r["seconds"] * scale
                est_rss = r["base_rss_mb"] + (r["peak_rss_mb"] - r["base_rss_mb"]) * scale
                line += (f"  on {rows} rows; est. at {args.rows} rows: {est_s:6.0f} s, "
                         f"{est_rss / 1024:5.1f} GiB")
            if "prompts" in r:
                line += f"  [{r['rows']} rows -> {r['prompts']} prompts"
                line += f", {r['duplicates']} duplicates dropped]" if "duplicates" in r else "]"
            print(line, flush=True)
    r0 = {r["impl"]: r for r in results if r["rank"] == 0 and "error" not in r}
    if {"old", "new"} <= set(r0):
        o, n = r0["old"], r0["new"]
        o_s = o["seconds"] * o["scale"]
        o_mb = o["base_rss_mb"] + (o["peak_rss_mb"] - o["base_rss_mb"]) * o["scale"]
        print(f"rank 0 at {args.rows} rows: old/new time {o_s / max(n['seconds'], 1e-9):.0f}x, "
              f"peak RSS {o_mb / n['peak_rss_mb']:.0f}x" + (" (old scaled from its prefix)" if o["scale"] != 1 else ""))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
