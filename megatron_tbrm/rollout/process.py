"""Child process groups that die with their owner: the kernel's parent-death signal, group
signals and liveness."""
from __future__ import annotations

import ctypes
import os
import signal

import psutil

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """preexec_fn: ask the kernel to SIGTERM the server when the owner dies, even by
    SIGKILL. SIGTERM (not SIGKILL) lets vLLM's API server take its engine processes down.
    Note: the kernel tracks the *thread* that forked, so start servers from a thread that
    lives as long as the server (normally the main thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # owner died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`."""
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))
