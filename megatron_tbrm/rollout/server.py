"""The vLLM OpenAI-compatible server process used for rollouts.

`VLLMServer` starts one `vllm.entrypoints.openai.api_server` process for a model folder and
owns it: its own process group (so stop() also reaches the engine-core and worker processes
vLLM spawns), a log file, a health wait that notices a dead process, and cleanup on atexit,
on SIGTERM/SIGHUP of the owner and - through PR_SET_PDEATHSIG - on SIGKILL of the owner.
`VLLMServer.attach(url)` wraps a server someone else runs (e.g. on another node).

The dev endpoints (/collective_rpc, /pause, /resume, /reset_prefix_cache) are enabled with
VLLM_SERVER_DEV_MODE=1 and wrapped here, since weight sync drives them.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections import deque
from pathlib import Path
from typing import Any

import psutil
import requests

from megatron_tbrm.ports import free_port, port_in_use
from megatron_tbrm.rollout.server_args import cpu_scheduler_args, cuda_available, extra_cli_args
from megatron_tbrm.rollout.process import die_with_parent, group_alive, group_members, signal_group
from megatron_tbrm.rollout.vllm_cpu_patches import ENV_BUSY_LOOP_S, PLUGIN_NAME, busy_loop_env, plugin_installed

WORKER_EXTENSION = "megatron_tbrm.rollout.worker_extension.WeightReceiver"
_REPO_ROOT = str(Path(__file__).resolve().parents[2])  # folder holding megatron_tbrm/
PORT_RETRIES = 3  # new ports tried per start when the picked one was taken before vLLM bound it


# A traceback's last line, "RuntimeError: ...", bare or as vLLM logs it at ERROR level
# ("(Worker pid=7) ERROR 11-29 11:44:46 [multiproc_executor.py:1063] RuntimeError: ...").
_EXCEPTION_LINE = re.compile(r"^(?:\(\w+ pid=\d+\) )?(?:ERROR \S+ \S+ \[[^\]]*\] )?"
                             r"([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")
_WRAPPER_ERRORS = ("EngineDeadError", "EngineCore encountered an issue", "EngineGenerateError")


def first_exception(log_text: str) -> str | None:
    """The first "SomeError: message" line of a vLLM log, skipping vLLM's wrappers that only
    say the engine died (what follows the first error is mostly its consequences: every
    request in flight logs an EngineDeadError); None if there is none."""
    for line in log_text.splitlines():
        m = _EXCEPTION_LINE.search(line)
        if m and not any(w in line for w in _WRAPPER_ERRORS):
            return f"{m.group(1)}: {m.group(2).strip()}"
    return None


class RolloutServerError(RuntimeError):
    """The rollout server failed: did not start, died, or answered with an error. `server`:
    the VLLMServer that failed, when known (which engine to restart)."""

    def __init__(self, message: str, server: "VLLMServer | None" = None):
        super().__init__(message)
        self.server = server


class PortTaken(RolloutServerError):
    """The server died binding the port picked for it, which another process took in between.
    Raised by wait_healthy() on a thread other than the one that started the server; the
    starter calls start_on_new_port() (rollout/engines.py start_all does)."""


# Servers this process owns, stopped on SIGTERM/SIGHUP and at exit.
_LIVE: "weakref.WeakSet[VLLMServer]" = weakref.WeakSet()
_handlers_installed = False


def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


def _install_signal_handlers() -> None:
    """SIGTERM/SIGHUP kill Python without running atexit: stop our servers first, then hand
    the signal to whatever handled it before. SIGINT is left alone: it raises
    KeyboardInterrupt, and interpreter exit runs atexit (an interrupted notebook cell must
    not kill the server)."""
    global _handlers_installed
    if _handlers_installed or threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(signum)

        def handler(sig, frame, previous=previous):
            _stop_all()
            if callable(previous):
                previous(sig, frame)
            elif previous != signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
                os.kill(os.getpid(), sig)

        signal.signal(signum, handler)
    atexit.register(_stop_all)
    _handlers_installed = True


class VLLMServer:
    """A vLLM OpenAI-compatible server for `model` (an HF folder), started by start().

    Use as a context manager, or call start()/wait_healthy()/stop(). port=0/None picks a
    free port, picked again (at most PORT_RETRIES times) if another process takes it before
    vLLM binds it; an explicit port never changes. `kv_cache_bytes` maps to
    --kv-cache-memory-bytes (needed on CPU, where there is no GPU memory to size the cache
    from). `extra_args` go to the vLLM CLI verbatim (list) or as {"flag": value} (dict). `shm_busy_loop_s` (CPU only; None: vLLM's 1 s) caps
    how long vLLM's message-queue readers spin after each read (rollout/vllm_cpu_patches.py);
    it needs this package installed (pip install), which registers the vLLM plugin.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        kv_cache_bytes: int | None = None,
        max_num_seqs: int | None = None,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        served_model_name: str | None = None,
        enforce_eager: bool | None = None,
        enable_sleep_mode: bool = False,
        extra_args: list[str] | dict[str, Any] | None = None,
        work_dir: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        stop_grace_s: float = 10.0,
        shm_busy_loop_s: float | None = None,
    ):
        self.model = str(model)
        self.host = host
        self.port = port or free_port(host)
        # A port picked here is bound by vLLM seconds later; if it was taken meanwhile, the
        # server is started again on a newly picked one, at most PORT_RETRIES times per start.
        self._port_picked = not port
        self._port_retries_left = PORT_RETRIES if self._port_picked else 0
        self._start_thread: int | None = None
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.kv_cache_bytes = kv_cache_bytes
        self.max_num_seqs = max_num_seqs
        self.tensor_parallel_size = tensor_parallel_size
        self.seed = seed
        self.model_name = served_model_name or self.model
        self.enforce_eager = enforce_eager
        self.enable_sleep_mode = enable_sleep_mode  # GPUs only: vLLM refuses the flag on CPU
        self.extra_args = extra_args
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="vllm-server-"))
        self.log_path = self.work_dir / "server.log"
        self.env = env or {}
        self.stop_grace_s = stop_grace_s
        self.shm_busy_loop_s = shm_busy_loop_s
        self.proc: subprocess.Popen | None = None
        self._owned = True
        self._log_file = None

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def attach(cls, url: str, model_name: str | None = None, timeout: float = 10.0) -> "VLLMServer":
        """Use a server already running at `url` (started elsewhere); stop() leaves it alone."""
        self = cls.__new__(cls)
        url = url.rstrip("/")
        host_port = url.split("://", 1)[-1].split("/", 1)[0]
        self.host, _, port = host_port.rpartition(":")
        self.port = int(port)
        self._url = url
        self.proc, self._owned, self._log_file = None, False, None
        self._port_picked, self._port_retries_left, self._start_thread = False, 0, None
        self.log_path = None
        self.model = model_name or "?"
        self.model_name = self.model
        self.stop_grace_s = 0.0
        if model_name is None:
            try:
                models = requests.get(f"{url}/v1/models", timeout=timeout).json()["data"]
            except (requests.RequestException, ValueError, KeyError) as e:
                raise RolloutServerError(f"cannot reach the vLLM server at {url}: {e}") from e
            self.model = self.model_name = models[0]["id"]
        return self

    @property
    def url(self) -> str:
        return getattr(self, "_url", None) or f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        enforce_eager = self.enforce_eager
        if enforce_eager is None:  # CUDA graphs are a GPU feature; eager is what CPU runs
            enforce_eager = not cuda_available()
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--served-model-name", self.model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--dtype", self.dtype,
            "--tensor-parallel-size", str(self.tensor_parallel_size),
            "--seed", str(self.seed),
            "--worker-extension-cls", WORKER_EXTENSION,
        ]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.kv_cache_bytes:
            cmd += ["--kv-cache-memory-bytes", str(self.kv_cache_bytes)]
        if self.max_num_seqs:
            cmd += ["--max-num-seqs", str(self.max_num_seqs)]
        if enforce_eager:
            cmd.append("--enforce-eager")
        if self.enable_sleep_mode:
            cmd.append("--enable-sleep-mode")
        if not cuda_available():
            cmd += cpu_scheduler_args(self.model, self.max_model_len)
        return cmd + extra_cli_args(self.extra_args)

    def start(self) -> "VLLMServer":
        """Start the server process (returns at once; see wait_healthy)."""
        if not self._owned:
            raise RolloutServerError(f"{self.describe()} is attached, not owned: it cannot be started here")
        if self.proc is not None:
            return self
        while port_in_use(self.host, self.port) and self._port_retries_left:
            self._repick_port()
        if port_in_use(self.host, self.port):
            raise RolloutServerError(f"port {self.port} on {self.host} is already in use")
        # vLLM binds ZMQ ipc sockets in $TMPDIR and unix socket paths are limited to 107
        # bytes, so the per-server TMPDIR is a short folder in /tmp, removed by stop().
        self._tmp_dir = tempfile.mkdtemp(prefix="vllm-", dir="/tmp" if os.access("/tmp", os.W_OK) else None)
        env = dict(os.environ)
        env.update(
            VLLM_SERVER_DEV_MODE="1",  # /collective_rpc, /pause, /resume, /reset_prefix_cache
            PYTHONPATH=os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p),
            TMPDIR=self._tmp_dir,
        )
        # vLLM's own cache (VLLM_CACHE_ROOT, default ~/.cache/vllm) is kept across servers: a cold
        # one costs every start a subprocess that imports vLLM to inspect the model class (~20 s
        # on 2 cores: docs/ci.md). Its entries are keyed by file hashes and written atomically.
        env.pop(ENV_BUSY_LOOP_S, None)  # None means vLLM's 1 s, whatever the caller's environment says
        env.update(busy_loop_env(self.shm_busy_loop_s, env.get("VLLM_PLUGINS")))
        if self.shm_busy_loop_s is not None and not plugin_installed():
            warnings.warn(f"shm_busy_loop_s={self.shm_busy_loop_s} has no effect: the vLLM plugin "
                          f"'{PLUGIN_NAME}' is not installed (pip install -e . in this repo registers it)")
        env.update(self.env)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        self._log_start = self._log_file.tell()  # this run's part of a log kept across restarts
        _install_signal_handlers()
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # own process group: stop() reaches vLLM's children
            preexec_fn=lambda parent=os.getpid(): die_with_parent(parent),
        )
        _LIVE.add(self)
        # The parent-death signal follows the forking thread (rollout/process.py): a restart
        # on a lost port race must come from this thread too.
        self._start_thread = threading.get_ident()
        return self

    def wait_healthy(self, timeout: float = 300.0) -> "VLLMServer":
        """Poll /health until this server (not another process on its port) answers 200; raise
        RolloutServerError if the process dies or `timeout` s pass. A server that died on a
        picked port taken since is started again on a new one (with a fresh `timeout`) when
        called on the thread that started it, else PortTaken is raised."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                if self._lost_port_race():
                    if threading.get_ident() != self._start_thread:
                        raise PortTaken(f"{self.describe()} lost its port to another process", server=self)
                    self.start_on_new_port()
                    deadline = time.monotonic() + timeout
                    continue
                raise self.error(f"exited with code {self.proc.returncode} while starting")
            try:
                if requests.get(f"{self.url}/health", timeout=2.0).status_code == 200 and self._listens_here():
                    if self._port_picked:
                        self._port_retries_left = PORT_RETRIES  # for the next (re)start
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise self.error(f"was not healthy after {timeout:.0f} s")
            time.sleep(0.5)

    def start_on_new_port(self) -> "VLLMServer":
        """After PortTaken: stop, pick a new free port, start again (from the thread that
        should own the server)."""
        self.stop()
        self._repick_port()
        return self.start()

    def _repick_port(self) -> None:
        old, self.port = self.port, free_port(self.host)
        self._port_retries_left -= 1
        warnings.warn(f"vLLM server for {self.model}: port {old} was taken by another process; using {self.port}")

    def _lost_port_race(self) -> bool:
        """The server died binding the port we picked for it (taken since), and may retry."""
        cause = self.root_cause() or ""
        return self._port_retries_left > 0 and ("Address already in use" in cause or "Errno 98" in cause)

    def _listens_here(self) -> bool:
        """Owned: a process of our server's group listens on self.port (vLLM binds the port
        long before it listens, so a server that picked the same port could answer first).
        Attached: True."""
        if self.proc is None:
            return True
        try:
            pgid = os.getpgid(self.proc.pid)
        except ProcessLookupError:
            return False
        for pid in group_members(pgid):
            try:
                conns = psutil.Process(pid).net_connections(kind="tcp")
            except psutil.Error:
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in conns):
                return True
        return False

    def alive(self) -> bool:
        """Owned: the process runs. Attached: /health answers."""
        if self.proc is not None:
            return self.proc.poll() is None
        if self._owned:
            return False
        try:
            return requests.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except requests.RequestException:
            return False

    def dies_within(self, seconds: float) -> bool:
        """True if the owned process is dead or dies within `seconds`: a request that fails
        because the server is being killed can see it still running for a moment."""
        deadline = time.monotonic() + seconds
        while self.alive():
            if not self._owned or time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def stop(self) -> None:
        """Kill the whole process group: SIGTERM, then SIGKILL after the grace period.
        Idempotent; does nothing for an attached server."""
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is not None:
            try:
                pgid = os.getpgid(proc.pid)
            except ProcessLookupError:
                pgid = proc.pid  # leader gone; the group id is still its pid
            signal_group(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                pass
            # The leader may exit before its children do, and SIGKILL'd leaders leave
            # orphans: wait for the group to empty, then SIGKILL what is left.
            deadline = time.monotonic() + self.stop_grace_s
            while group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            signal_group(pgid, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            # SIGKILL is delivered asynchronously (a loaded machine takes a while to tear
            # down a big process): return only once the group is empty.
            deadline = time.monotonic() + 10.0
            while group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if getattr(self, "_tmp_dir", None):
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    def __enter__(self) -> "VLLMServer":
        return self.start().wait_healthy()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):
        try:
            self.stop()
        except Exception:
            pass

    # ------------------------------------------------------------------ errors
    def describe(self) -> str:
        return f"vLLM server at {self.url} (model {self.model})"

    def log_tail(self, lines: int = 50) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return "(no log: attached server)" if not self._owned else "(no log yet)"
        with open(self.log_path, "rb") as f:
            tail = deque(f, maxlen=lines)
        return b"".join(tail).decode("utf-8", "replace")

    def root_cause(self) -> str | None:
        """The first Python exception the server raised since its last start(), as its log
        shows it ("RuntimeError: CPU Generator does not use offset"), skipping vLLM's
        wrappers that only say the engine died. None for an attached server or a log
        without one."""
        if not self.log_path or not Path(self.log_path).exists():
            return None
        with open(self.log_path, "rb") as f:
            f.seek(getattr(self, "_log_start", 0))
            return first_exception(f.read(64 * 2**20).decode("utf-8", "replace"))

    def error(self, what: str) -> RolloutServerError:
        """A RolloutServerError naming this server, with its log tail when we own it."""
        msg = f"{self.describe()} {what}"
        if self.log_path:
            msg += f"\n--- last lines of {self.log_path} ---\n{self.log_tail()}"
        return RolloutServerError(msg, server=self)

    # ------------------------------------------------------------------ dev endpoints
    def post(self, path: str, json: Any = None, params: dict | None = None, timeout: float = 600.0,
             data: bytes | None = None) -> Any:
        """POST to an admin endpoint (`json`, or `data`: an already encoded JSON body);
        errors name the server and the endpoint."""
        headers = {"Content-Type": "application/json"} if data is not None else None
        try:
            r = requests.post(f"{self.url}{path}", json=json, data=data, params=params, headers=headers,
                              timeout=(10.0, timeout))
        except requests.RequestException as e:
            raise self.error(f"failed on POST {path}: {e!r}" + ("" if self.alive() else " (server process is dead)")) from e
        if r.status_code != 200:
            raise self.error(f"answered POST {path} with HTTP {r.status_code}: {r.text[:2000]}")
        return r.json() if r.content else None

    def collective_rpc(self, method: str, args: list | tuple = (), kwargs: dict | None = None,
                       timeout: float = 600.0) -> list[Any]:
        """Call `method` on every vLLM worker; returns one result per worker."""
        body = {"method": method, "args": list(args), "kwargs": kwargs or {}, "timeout": timeout}
        out = self.post("/collective_rpc", json=body, timeout=timeout + 30)
        return [] if out is None else out["results"]

    def pause(self, mode: str = "wait") -> None:
        """Stop scheduling: "wait" lets running requests finish, "abort" aborts them,
        "keep" freezes them until resume()."""
        self.post("/pause", params={"mode": mode})

    def resume(self) -> None:
        self.post("/resume")

    def sleep(self, level: int = 1) -> None:
        """Give GPU memory back (level 1: weights to CPU RAM, KV cache dropped); needs a server
        started with --enable-sleep-mode (on CPU, where vLLM refuses the flag, a no-op)."""
        self.post("/sleep", params={"level": level})

    def wake_up(self) -> None:
        self.post("/wake_up")

    def reset_prefix_cache(self) -> bool:
        return bool(self.post("/reset_prefix_cache")["success"])
