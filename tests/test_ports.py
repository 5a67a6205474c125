"""Launches that bind their rendezvous port themselves: CI lost a torchrun rendezvous to
EADDRINUSE on a port picked ahead of time (tests/_torchrun.py then passed --master-port). Here
torch's default port 29500 is held by another listener, as a concurrent run would hold it. A
world of one on the old fixed default (29500) fails here; the torchrun test checks that the
ranks get the rendezvous's own port and reach it on loopback (--local-addr), which a pre-picked
port could not show (the race itself is not reproducible on demand)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_tbrm.ports import torchrun_command

REPO = Path(__file__).resolve().parents[1]

ALL_REDUCE = textwrap.dedent("""
    import os, torch, torch.distributed as dist
    from megatron_tbrm.parallel import init_distributed, destroy_distributed
    ps = init_distributed()
    t = torch.ones(1)
    dist.all_reduce(t)
    with open(os.path.join(os.environ["OUT_DIR"], f"rank{dist.get_rank()}.txt"), "w") as f:
        f.write(f"world {dist.get_world_size()} sum {int(t.item())} port {os.environ['MASTER_PORT']} "
                f"addr {os.environ['MASTER_ADDR']}")
    destroy_distributed()
""")


@pytest.fixture
def default_port_taken():
    try:
        s = socket.create_server(("127.0.0.1", 29500))
    except OSError:  # something else holds it already: the condition under test holds anyway
        s = None
    yield
    if s is not None:
        s.close()


def _run(cmd, tmp_path):
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), OUT_DIR=str(tmp_path))
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    p = subprocess.run([*cmd, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [f.read_text() for f in sorted(tmp_path.glob("rank*.txt"))]


def test_torchrun_command_rendezvous_binds_its_own_port(default_port_taken, tmp_path):
    lines = _run(torchrun_command(2), tmp_path)
    assert len(lines) == 2 and all(x.startswith("world 2 sum 2 port ") for x in lines), lines
    assert all(" port 29500 " not in x and x.endswith(" addr 127.0.0.1") for x in lines), lines


def test_a_world_of_one_binds_its_own_port(default_port_taken, tmp_path):
    assert _run([sys.executable], tmp_path) == ["world 1 sum 1 port 0 addr 127.0.0.1"]
