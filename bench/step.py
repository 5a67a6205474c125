"""Step cost, measured side by side in one run:

A. TBRM update step vs a supervised cross-entropy step on the same tiny model and batch
   (Megatron forward+backward+optimizer; the reference forward excluded): the loss overhead.
   Goal: under 10%.
B. Wall time of a full TBRM n=1 step vs a GRPO n=4 step on the same prompts (rollout through
   the real vLLM server, reward, reference forward, update, weight sync). The paper reports 3.1x
   on 7B; here rollouts of a tiny model are cheap, so the ratio says how this stack splits time.
C. (--overlap) Wall time per step of TBRM n=1 with train.max_staleness k = 0, 1, 2 (rollouts of
   the next k steps generated while the update runs), same prompts, next to the bound the
   step's parts allow: k=0's (step - min(rollout, update+sync)) / step, the bound when the
   rollout and the update run on separate devices. `--warm DIR` runs the demo recipe (64
   prompts) from a demo folder's warm start; without it, a tiny random model at 32 prompts.
   Every setting runs `--repeats` (even) times in ABBA order (0, 1, 2, 2, 1, 0); `--busy null
   0.05` adds vLLM's own 1 s reader busy loop next to the default 0.05 s
   (rollout.shm_busy_loop_s, vLLM patch in rollout/vllm_cpu_patches.py); `--cpu-bind auto nobind`
   runs the CPU engine's worker pinned to one core (vLLM's VLLM_CPU_OMP_THREADS_BIND=auto, the
   default) and unpinned, side by side. On this CPU rollout and update share the cores: the fraction
   of the machine's CPU time (/proc/stat) each run keeps busy, and the CPU seconds of each
   process (psutil, by vLLM's process titles), are printed too (docs/offpolicy.md, "Where the
   CPU time goes"). Goal (issue 18): k=1 <= 0.7x of k=0.

    python bench/step.py [--nproc 2] [--skip-full] [--overlap [--steps 8] [--warm runs/demo] [--repeats 2]
                         [--busy null 0.05] [--cpu-bind auto nobind]]

A runs under torchrun with --nproc ranks (DP); B launches the trainer twice.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_tbrm.ports import torchrun_command  # noqa: E402


# Part A architectures: the demo's tiny model (weights from its folder), or a Qwen2.5-0.5B-shaped
# model with random weights (real vocabulary 151,936: the size where the loss's cost shows).
ARCHS = {
    "qwen2.5-0.5b": dict(architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=896,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, max_position_embeddings=32768, rope_theta=1000000.0,
                         tie_word_embeddings=True),
}


def worker_update(model_dir: str, rows: int, seq: int, reps: int) -> None:
    """torchrun rank body for part A. `model_dir` is an HF folder or a name in ARCHS."""
    import torch
    import torch.distributed as dist

    from megatron_tbrm.engine import Engine, OptimSettings, split_microbatches
    from megatron_tbrm.hf_mapping import import_hf_weights
    from megatron_tbrm.loss import tbrm_loss_sums
    from megatron_tbrm.model import ModelConfig
    from megatron_tbrm.parallel import destroy_distributed, init_distributed
    from megatron_tbrm.vocab_parallel import vocab_parallel_logprob

    ps = init_distributed(seed=0)
    if model_dir in ARCHS:
        cfg = ModelConfig.from_hf(ARCHS[model_dir], dtype="bf16" if torch.cuda.is_available() else "fp32")
        eng = Engine(cfg, OptimSettings(lr=1e-5, total_steps=100))
    else:
        cfg = ModelConfig.from_hf(model_dir)
        eng = Engine(cfg, OptimSettings(lr=1e-5, total_steps=100))
        import_hf_weights(eng.chunks, cfg, model_dir)
        eng.optimizer.reload_model_params()
    gen = torch.Generator().manual_seed(ps.dp_rank)
    tokens = torch.randint(0, cfg.vocab_size, (rows, seq + 1), generator=gen)
    mask = torch.zeros(rows, seq)
    mask[:, seq // 2 :] = 1.0  # second half of each row is the "response"
    batch = {
        "tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "loss_mask": mask,
        "position_ids": torch.arange(seq).expand(rows, -1).contiguous(),
        "ref_logprobs": -torch.rand(rows, seq, generator=gen) * 5, "rewards": (torch.rand(rows, generator=gen) > 0.5).float(),
    }
    mbs = split_microbatches(batch, max(rows // 2, 1))

    def ce(mb, logits):
        lp, _ = vocab_parallel_logprob(logits, mb["labels"], cfg.vocab_size, None, mask=mb["loss_mask"].bool())
        n = mb["loss_mask"].sum()
        return -(lp * mb["loss_mask"]).sum(), n.to(torch.int), {}

    def tbrm(mb, logits):
        s, n, _ = tbrm_loss_sums(logits, mb["labels"], mb["ref_logprobs"], mb["rewards"], mb["loss_mask"], 0.002,
                                 vocab_size=cfg.vocab_size)
        return s, n, {}

    times: dict[str, list[float]] = {"ce": [], "tbrm": []}
    for i in range(reps + 2):
        for name, fn in (("ce", ce), ("tbrm", tbrm)):  # interleaved: drift hits both alike
            dist.barrier()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            eng.run(mbs, fn)
            eng.step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dist.barrier()
            if i >= 2:  # warm-up
                times[name].append(time.perf_counter() - t0)
    if ps.rank == 0:
        out = {k: statistics.median(v) for k, v in times.items()}
        if torch.cuda.is_available():
            out["device"] = torch.cuda.get_device_name()
            out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(json.dumps(out))
    destroy_distributed()


class CpuSampler:
    """Machine CPU use while a run writes its metrics: every `every` seconds, the busy and total
    jiffies of /proc/stat's aggregate line and how many step records `metrics` holds. Linux only.

    `busy_fraction()` is the busy share of all cores (0..1) between the tick at which the first
    step record appeared and the tick at which the last did: the run's steady state, start-up and
    the first step excluded, as in part C's per-step time."""

    def __init__(self, metrics: Path, every: float = 0.2):
        import threading

        self.metrics, self.every, self.ticks = metrics, every, []
        self.proc_cpu_s: dict[int, tuple[str, float]] = {}  # pid -> (latest name, user+system seen)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _jiffies() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])  # user..steal; guest is inside user

    def _steps(self) -> int:
        try:
            return self.metrics.read_text().count('"step_s"')
        except OSError:
            return 0

    def _sample_processes(self) -> None:
        """CPU seconds of every process below this one (the launcher, its ranks, vLLM's API
        server, EngineCore and workers), by the name vLLM gives its processes (their title)."""
        import psutil

        for p in psutil.Process().children(recursive=True):
            try:
                t = p.cpu_times()
                cmd = " ".join(p.cmdline())
                # the kernel keeps 15 characters of a title ("VLLM::EngineCor"), psutil sometimes more
                name = ("trainer rank" if "megatron_tbrm.train" in cmd and "torch.distributed.run" not in cmd
                        else "vLLM API server" if "api_server" in cmd else p.name()[:15])
            except psutil.Error:
                continue
            self.proc_cpu_s[p.pid] = (name, t.user + t.system)  # by pid: forked vLLM processes retitle

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.ticks.append((*self._jiffies(), self._steps()))
            self._sample_processes()

    def cpu_s_by_process(self) -> dict[str, float]:
        """Whole-run CPU seconds summed by process name (start-up included)."""
        out: dict[str, float] = {}
        for name, s in self.proc_cpu_s.values():
            out[name] = out.get(name, 0.0) + s
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def busy_fraction(self) -> float:
        n = max(t[2] for t in self.ticks)
        first = next(t for t in self.ticks if t[2] >= 1)
        last = next(t for t in self.ticks if t[2] >= n)
        if last[1] <= first[1]:
            raise RuntimeError(f"too few CPU samples between the first and the last step of {self.metrics}")
        return (last[0] - first[0]) / (last[1] - first[1])


def run_logged(cmd: list[str], log: Path, what: str, env: dict | None = None, cwd: Path = REPO) -> str:
    """Run `cmd` in `cwd` (with `env` added to the environment) with its output in `log` (kept);
    on failure exit showing why: every rank's traceback and the vLLM server's own error, not
    only the launcher's last lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))).returncode
    text = log.read_text(errors="replace")
    if rc:
        why = [ln for ln in text.splitlines() if "failed" in ln or "Error" in ln][-20:]
        server_logs = sorted(log.parent.glob("**/vllm/server.log"))
        if server_logs:
            from megatron_tbrm.rollout.server import first_exception

            cause = first_exception(server_logs[-1].read_text(errors="replace"))
            why.append(f"vLLM server log {server_logs[-1]}: {cause or 'no exception found'}")
        raise SystemExit(f"{what} failed (exit {rc}); full output in {log}\n" + "\n".join(why)
                         + "\n--- last lines ---\n" + text[-3000:])
    return text


# the step and its parts as the trainer logs them (metrics.jsonl), seconds
STEP_PARTS = ("step_s", "rollout_s", "ref_s", "train_s", "sync_s")


def abba_step_times(arms: dict, repeats: int, skip: int) -> dict[str, dict[str, float]]:
    """Run two arms side by side in ABBA order (first, second, second, first, ... `repeats` runs
    each) and print the medians of STEP_PARTS per run (after the first `skip` steps) with its
    first step's loss, the means per arm and second / first. `arms` maps a name to a function of
    the run's index that runs it and returns its per-step metric rows. Returns the means."""
    first, second = arms
    order = [first, second, second, first] * (repeats // 2)
    per: dict[str, list[dict]] = {first: [], second: []}
    print(f"{'run':<10}" + "".join(f"{p:>11}" for p in STEP_PARTS) + f"{'loss step 1':>14}")
    for i, name in enumerate(order):
        rows = arms[name](i)
        med = {p: statistics.median(r[p] for r in rows[skip:]) for p in STEP_PARTS}
        per[name].append(med)
        print(f"{name:<10}" + "".join(f"{med[p]:>11.3f}" for p in STEP_PARTS) + f"{rows[0]['loss']:>14.5f}", flush=True)
    mean = {w: {p: statistics.mean(m[p] for m in per[w]) for p in STEP_PARTS} for w in per}
    for w in (first, second):
        print(f"{w + ' mean':<10}" + "".join(f"{mean[w][p]:>11.3f}" for p in STEP_PARTS))
    print(f"{second + '/' + first:<10}" + "".join(f"{mean[second][p] / mean[first][p]:>10.2f}x" for p in STEP_PARTS))
    return mean


def train_command(nproc: int, model_dir: Path, data: Path, run_dir: Path, steps: int, *overrides: str) -> list[str]:
    """The demo recipe's trainer on `nproc` ranks, timing only: no evaluation, no checkpoints,
    no progress bar; `overrides` (key.sub=value) last."""
    return [*torchrun_command(nproc), "-m", "megatron_tbrm.train", "--config", str(REPO / "recipes/tiny_cpu.yaml"),
            f"model.path={model_dir}", f"data.train_path={data}", f"run.dir={run_dir}", f"train.steps={steps}",
            "eval.every=0", "checkpoint.save_every=0", "run.progress=false", *overrides]


def part_a(model_dir: Path, nproc: int, rows: int, seq: int, reps: int, work: Path) -> dict:
    cmd = [*torchrun_command(nproc), __file__, "--worker", str(model_dir), str(rows), str(seq), str(reps)]
    out = run_logged(cmd, work / "part_a.log", "part A (update step)")
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def part_b(model_dir: Path, data: Path, nproc: int, steps: int, work: Path) -> dict:
    res = {}
    for name, over in (("tbrm_n1", ["loss.name=tbrm", "rollout.n=1"]),
                       ("grpo_n4", ["loss.name=grpo", "rollout.n=4"])):
        run_dir = work / name
        cmd = train_command(nproc, model_dir, data, run_dir, steps, "model.value_offset=false", "data.replay.per_step=0",
                            "train.prompts_per_step=32", "train.micro_batch_size=8", *over)
        run_logged(cmd, run_dir / "launcher.log", f"part B ({name})")
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "step_s" in r][1:]  # the first step warms up
        res[name] = {k: statistics.median(r[k] for r in rows) for k in STEP_PARTS}
    return res


def part_c(model_dir: Path, data: Path, nproc: int, steps: int, work: Path, ks=(0, 1, 2),
           busy_loops=("0.05",), binds=("auto",), repeats: int = 2, recipe_batch: bool = False) -> dict:
    """{(busy_loop, bind, k): [metrics of each repeat]}: every max_staleness k with every
    rollout.shm_busy_loop_s (null: vLLM's own 1 s busy loop) and every VLLM_CPU_OMP_THREADS_BIND
    of the engine (`binds`: "auto", vLLM's default, pins its worker to the last core; "nobind"
    leaves it to the kernel), `repeats` times in ABBA order (k = 0, 1, 2, 2, 1, 0, ...: a drift
    of the machine over the bench hits every k alike).

    `recipe_batch`: keep the recipe's prompts per step, micro-batch and value offset (the demo
    recipe); otherwise 32 prompts in micro-batches of 8, no value offset (the random model's
    old setting). Per-step times are means over the steady state (the end of step 1 to the
    end of the last step), and so are the parts: rollout times are heavy-tailed (a step now and then takes 3-10x the
    median), so medians of the parts would not add up to the mean step."""
    batch = [] if recipe_batch else ["train.prompts_per_step=32", "train.micro_batch_size=8", "model.value_offset=false"]
    order = []
    for rep in range(repeats):
        settings = [(b, bind, k) for k in ks for b in busy_loops for bind in binds]
        order += [(rep, *s) for s in (settings if rep % 2 == 0 else settings[::-1])]
    res: dict = {}
    for rep, busy, bind, k in order:
        run_dir = work / f"staleness_{k}_busy_{busy}_bind_{bind}_rep{rep}"
        # no replay: a replayed batch's size follows the success count (and the earlier runs had none)
        cmd = train_command(nproc, model_dir, data, run_dir, steps, *batch, f"train.max_staleness={k}",
                            f"rollout.shm_busy_loop_s={busy}", "data.replay.per_step=0")
        what = f"part C (max_staleness={k}, shm_busy_loop_s={busy}, bind {bind}, repeat {rep})"
        with CpuSampler(run_dir / "metrics.jsonl") as cpu:
            run_logged(cmd, run_dir / "launcher.log", what, env={"VLLM_CPU_OMP_THREADS_BIND": bind})
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "step_s" in r]
        steady = rows[1:]
        roll = [r["rollout_s"] for r in steady]
        res.setdefault((busy, bind, k), []).append({
            # wall clock from the end of step 1 to the end of the last: what a user waits for
            "per_step_s": (rows[-1]["wall_time"] - rows[0]["wall_time"]) / (len(rows) - 1),
            "step_s": statistics.mean(r["step_s"] for r in steady),
            "rollout_s": statistics.mean(roll), "rollout_median_s": statistics.median(roll),
            "update_sync_s": statistics.mean(r["ref_s"] + r["train_s"] + r["sync_s"] for r in steady),
            "staleness_mean": statistics.mean(r.get("staleness_mean", 0.0) for r in steady),
            "trainer_idle_s": statistics.mean(r.get("trainer_idle_s", 0.0) for r in steady),
            "cpu_busy": cpu.busy_fraction(), "cpu_s_by_process": cpu.cpu_s_by_process()})
        print(f"[part C] max_staleness={k} busy={busy} bind={bind} repeat {rep}: "
              f"{res[busy, bind, k][-1]['per_step_s']:.3f} s per step",
              flush=True)  # kept in the log if a later run fails
    return res


def print_part_c(c: dict, steps: int, nproc: int, what: str) -> None:
    def mean(runs, m):
        return statistics.mean(r[m] for r in runs)

    def each(xs):
        return ", ".join(f"{x:.2f}" for x in xs)

    print(f"C. TBRM n=1, {what}, {steps} steps, {nproc} trainer ranks, vLLM CPU server; per step: the mean "
          f"over the steady state (from the end of step 1); busy = rollout.shm_busy_loop_s (null: vLLM's 1 s); "
          f"bind = the engine's VLLM_CPU_OMP_THREADS_BIND; {len(next(iter(c.values())))} runs per setting in ABBA order")
    for (busy, bind, k), runs in c.items():
        parts = ("step_s", "rollout_s", "rollout_median_s", "update_sync_s", "staleness_mean", "trainer_idle_s", "cpu_busy")
        print(f"   busy={busy:>4} bind={bind} max_staleness={k}: per_step_s {mean(runs, 'per_step_s'):.2f} "
              f"(runs: {each(r['per_step_s'] for r in runs)}); " + ", ".join(f"{m}={mean(runs, m):.2f}" for m in parts))
        print("      cpu-s by process (whole run, first repeat): "
              + ", ".join(f"{n} {s:.0f}" for n, s in list(runs[0]["cpu_s_by_process"].items())[:6]))
    for busy, bind in dict.fromkeys((b, bind) for b, bind, _ in c):
        k0 = c[busy, bind, 0]
        r, u, p0 = mean(k0, "rollout_s"), mean(k0, "update_sync_s"), mean(k0, "per_step_s")
        ratios = ", ".join(
            f"k={k} / k=0 = {mean(c[busy, bind, k], 'per_step_s') / p0:.2f}x "
            f"(per repeat: {each(x['per_step_s'] / y['per_step_s'] for x, y in zip(c[busy, bind, k], k0))})"
            for b, bd, k in c if (b, bd) == (busy, bind) and k)
        # perfect overlap hides the shorter of rollout and update+sync, nothing else of the step
        print(f"   busy={busy} bind={bind}: {ratios}; bound from k=0's parts (separate devices): (step - min(rollout, update+sync)) "
              f"/ step = {(p0 - min(r, u)) / p0:.2f}x (rest of the step, neither part: {p0 - r - u:.2f} s)")
    print("   goal (issue 18): k=1 <= 0.70x of k=0")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_update(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--skip-full", action="store_true", help="only part A")
    ap.add_argument("--overlap", action="store_true", help="only part C (max_staleness 0 / 1 / 2)")
    ap.add_argument("--warm", type=Path, default=None,
                    help="part C on the demo recipe: a demo folder (its sft_model and data/train.jsonl, e.g. runs/demo)")
    ap.add_argument("--busy", nargs="+", default=["0.05"],
                    help="part C's rollout.shm_busy_loop_s values (null: vLLM's 1 s busy loop)")
    ap.add_argument("--cpu-bind", nargs="+", default=["auto"], choices=["auto", "nobind"],
                    help="part C's VLLM_CPU_OMP_THREADS_BIND for the engine (auto: vLLM's default, its worker "
                         "pinned to the last core; nobind: not pinned)")
    ap.add_argument("--repeats", type=int, default=2, help="part C: runs per setting, in ABBA order")
    ap.add_argument("--arch", default="tiny", choices=["tiny", *ARCHS], help="part A's model")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-step",
                    help="model, data, runs and logs (kept: a failed run can be read)")
    a = ap.parse_args()
    if not a.overlap and (a.warm is not None or a.busy != ["0.05"] or a.cpu_bind != ["auto"] or a.repeats != 2):
        ap.error("--warm, --busy, --cpu-bind and --repeats are part C's: give them with --overlap")
    if a.overlap:
        if a.repeats < 1 or a.repeats % 2:
            ap.error(f"--repeats {a.repeats}: give an even number >= 2 (ABBA order: each k's mean position equal)")
        if a.steps < 3:
            ap.error(f"--steps {a.steps}: part C needs at least 3 (the steady state starts after step 1)")
        for b in a.busy:
            try:
                ok = b == "null" or float(b) >= 0
            except ValueError:
                ok = False
            if not ok:
                ap.error(f"--busy {b}: give null or a number of seconds >= 0")
        a.busy = list(dict.fromkeys(a.busy))
        a.cpu_bind = list(dict.fromkeys(a.cpu_bind))
    a.work = a.work.resolve()
    if a.warm is not None:
        a.warm = a.warm.resolve()
        for p in (a.warm / "sft_model" / "config.json", a.warm / "data" / "train.jsonl"):
            if not p.exists():
                ap.error(f"--warm {a.warm}: {p} is missing (a demo folder: run `make demo` first)")
        if a.warm == a.work or a.work in a.warm.parents:
            ap.error(f"--work {a.work} holds --warm {a.warm}: the bench deletes its work folder first")

    from megatron_tbrm.demo.arithmetic import make_arithmetic_splits
    from megatron_tbrm.demo.tiny import TinyModelSpec, write_tiny_model

    work = a.work
    if work.exists():
        shutil.rmtree(work)  # a previous bench's runs: metrics.jsonl would be appended to
    if a.warm:  # part C on the demo's own model and prompts
        model, train = a.warm / "sft_model", a.warm / "data" / "train.jsonl"
    else:
        model = write_tiny_model(work / "model", TinyModelSpec())
        train, _ = make_arithmetic_splits(work / "data", 512, 16)
    if a.overlap:
        what = (f"the demo recipe from the warm start in {a.warm} (its prompts per step)" if a.warm
                else "tiny random model, 32 prompts per step")
        c = part_c(model, train, a.nproc, a.steps, work, busy_loops=tuple(a.busy), binds=tuple(a.cpu_bind), repeats=a.repeats,
                   recipe_batch=a.warm is not None)
        print_part_c(c, a.steps, a.nproc, what)
        return
    a_res = part_a(model if a.arch == "tiny" else a.arch, a.nproc, a.rows, a.seq, a.reps, work)
    where = a_res.get("device", "CPU")
    print(f"A. update step, {a.arch} model, {a.rows} rows x {a.seq} tokens per DP rank, {a.nproc} ranks, {where}")
    print(f"   cross-entropy step: {a_res['ce'] * 1e3:8.1f} ms")
    print(f"   TBRM step:          {a_res['tbrm'] * 1e3:8.1f} ms")
    print(f"   TBRM / CE:          {a_res['tbrm'] / a_res['ce']:8.3f}   (goal < 1.10)")
    if "peak_gib" in a_res:
        print(f"   peak GPU memory:    {a_res['peak_gib']:8.2f} GiB")
    if a.skip_full:
        return
    b = part_b(model, train, a.nproc, a.steps, work)
    print(f"B. full step, same prompts (32 per step), {a.nproc} trainer ranks, vLLM CPU server")
    for k, v in b.items():
        print(f"   {k}: " + ", ".join(f"{m}={s:.2f}s" for m, s in v.items()))
    print(f"   GRPO n=4 / TBRM n=1 step time: {b['grpo_n4']['step_s'] / b['tbrm_n1']['step_s']:.2f}x   (paper, 7B: 3.1x)")


if __name__ == "__main__":
    main()
