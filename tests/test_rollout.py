"""Rollout server + client against a real vLLM CPU server on the tiny model (one server for
the module; tests that kill it come last). Lifecycle tests that only need a process group
use a stand-in command instead of vLLM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from megatron_tbrm.rollout import RolloutClient, RolloutServerError, Trajectory, VLLMServer
from megatron_tbrm.rollout.process import group_members

from _vllm import DEFAULTS, vllm_server

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 17, 33, 101, 250, 7], [64, 300, 12], [99, 140, 3, 77, 210, 45, 8, 31]]
# shm_busy_loop_s: the trainer's CPU default (rollout.shm_busy_loop_s), so the patch test below
# reads this module's server.
SERVER_KW = dict(DEFAULTS, max_num_seqs=16, shm_busy_loop_s=0.05)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with vllm_server(tiny_model_dir, tmp_path_factory.mktemp("vllm-rollout"), **SERVER_KW) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return RolloutClient.for_server(server, max_concurrency=4, timeout=120, retries=2)


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_group_gone(pgid: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_generate_returns_server_token_ids_and_logprobs(client):
    trajs = client.generate(PROMPTS, n=3, max_tokens=16, seed=0, progress=False)
    assert [(t.prompt_index, t.sample_index) for t in trajs] == [(i, j) for i in range(3) for j in range(3)]
    vocab = 512
    for t in trajs:
        assert isinstance(t, Trajectory)
        assert t.prompt_token_ids == PROMPTS[t.prompt_index]
        assert 1 <= len(t.response_token_ids) <= 16
        assert len(t.response_logprobs) == len(t.response_token_ids)
        assert all(0 <= i < vocab for i in t.response_token_ids)
        assert all(lp <= 0 for lp in t.response_logprobs)
        assert t.finish_reason in ("stop", "length")
    # n samples of one prompt differ (different seeds), and a seed reproduces them.
    assert len({tuple(t.response_token_ids) for t in trajs[:3]}) > 1
    again = client.generate(PROMPTS, n=3, max_tokens=16, seed=0, progress=False)
    assert [t.response_token_ids for t in again] == [t.response_token_ids for t in trajs]


def test_sampler_logprobs_are_those_of_the_sampled_tokens(client):
    """Scoring the sampled response with prompt_logprobs (a different code path) gives the
    sampler's per-token log-probs back, so they belong to the returned ids."""
    trajs = client.generate(PROMPTS[:2], n=2, max_tokens=12, temperature=1.0, seed=5, progress=False,
                            extra={"ignore_eos": True})
    scored = client.score_logprobs_batch([(t.prompt_token_ids, t.response_token_ids) for t in trajs],
                                         progress=False)
    for t, s in zip(trajs, scored):
        assert len(s) == len(t.response_logprobs) == 12
        assert max(abs(a - b) for a, b in zip(s, t.response_logprobs)) < 1e-4


def test_seeded_requests_over_the_token_budget_survive_and_reproduce(server):
    """Concurrent seeded prompts whose tokens exceed one scheduler step's budget (16 x 400
    tokens > 4096): with chunked prefill vLLM split them, rewound CPU generators with
    set_offset and the engine died ("CPU Generator does not use offset", issue 13 item 7).
    The samples must also not depend on how the requests were batched: the same seeds sent
    one at a time give the same tokens."""
    prompts = [[(7 * i + 13 * j) % 500 + 3 for j in range(400)] for i in range(16)]
    busy = RolloutClient.for_server(server, max_concurrency=16, timeout=300, retries=0)
    together = busy.generate(prompts, n=2, temperature=1.0, max_tokens=8, seed=11, progress=False)
    assert server.alive()
    alone = RolloutClient.for_server(server, max_concurrency=1, timeout=300, retries=0)
    one_by_one = alone.generate(prompts[:4], n=2, temperature=1.0, max_tokens=8, seed=11, progress=False)
    assert [t.response_token_ids for t in one_by_one] == [t.response_token_ids for t in together[:8]]


def test_generate_works_inside_a_running_event_loop(client):
    """The client runs its requests on an asyncio loop of its own; called from code that already
    runs one (a notebook, an async service) it must not fail with "asyncio.run() cannot be called
    from a running event loop". The same seeds give the same tokens as a plain call."""
    import asyncio

    async def inside():
        return client.generate(PROMPTS, max_tokens=6, temperature=1.0, seed=5, progress=False)

    plain = client.generate(PROMPTS, max_tokens=6, temperature=1.0, seed=5, progress=False)
    assert [t.response_token_ids for t in asyncio.run(inside())] == [t.response_token_ids for t in plain]


def test_each_request_gets_its_own_token_budget(client):
    """Issue 13 item 6: the room left after ONE long prompt capped every request's response
    (84 tokens instead of 200). Each request: min(max_tokens, max_model_len - its prompt)."""
    assert client.max_model_len() == 512
    long_prompt = [(11 * j) % 500 + 3 for j in range(400)]
    trajs = client.generate([PROMPTS[0], long_prompt], max_tokens=200, temperature=1.0, seed=0,
                            progress=False, extra={"ignore_eos": True})
    assert [len(t.response_token_ids) for t in trajs] == [200, 112]
    with pytest.raises(ValueError, match="prompt 1 has 512 tokens"):
        client.generate([PROMPTS[0], long_prompt + long_prompt[:112]], max_tokens=8, progress=False)


@pytest.fixture(scope="module")
def base_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny chat model configured as Qwen2.5 base models are: EOS <|endoftext|> in the
    config, the generation config and the tokenizer, while the chat template ends a turn with
    <|im_end|> (shared/notes/tbrm.md)."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("base") / "model"
    shutil.copytree(tiny_model_dir, out)
    edits = {"config.json": {"eos_token_id": 0}, "generation_config.json": {"eos_token_id": 0},
             "tokenizer_config.json": {"eos_token": "<|endoftext|>"}}
    for name, changes in edits.items():
        cfg = json.loads((out / name).read_text())
        cfg.update(changes)
        (out / name).write_text(json.dumps(cfg))
    return out


def test_responses_end_at_the_chat_templates_end_of_turn(base_model_dir, tmp_path):
    """Issue 13 item 5: with a base model's EOS, a response that emits <|im_end|> ran on to
    max_tokens (finish=length). The stop ids come from the tokenizer's chat template."""
    from transformers import AutoTokenizer

    from megatron_tbrm.rollout.client import end_of_turn_token_ids

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|endoftext|>" and im_end != tok.eos_token_id
    assert end_of_turn_token_ids(tok) == [im_end]
    text = tok.apply_chat_template([{"role": "user", "content": "1+1"}], add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    force = {"logit_bias": {str(im_end): 100.0}}  # the model says <|im_end|> at once
    with vllm_server(base_model_dir, tmp_path / "vllm", max_num_seqs=4) as srv:
        c = RolloutClient.for_server(srv, timeout=120, retries=0)
        runs_on = c.generate([prompt], max_tokens=20, seed=0, progress=False, extra=force)[0]
        assert runs_on.finish_reason == "length" and len(runs_on.response_token_ids) == 20
        ends = c.generate([prompt], max_tokens=20, seed=0, progress=False, extra=force,
                          stop_token_ids=end_of_turn_token_ids(tok))[0]
    assert ends.finish_reason == "stop"
    assert ends.response_token_ids == [im_end]  # the stop token is part of the trained response


def test_idle_server_stops_spinning_with_the_busy_loop_patch(server, client):
    """rollout.shm_busy_loop_s (rollout/vllm_cpu_patches.py, a vLLM plugin): after a request the
    server's processes go idle within the capped busy loop. Reference, measured on this 2-core
    machine with the same tiny model: unpatched (vLLM's 1 s busy loop), the process group used
    1.00 cpu-s in the 1.5 s after a request; patched at 0.05 s, 0.06 cpu-s."""
    log = server.log_path.read_text(errors="replace")
    patched = [ln for ln in log.splitlines() if "busy loop capped at 0.05 s" in ln]
    assert any("EngineCore" in ln for ln in patched) and any("Worker" in ln for ln in patched), patched

    def group_cpu_s() -> float:
        total = 0.0
        for pid in group_members(server.proc.pid):
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    used = []
    for _ in range(2):
        client.generate(PROMPTS, n=2, max_tokens=16, seed=0, progress=False)
        before = group_cpu_s()
        time.sleep(1.5)
        used.append(group_cpu_s() - before)
    assert min(used) < 0.4, f"vLLM's processes used {used} cpu-s in 1.5 s idle: still busy-polling"


def test_busy_loop_setting_is_checked():
    from megatron_tbrm.rollout.vllm_cpu_patches import ENV_BUSY_LOOP_S, busy_loop_env

    assert busy_loop_env(None) == {} and busy_loop_env(0.05) == {ENV_BUSY_LOOP_S: "0.05"}
    # a VLLM_PLUGINS allowlist would make vLLM skip the plugin: it gets the plugin's name
    assert busy_loop_env(0.05, "other")["VLLM_PLUGINS"] == "other,megatron_tbrm_cpu"
    assert "VLLM_PLUGINS" not in busy_loop_env(0.05, "other,megatron_tbrm_cpu")
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="shm_busy_loop_s"):
            busy_loop_env(bad)


def test_first_exception_of_a_vllm_log():
    """Lines as vLLM 0.32 wrote them when a CPU engine died (shortened): the root cause is the
    worker's RuntimeError, not the EngineDeadError every request logs after it, nor a warning
    that merely mentions an OSError."""
    from megatron_tbrm.rollout.server import first_exception

    log = "\n".join([
        "(APIServer pid=1) WARNING 11-29 11:35:13 [system_utils.py:255] Found ulimit of 20000 and failed to "
        "automatically increase with error current limit exceeds maximum limit. This can cause fd limit errors "
        "like `OSError: [Errno 24] Too many open files`. Consider increasing with ulimit -n",
        "(Worker pid=2) ERROR 11-29 11:38:37 [multiproc_executor.py:1063]     gen.set_offset(gen.get_offset() - 4)",
        "(Worker pid=2) ERROR 11-29 11:38:37 [multiproc_executor.py:1063] RuntimeError: CPU Generator does not use offset",
        "(APIServer pid=1) ERROR 11-29 11:38:37 [vllm_error.py:54] vllm.v1.engine.exceptions.EngineDeadError: "
        "EngineCore encountered an issue. See stack trace (above) for the root cause.",
    ])
    assert first_exception(log) == "RuntimeError: CPU Generator does not use offset"
    assert first_exception(log.splitlines()[-1]) is None and first_exception("") is None
    assert first_exception("Traceback (most recent call last):\nValueError: bad value") == "ValueError: bad value"


def test_port_in_use_is_reported(server, tiny_model_dir, tmp_path):
    other = VLLMServer(tiny_model_dir, port=server.port, work_dir=tmp_path, **SERVER_KW)
    with pytest.raises(RolloutServerError, match=f"port {server.port} on 127.0.0.1 is already in use"):
        other.start()
    assert other.proc is None


def test_a_picked_port_taken_before_vllm_binds_it_is_picked_again(tiny_model_dir, tmp_path):
    """The pick-then-bind race CI lost (EADDRINUSE): another process takes the picked port
    before start() (start picks again) or while vLLM imports (vLLM exits on the bind). Waited
    on from another thread (as start_all does for several engines), that is PortTaken, and the
    starting thread starts the server again on a new port: the server must outlive the waiting
    thread (its parent-death signal follows the thread that forked it)."""
    import socket

    from megatron_tbrm.rollout.server import PortTaken

    s = VLLMServer(tiny_model_dir, work_dir=tmp_path, **SERVER_KW)
    first = s.port
    taken = [socket.create_server(("127.0.0.1", first))]  # listening, as another server would
    try:
        s.start()
        second = s.port
        taken.append(socket.create_server(("127.0.0.1", second)))  # vLLM binds it after seconds of imports
        errors = []
        waiter = threading.Thread(target=lambda: errors.append(_raised(s.wait_healthy, 600)))
        waiter.start()
        waiter.join()
        assert isinstance(errors[0], PortTaken), errors
        s.start_on_new_port().wait_healthy(timeout=600)
        assert s.port not in (first, second)
        time.sleep(2)
        assert s.alive()
        assert RolloutClient.for_server(s).generate(PROMPTS[:1], max_tokens=4, progress=False)
        assert "Address already in use" in s.log_path.read_text()  # the attempt that lost the race
    finally:
        s.stop()
        for sock in taken:
            sock.close()


def _raised(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e
    return None


def test_attach_uses_running_server_and_never_stops_it(server):
    attached = VLLMServer.attach(server.url)
    assert attached.model_name == server.model_name and attached.alive()
    trajs = RolloutClient.for_server(attached).generate(PROMPTS[:1], max_tokens=4, progress=False)
    assert len(trajs) == 1
    attached.stop()
    assert server.alive() and attached.alive()


def test_failed_start_names_server_and_shows_log(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    s = VLLMServer(empty, work_dir=tmp_path / "w", **SERVER_KW)
    t0 = time.monotonic()
    with pytest.raises(RolloutServerError) as e:
        s.start().wait_healthy(timeout=240)
    s.stop()
    msg = str(e.value)
    assert s.url in msg and str(empty) in msg and "exited with code" in msg
    assert "--- last lines of" in msg and len(msg.splitlines()) > 5
    assert time.monotonic() - t0 < 240  # noticed the death, did not wait for the timeout


class _Standin(VLLMServer):
    """A process group like vLLM's (leader + child) without vLLM, for lifecycle tests."""

    def command(self):
        return [sys.executable, "-c",
                "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_owner_signal_stops_server_group(tmp_path, sig):
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        # A background job of a non-interactive shell (CI runners, nohup ... &) starts with
        # SIGINT ignored, and Python then never raises KeyboardInterrupt: this owner is a
        # foreground program, as a user's trainer is.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_rollout import _Standin
        s = _Standin("unused", work_dir={str(tmp_path)!r}).start()
        time.sleep(1.0)
        print(os.getpgid(s.proc.pid), flush=True)
        time.sleep(300)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pgid = int(owner.stdout.readline())
    assert len(group_members(pgid)) == 2
    owner.send_signal(sig)
    owner.wait(timeout=30)
    assert _wait_group_gone(pgid, 15) == []


def test_server_death_mid_request_is_an_error_not_a_hang(server):
    """Kills the module server: runs after every test that needs it."""
    client = RolloutClient.for_server(server, max_concurrency=8, timeout=120, retries=3)
    outcome: dict = {}

    def run():
        try:  # ~100k tokens: runs for many seconds on 2 cores
            outcome["result"] = client.generate([PROMPTS[0]] * 64, n=4, max_tokens=400, progress=False,
                                                extra={"ignore_eos": True})
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            outcome["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    time.sleep(2.0)
    pgid = os.getpgid(server.proc.pid)
    members = group_members(pgid)
    os.kill(server.proc.pid, signal.SIGKILL)  # the API server, mid-request
    t0 = time.monotonic()
    th.join(timeout=60)
    assert not th.is_alive(), "generate() hung after the server died"
    assert time.monotonic() - t0 < 30
    err = outcome.get("error")
    assert isinstance(err, RolloutServerError), outcome
    assert server.url in str(err) and "died during POST /v1/completions" in str(err)
    assert "--- last lines of" in str(err)
    # The engine core outlives a SIGKILL'd API server; stop() still clears the whole group.
    server.stop()
    assert _alive(members) == [] and group_members(pgid) == []


def test_owner_sigkill_takes_server_down(tiny_model_dir, tmp_path, server):
    """PR_SET_PDEATHSIG: a trainer killed with SIGKILL (no handler runs) leaves no vLLM
    processes behind. Runs after the module server was stopped (one vLLM server at a time)."""
    server.stop()
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from megatron_tbrm.rollout import VLLMServer
        s = VLLMServer({str(tiny_model_dir)!r}, work_dir={str(tmp_path)!r}, **{SERVER_KW!r})
        s.start().wait_healthy(900)
        print(os.getpgid(s.proc.pid), flush=True)
        time.sleep(600)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pgid = int(owner.stdout.readline())
        members = group_members(pgid)
        assert len(members) >= 2
        owner.kill()
        owner.wait(timeout=10)
        left = _wait_group_gone(pgid, 30)
        assert left == [], f"orphaned vLLM processes: {left}"
    finally:
        owner.kill()
        for pid in _alive(group_members(pgid) if "pgid" in locals() else []):
            os.kill(pid, signal.SIGKILL)


