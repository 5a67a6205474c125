"""Reliability (issue 9): each fault provoked on the real trainer under torchrun (2 ranks, the
tiny model, real vLLM CPU server, megatron-core over gloo); docs/reliability.md has the table.

- config: a bad key / a value that is not YAML exits 2 with the key named, before torchrun work;
- checkpoints: a crash while saving (a random SIGKILL of a saving torchrun job, and the on-disk
  state of a crash in the middle of re-saving an iteration) never loses the previous checkpoint;
- vLLM: an owned server killed mid-run is restarted, the batch redone, the run finishes; with
  rollout.max_restarts=0 the run stops with an error naming the server and carrying its log;
- SIGKILL of the whole trainer mid-run: --resume reproduces an uninterrupted run's metrics;
- Ctrl-C (SIGINT to the launcher): the run exits;
- numerics: a NaN loss skips the update and the run goes on; K in a row stop it, with the last
  good state saved;
- after every exit (success, error, Ctrl-C, SIGKILL) no process of the run is left: every process
  a launch starts carries a tag in its environment (inherited by torchrun workers, reward workers
  and the vLLM server's engine processes), and a psutil scan finds none within 30 s.

At most one vLLM server runs at a time: runs that own their server come first; the shared server
(for runs that attach by rollout.server_url) starts on first use.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from megatron_tbrm.demo.arithmetic import make_arithmetic_splits
from megatron_tbrm.checkpoint import complete_checkpoints
from megatron_tbrm.rollout.server import VLLMServer

from megatron_tbrm.ports import free_port

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny_cpu.yaml"
WORKERS = Path(__file__).resolve().parent / "workers"
TAG = "TBRM_RELIABILITY_TAG"
# The server the trainer starts from the recipe (rollout.* of tiny_cpu.yaml, parallel.seed), so a
# run on its own server and a run attached to the shared one sample the same tokens.
SERVER_KW = dict(dtype="float32", max_model_len=128, kv_cache_bytes=268435456, max_num_seqs=64, seed=1234)
SLOW = 900  # s: generous limits for a loaded 2-core machine; an idle one needs a tenth


# ----------------------------------------------------------------------------- helpers


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries this launch's tag."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE and p.environ().get(TAG) == tag:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process below it at once (torchrun puts each rank in a
    session of its own, so a killpg of the launcher's group would not reach them)."""
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def describe(procs: list[psutil.Process]) -> str:
    lines = []
    for p in procs:
        try:
            lines.append(f"{p.pid}: {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            pass
    return "\n".join(lines)


class Launch:
    """One torchrun trainer job in its own session, output in RUN/launcher.log."""

    def __init__(self, run_dir: Path, args: list[str], env: dict | None = None, resume: bool = False,
                 entry: tuple[str, ...] = ("-m", "megatron_tbrm.train")):
        """`entry`: what torchrun runs (a test worker script with its own arguments for fault injection)."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tag = uuid.uuid4().hex
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
               *entry, "--config", str(RECIPE), *args] + (["--resume"] if resume else [])
        full_env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
        full_env[TAG] = self.tag
        self.log_path = self.run_dir / f"launcher-{self.tag[:8]}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.t0 = time.monotonic()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip().endswith("}")]

    def wait_step(self, step: int, timeout: float = SLOW) -> None:
        deadline = time.monotonic() + timeout
        while not any(r.get("step") == step for r in self.metrics()):
            if self.proc.poll() is not None:
                raise AssertionError(f"trainer exited ({self.proc.returncode}) before step {step}:\n{self.output()[-6000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no step {step} after {timeout} s:\n{self.output()[-6000:]}")
            time.sleep(0.2)

    def wait(self, timeout: float = SLOW) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"trainer still running after {timeout} s:\n{self.output()[-6000:]}")

    def check_ok(self) -> list[dict]:
        rc = self.wait()
        assert rc == 0, f"trainer failed ({rc}):\n{self.output()[-8000:]}"
        return self.metrics()

    def wait_text(self, text: str, timeout: float = SLOW) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the trainer's output:\n{self.output()[-6000:]}")
            time.sleep(0.2)

    def vllm_server(self, other_than: int | None = None, timeout: float = 60) -> psutil.Process:
        """The API-server process of the vLLM server this run owns (a new one: `other_than`)."""
        deadline = time.monotonic() + timeout
        while True:
            procs = [p for p in tagged(self.tag) if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())
                     and p.pid != other_than]
            if len(procs) == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(procs) == 1, f"expected one vLLM API server of this run, found:\n{describe(procs)}"
        return procs[0]

    def leftovers(self, within: float = 30.0) -> list[psutil.Process]:
        """The run's processes still alive `within` s after now (empty: nothing orphaned)."""
        deadline = time.monotonic() + within
        while (left := tagged(self.tag)) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left

    def kill(self) -> None:
        """Test cleanup: SIGKILL whatever this launch left, process by process."""
        for p in tagged(self.tag):
            try:
                p.kill()
            except psutil.Error:
                pass
        self._log.close()


@pytest.fixture
def launches():
    started: list[Launch] = []
    yield started
    for run in started:
        run.kill()


class SharedServer:
    """The module's one vLLM server, started on first use of `.url`."""

    def __init__(self, model: Path, work_dir: Path):
        self.srv = VLLMServer(model, work_dir=work_dir, **SERVER_KW)
        self.started = False

    @property
    def url(self) -> str:
        if not self.started:
            self.srv.start()
            self.started = True
            self.srv.wait_healthy(SLOW)
        return self.srv.url

    def stop(self) -> None:
        if self.started:
            self.srv.stop()
            self.started = False


@pytest.fixture(scope="module")
def shared(tiny_model_dir, tmp_path_factory):
    s = SharedServer(tiny_model_dir, tmp_path_factory.mktemp("vllm-shared"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_arithmetic_splits(tmp_path_factory.mktemp("data"), 256, 16, seed=0)


def trainer_args(run_dir: Path, model: Path, data, *overrides: str) -> list[str]:
    train_path, test_path = data
    return [f"model.path={model}", f"data.train_path={train_path}", f"eval.path={test_path}", f"run.dir={run_dir}",
            "rollout.max_tokens=16", "train.prompts_per_step=8", "train.micro_batch_size=2", "eval.every=0",
            "run.progress=false", "run.tensorboard=false", "model.value_offset=false", "loss.beta=0.5",
            f"rollout.startup_timeout_s={SLOW}", *overrides]


def own_server(shared: SharedServer) -> None:
    """A run that starts its own vLLM server: the shared one must not be running as well."""
    shared.stop()


# ----------------------------------------------------------------------------- 1. config


@pytest.mark.parametrize("override, named", [
    ("bad.key=1", "unknown config key 'bad'"),
    ("parallel.tp=[1", "config key 'parallel.tp': got '[1', expected an integer"),  # not YAML: was a traceback
])
def test_config_error_exits_2_naming_the_key(override, named, tiny_model_dir, data, tmp_path):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "megatron_tbrm.train", "--config", str(RECIPE),
                        *trainer_args(tmp_path / "run", tiny_model_dir, data), override],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert named in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()  # nothing started
    assert time.monotonic() - t0 < 60


# ----------------------------------------------------------------------------- 6b. atomic checkpoints


def _ckpt_worker(root: Path, mode: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(WORKERS / "reliability_ckpt.py"), str(root), mode]
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{WORKERS}", OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, text=True, **popen)


def _load(root: Path) -> dict:
    p = _ckpt_worker(root, "load", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = p.communicate(timeout=SLOW)
    assert p.returncode == 0, out[-6000:]
    return json.loads([x for x in out.splitlines() if x.startswith('{"iteration"')][-1])


@pytest.mark.parametrize("mode", ["save-loop", "resave-loop", "keep-loop"])
def test_sigkill_while_saving_keeps_a_complete_checkpoint(tmp_path, mode):
    """A torchrun job saving ~100 MB checkpoints in a loop is SIGKILLed at a random moment; the
    root's latest then loads one complete checkpoint (every parameter holds the one value that
    save wrote), never a mix, whatever the kill interrupted. resave-loop writes the same
    iteration over and over (what a stop after a periodic save of the same step does);
    keep-loop saves with keep_last=2 (issue 14 item 4): the deletions of old checkpoints never
    cost the last complete one, and the disk holds at most 2 complete + 1 in flight."""
    root = tmp_path / "ckpt"
    out_path = tmp_path / "saver.log"
    with open(out_path, "w") as out:
        p = _ckpt_worker(root, mode, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + SLOW
            # keep-loop: the pruning starts with the third save; kill only after it.
            while out_path.read_text().count('"saved"') < (3 if mode == "keep-loop" else 1):
                assert p.poll() is None and time.monotonic() < deadline, out_path.read_text()[-4000:]
                time.sleep(0.1)
            time.sleep(random.uniform(0.5, 4.0))
            kill_tree(p.pid)
        finally:
            p.wait(60)
    saved = [json.loads(x) for x in out_path.read_text().splitlines() if x.startswith('{"saved"')]
    got = _load(root)
    assert got["min"] == got["max"] == got["extra"]["value"], got  # one complete checkpoint
    assert got["iteration"] in {s["saved"] for s in saved} | {saved[-1]["saved"] + 1}
    assert got["extra"]["value"] >= saved[-1]["value"]  # nothing that finished was lost
    if mode == "keep-loop":
        one = _du(Path(got["path"]))
        assert len(saved) >= 3
        # 2 kept + at most one more: a save in flight, a delete in flight, or (killed between the
        # new one's rename and the pruning) a third complete one.
        assert len(complete_checkpoints(root)) <= 3
        assert _du(root) < 3.2 * one, (_du(root), one)


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_prune_keeps_the_newest_and_what_latest_names(tmp_path):
    """keep_last on folders made by hand: the newest K complete checkpoints stay, `latest`'s is
    never deleted (even when it is not among the newest, e.g. after a re-save of an older
    iteration), a half-written iter_N.tmp is not counted, and a crash's iter_N.deleting goes."""
    from megatron_tbrm.checkpoint import latest_checkpoint, prune_checkpoints

    root = tmp_path / "ckpt"
    for n in (1, 2, 3, 4):
        d = root / f"iter_{n:07d}"
        d.mkdir(parents=True)
        (d / "weights").write_bytes(b"x" * 1000)
    (root / "iter_0000005.tmp").mkdir()
    (root / "iter_0000000.deleting").mkdir()
    (root / "latest").write_text("iter_0000004")
    gone = prune_checkpoints(root, 2)
    assert [p.name for p in gone] == ["iter_0000001", "iter_0000002"]
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000003", "iter_0000004", "iter_0000005.tmp", "latest"]
    assert _du(root) == 2000 + len("iter_0000004")  # two checkpoints and `latest`
    (root / "latest").write_text("iter_0000003")
    assert prune_checkpoints(root, 1) == [] and latest_checkpoint(root).name == "iter_0000003"
    with pytest.raises(ValueError, match="keep_last=0"):
        prune_checkpoints(root, 0)


def test_crash_states_on_disk_load_the_previous_checkpoint(tmp_path):
    """On-disk states a crash while saving can leave, made by hand from a complete checkpoint:
    (a) a garbage iter_N.tmp (truncated files) next to it; (b) `latest` naming a checkpoint that
    is gone (a re-save of the same iteration killed after removing the old copy). load_checkpoint
    and --resume must take the previous complete checkpoint."""
    from megatron_tbrm.checkpoint import latest_checkpoint

    root = tmp_path / "ckpt"
    p = _ckpt_worker(root, "save-loop", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:  # two complete checkpoints, then stop it
        for line in p.stdout:
            if line.startswith('{"saved": 2'):
                break
        kill_tree(p.pid)
    finally:
        p.wait(60)
    good = latest_checkpoint(root)
    assert good is not None
    n = int(good.name.split("_")[1])
    # (a) a half-written next save
    tmp = root / f"iter_{n + 1:07d}.tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / "metadata.json").write_text('{"sharded_backend": "torch_di')  # truncated
    (tmp / "__0_0.distcp").write_bytes(os.urandom(4096))
    got = _load(root)
    assert got["iteration"] == n and got["min"] == got["max"] == got["extra"]["value"]
    # (b) `latest` names iter_N, which a re-save removed before its .tmp was renamed in
    import shutil

    shutil.move(str(good), str(tmp_path / "gone"))
    assert (root / "latest").read_text().strip() == good.name
    prev = latest_checkpoint(root)
    assert prev is not None and prev.name == f"iter_{n - 1:07d}", prev
    got = _load(root)
    assert got["iteration"] == n - 1 and got["min"] == got["max"] == got["extra"]["value"]


# ----------------------------------------------------------------------------- 4, 7: vLLM dies, Ctrl-C


def test_vllm_dies_with_no_restarts_left_stops_with_its_log(tmp_path, tiny_model_dir, data, shared, launches):
    own_server(shared)
    run = Launch(tmp_path / "run", trainer_args(tmp_path / "run", tiny_model_dir, data, "parallel.tp=1",
                                                 "train.steps=4", "checkpoint.save_every=0", "rollout.max_restarts=0"))
    launches.append(run)
    run.wait_step(1)
    srv = run.vllm_server()
    os.killpg(os.getpgid(srv.pid), signal.SIGKILL)
    rc = run.wait()
    out = run.output()
    assert rc != 0
    # The kill lands in a rollout or in a weight push (then the next rollout finds the server dead).
    assert re.search(r"rollout failed at step \d \(1 failure\(s\) in a row, rollout.max_restarts=0\)", out), out[-6000:]
    assert "vLLM server at http://" in out and f"--- last lines of {run.run_dir / 'vllm' / 'server.log'} ---" in out
    assert not (left := run.leftovers()), f"orphans after an error exit:\n{describe(left)}"


def test_deterministic_server_failure_stops_after_one_restart_with_the_root_cause(tmp_path, tiny_model_dir, data,
                                                                                   shared, launches):
    """Issue 13 item 7: a server failure that the redone batch meets again (same prompts, same
    seeds) used to cost rollout.max_restarts identical restarts, and the error showed vLLM's
    "EngineCore encountered an issue" rather than the cause. Provoked for real: chunked prefill
    forced back on with a 64-token step budget, so 8 seeded prompts get split prefills and the
    CPU engine dies (the failure the server's CPU defaults avoid)."""
    own_server(shared)
    run = Launch(tmp_path / "run", trainer_args(
        tmp_path / "run", tiny_model_dir, data, "parallel.tp=1", "train.steps=2", "checkpoint.save_every=0",
        "rollout.max_restarts=3", "rollout.extra_args=[--enable-chunked-prefill, --max-num-batched-tokens, '64']"))
    launches.append(run)
    rc = run.wait()
    out = run.output()
    assert rc != 0 and run.metrics() == []
    assert out.count("restarting it (") == 1, out[-6000:]  # one restart, not three
    assert re.search(r"rollout failed at step 0 again after a restart, with the same error: "
                     r"RuntimeError: CPU Generator does not use offset", out), out[-6000:]
    assert not (left := run.leftovers()), f"orphans after an error exit:\n{describe(left)}"


def test_ctrl_c_stops_everything(tmp_path, tiny_model_dir, data, shared, launches):
    own_server(shared)
    run = Launch(tmp_path / "run", trainer_args(tmp_path / "run", tiny_model_dir, data, "parallel.tp=2",
                                                 "train.steps=20", "checkpoint.save_every=0"))
    launches.append(run)
    run.wait_step(1)
    assert run.vllm_server().is_running()
    os.kill(run.proc.pid, signal.SIGINT)  # Ctrl-C reaches the launcher
    rc = run.wait(120)
    assert rc != 0 and len(run.metrics()) < 20
    assert not (left := run.leftovers()), f"orphans after Ctrl-C:\n{describe(left)}"


# ----------------------------------------------------------------------------- 4, 6a, 7: restart, SIGKILL, resume

COMPARE = ("reward_mean", "response_length_mean", "loss", "delta_mean", "v_s1_mean", "log_ratio_sum_mean", "grad_norm")


def test_vllm_restart_then_sigkill_then_resume_reproduces_uninterrupted(tmp_path, tiny_model_dir, data, shared,
                                                                         launches):
    """One run on its own server: its vLLM server is SIGKILLed after step 1 (restarted with the
    current weights, the batch redone), then the whole trainer is SIGKILLed after step 2. No
    process survives; --resume finishes the run, and every step matches an uninterrupted run."""
    own_server(shared)
    args = ("parallel.tp=2", "train.steps=5", "checkpoint.save_every=1")
    crash_dir = tmp_path / "crash"
    run = Launch(crash_dir, trainer_args(crash_dir, tiny_model_dir, data, *args))
    launches.append(run)
    run.wait_step(1)
    first = run.vllm_server()
    os.killpg(os.getpgid(first.pid), signal.SIGKILL)
    # The kill lands in a rollout or in a weight push (then the next rollout finds the server dead).
    run.wait_text("restarting it (1/3) and redoing the batch")
    run.wait_step(2)
    time.sleep(random.uniform(0.0, 0.5))  # into step 3 (or the step-2 save)
    os.killpg(run.proc.pid, signal.SIGKILL)
    assert run.wait(60) == -signal.SIGKILL
    # torchrun runs each rank in its own session and the vLLM server has its own too, so the killpg
    # reaches only the launcher: the ranks die with it (PR_SET_PDEATHSIG, parallel.die_with_launcher),
    # the server with rank 0 (its own PR_SET_PDEATHSIG).
    # Their multiprocessing helpers (mcore's checkpoint-writer Manager, resource trackers) go too,
    # SIGKILLed by the rank's group reaper (parallel._start_group_reaper), which then exits.
    assert not (left := run.leftovers()), f"orphans after SIGKILL:\n{describe(left)}"
    crashed = run.metrics()
    assert [r["step"] for r in crashed][:2] == [1, 2] and all(r["update_ok"] == 1.0 for r in crashed)
    assert len(crashed) < 5, "the run finished before the SIGKILL"
    # the restarted server wrote its start-up to the same log
    assert (crash_dir / "vllm" / "server.log").read_text(errors="replace").count("Starting vLLM") >= 2

    resumed = Launch(crash_dir, trainer_args(crash_dir, tiny_model_dir, data, *args,
                                             f"rollout.server_url={shared.url}"), resume=True)
    launches.append(resumed)
    rows = resumed.check_ok()
    assert "resumed from" in resumed.output()
    ref = Launch(tmp_path / "ref", trainer_args(tmp_path / "ref", tiny_model_dir, data, *args,
                                                f"rollout.server_url={shared.url}"))
    launches.append(ref)
    expected = {r["step"]: r for r in ref.check_ok()}
    got = {r["step"]: r for r in rows}  # the resumed steps overwrite the crashed run's rows
    assert sorted(got) == [1, 2, 3, 4, 5] and sorted(expected) == [1, 2, 3, 4, 5]
    for step in (1, 2, 3, 4, 5):
        for k in COMPARE:
            # (the first update after --resume must equal the uninterrupted one: metrics of the
            # step after it, e.g. log_ratio_sum_mean, show any optimizer-state difference)
            assert got[step][k] == pytest.approx(expected[step][k], rel=1e-5, abs=1e-5), (step, k)
    assert (crash_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000005"
    assert not (left := resumed.leftovers() + ref.leftovers()), describe(left)


def _trained_prompts(run_dir: Path) -> dict[int, list]:
    """Per step (from RUN/rollouts/step_N.jsonl): the prompt token ids of its samples, in order."""
    out = {}
    for f in (run_dir / "rollouts").glob("step_*.jsonl"):
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        out[int(f.stem.split("_")[1])] = [r["prompt_token_ids"] for r in rows]
    return out


def test_overlapped_rollouts_sigkill_then_resume_keep_the_data_position(tmp_path, tiny_model_dir, data, shared,
                                                                      launches):
    """train.max_staleness=1: while step t updates, rank 0's thread already generates step t+1's
    batch (its prompts drawn from the sampler). SIGKILL after step 2, --resume: the checkpoint
    recorded only trained batches, so the batches in flight are regenerated: every step 1..5 is
    trained once, on the prompts an uninterrupted run trains on, and the last checkpoint holds
    the same sampler position and step count as the uninterrupted run's."""
    args = ("train.steps=5", "checkpoint.save_every=1", "train.max_staleness=1", "rollout.save=true",
            f"rollout.server_url={shared.url}")
    crash_dir = tmp_path / "crash"
    run = Launch(crash_dir, trainer_args(crash_dir, tiny_model_dir, data, *args))
    launches.append(run)
    run.wait_step(2)
    time.sleep(random.uniform(0.0, 0.5))  # into step 3 (or the step-2 save), the thread ahead
    os.killpg(run.proc.pid, signal.SIGKILL)
    assert run.wait(60) == -signal.SIGKILL
    assert len(run.metrics()) < 5, "the run finished before the SIGKILL"
    resumed = Launch(crash_dir, trainer_args(crash_dir, tiny_model_dir, data, *args), resume=True)
    launches.append(resumed)
    rows = resumed.check_ok()
    assert "resumed from" in resumed.output()
    ref_dir = tmp_path / "ref"
    ref = Launch(ref_dir, trainer_args(ref_dir, tiny_model_dir, data, *args))
    launches.append(ref)
    ref.check_ok()
    assert sorted({r["step"] for r in rows}) == [1, 2, 3, 4, 5]
    assert _trained_prompts(crash_dir) == _trained_prompts(ref_dir)  # none lost, none trained twice
    assert sorted(_trained_prompts(ref_dir)) == [1, 2, 3, 4, 5]  # the thread made no batch past train.steps
    # staleness read from the uninterrupted run's saved rollouts, not assumed: the batch trained
    # at step t was generated by version t-2 (one update old) from step 2 on
    ref_rows = {r["step"]: r for r in ref.metrics()}
    for t in range(1, 6):
        saved = [json.loads(x) for x in (ref_dir / "rollouts" / f"step_{t}.jsonl").read_text().splitlines()]
        assert {r["policy_version"] for r in saved} == {max(t - 2, 0)}, t
        assert ref_rows[t]["staleness_max"] == (t - 1) - max(t - 2, 0)
        assert "trainer_idle_s" in ref_rows[t] and "rollout_idle_s" in ref_rows[t]
    last = "iter_0000005"
    assert (crash_dir / "checkpoints" / "latest").read_text().strip() == last
    got, want = (json.loads((d / "checkpoints" / last / "extra.json").read_text()) for d in (crash_dir, ref_dir))
    assert got["sampler"] == want["sampler"] and got["step"] == want["step"] == 5
    assert not (left := resumed.leftovers() + ref.leftovers()), describe(left)


# ----------------------------------------------------------------------------- 5. numerics


def _weights(ckpt: Path, tmp: Path) -> dict:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    sd = torch.load(out, weights_only=False)
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer")}


def test_nan_loss_skips_update_then_stops_with_last_good_state(tmp_path, tiny_model_dir, data, shared, launches):
    """NaN losses injected at steps 2, 4, 5 (train.max_bad_steps=2): step 2's update is skipped
    and the run goes on (step 3 updates); 4 and 5 in a row stop it, non-zero, with a checkpoint
    whose weights are those after step 3 (the last good update)."""
    run_dir = tmp_path / "run"
    run = Launch(run_dir, trainer_args(run_dir, tiny_model_dir, data, "parallel.tp=1", "train.steps=8",
                                       "train.max_bad_steps=2", "checkpoint.save_every=1",
                                       f"rollout.server_url={shared.url}"),
                 entry=(str(REPO / "tests" / "workers" / "train_faults.py"), "--nan-steps", "2,4,5"))
    launches.append(run)
    rc = run.wait()
    out = run.output()
    assert rc != 0
    assert "2 non-finite losses in a row (step 4)" in out, out[-6000:]
    rows = run.metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["update_ok"] for r in rows] == [1.0, 0.0, 1.0, 0.0]
    assert rows[1]["loss"] is None and rows[1]["bad_steps"] == 1.0 and rows[2]["bad_steps"] == 0.0
    import torch

    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000004"
    w = {i: _weights(ckpts / f"iter_{i:07d}", tmp_path) for i in (1, 2, 3, 4)}
    assert w[1] and w[1].keys() == w[4].keys()

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(w[1], w[2])  # step 2 skipped
    assert not same(w[2], w[3])  # the run went on: step 3 updated
    assert same(w[3], w[4])  # the stop saved the state after the last good update
    assert not (left := run.leftovers()), describe(left)
