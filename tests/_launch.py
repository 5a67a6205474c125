"""Helpers of the reliability tests (test_reliability.py, test_reliability_resume.py): a tagged
torchrun launch of the trainer, the scan for its leftover processes, the module's shared vLLM
server and the trainer arguments of the tiny recipe.

Every process a launch starts carries a tag in its environment (inherited by torchrun workers,
reward workers and the vLLM server's engine processes); a psutil scan for it finds what a run
left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from megatron_tbrm.demo.arithmetic import make_arithmetic_splits
from megatron_tbrm.ports import torchrun_command
from megatron_tbrm.rollout.server import VLLMServer

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
        cmd = [*torchrun_command(2), *entry, "--config", str(RECIPE), *args] + (["--resume"] if resume else [])
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
            "data.replay.per_step=0",  # the demo's replay off: these runs test other things
            f"rollout.startup_timeout_s={SLOW}", *overrides]


def own_server(shared: SharedServer) -> None:
    """A run that starts its own vLLM server: the shared one must not be running as well."""
    shared.stop()
