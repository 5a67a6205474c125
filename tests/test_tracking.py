"""Metric sinks and logging (megatron_tbrm/tracking.py, megatron_tbrm/log.py).

- The same metric names and values reach metrics.jsonl, TensorBoard and Weights & Biases. W&B
  runs in its offline mode (no network); its run file is read back with our own reader of
  the LevelDB log format it is written in (not through wandb), TensorBoard's with
  TensorBoard's EventAccumulator.
- Logging is rank-aware: rank 0 logs INFO, other ranks only warnings, tagged with the rank.
- Progress bars only on a terminal: with stderr in a file the bar is off (one log line per
  step instead), on a pseudo-terminal it is drawn.
"""

from __future__ import annotations

import json
import os
import pty
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_tbrm.tracking import Tracking

STEPS = [
    {"step": 1, "loss": 4.0, "reward_mean": 0.125, "grad_norm": float("nan"), "note": "text"},
    {"step": 2, "loss": 2.5, "reward_mean": 0.25, "grad_norm": 1.5},
    {"step": 3, "loss": 1.0, "reward_mean": 0.5, "eval_accuracy": 0.3},
]


def _leveldb_records(path: Path) -> list[bytes]:
    """Records of a W&B run file: a 7-byte header (':W&B', magic, version), then the LevelDB
    log format (32 KiB blocks; per fragment crc32c(4), length(2, little endian), type(1):
    1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    out, pos, buf = [], 7, b""
    block = 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        frag = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        buf += frag
        if kind in (1, 4):
            out.append(buf)
            buf = b""
    return out


def _wandb_history(run_dir: Path) -> list[dict]:
    from wandb.proto import wandb_internal_pb2 as pb

    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    # A complete run file ends with the "exit" record. Once (2026-12-07, a fresh-clone `make test`
    # beside a learning run) the file read right after wandb.finish() held no history at all;
    # whether wandb's writer was still behind is not known, so wait for the exit record and name
    # the record types seen if it never comes.
    deadline = time.monotonic() + 60.0
    while True:
        records = []
        for raw in _leveldb_records(files[0]):
            rec = pb.Record()
            rec.ParseFromString(raw)
            records.append(rec)
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "exit" in kinds, f"{files[0]}: no exit record after 60 s; records: {kinds}"
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r, kind in zip(records, kinds) if kind == "history"]


def test_same_metric_names_in_jsonl_tensorboard_and_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    t = Tracking(run, tensorboard=True, wandb_project="tbrm-test", wandb_mode="offline", config={"loss": {"beta": 0.05}})
    for m in STEPS:
        t.log(m)
    t.close()

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 1, "loss": 4.0, "reward_mean": 0.125, "grad_norm": None, "note": "text"}
    assert [r["step"] for r in rows] == [1, 2, 3]
    # what each sink should hold: the finite numbers of every step (strings and NaN left out)
    want = {(m["step"], k): v for m in STEPS for k, v in m.items()
            if k != "step" and isinstance(v, float) and v == v}

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tb = {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    assert tb == pytest.approx(want)

    wb = {}
    for h in _wandb_history(run):
        for k, v in h.items():
            if not k.startswith("_"):
                wb[(h["_step"], k)] = v
    assert wb == pytest.approx(want)


def test_wandb_missing_is_a_named_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match="run.wandb_project='p' needs Weights & Biases: pip install wandb"):
        Tracking(tmp_path / "run", tensorboard=False, wandb_project="p")


LOG_SNIPPET = """
from megatron_tbrm.log import get_logger, progress_bar, setup_logging
setup_logging()
log = get_logger("megatron_tbrm.train")
log.info("hello")
log.warning("careful")
print("bar" if progress_bar(10, "tbrm") is not None else "no bar", flush=True)
"""


def _run(env_rank: str, tty: bool = False) -> tuple[str, str]:
    env = dict(os.environ, RANK=env_rank)
    if not tty:
        p = subprocess.run([sys.executable, "-c", LOG_SNIPPET], env=env, capture_output=True, text=True, timeout=60)
        return p.stdout, p.stderr
    master, slave = pty.openpty()
    p = subprocess.run([sys.executable, "-c", LOG_SNIPPET], env=env, stdout=subprocess.PIPE, stderr=slave,
                       text=True, timeout=60)
    os.close(slave)
    err = os.read(master, 65536).decode()
    os.close(master)
    return p.stdout, err


def test_rank_zero_logs_info_other_ranks_only_warnings_tagged():
    out, err = _run("0")
    assert err.splitlines() == ["[train] hello", "[train] WARNING: careful"]
    out, err = _run("3")
    assert err.splitlines() == ["[train rank 3] WARNING: careful"]


def test_progress_bar_only_on_a_terminal():
    out, _ = _run("0")
    assert out.strip() == "no bar"  # stderr is a pipe: one log line per step instead
    out, _ = _run("0", tty=True)
    assert out.strip() == "bar"
