"""TCP ports on this host: a free one for a server about to start, whether one is taken, and
launch commands that never pick a port for someone else to bind later. Standard library only.

A port picked here and bound by another process seconds later can be taken in between (by a
concurrent run, or as the ephemeral source port of any outgoing connection): CI lost a torchrun
rendezvous to EADDRINUSE that way. So rendezvous stores bind port 0 themselves (torchrun
--standalone, MASTER_PORT=0 for a world of one), and VLLMServer retries on a lost race."""
from __future__ import annotations

import errno
import socket
import sys


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now, for a server about to start; it can be taken before the
    server binds it (VLLMServer picks again then). Rendezvous stores bind port 0 instead."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on (host, port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR as uvicorn sets it: a socket in TIME_WAIT does not count as in use.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def torchrun_command(nproc: int) -> list[str]:
    """`python -m torch.distributed.run` for `nproc` ranks on this host; append the script and
    its arguments (or "-m", module, ...). --standalone: the c10d rendezvous binds a free port
    itself and hands it to the ranks as MASTER_PORT, so two launches never collide;
    --local-addr: MASTER_ADDR is loopback, not the host's FQDN (unresolvable in some containers)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr=127.0.0.1", "--nnodes=1",
            f"--nproc-per-node={nproc}"]
