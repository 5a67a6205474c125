"""Rank-aware logging and terminal-only progress bars.

Every module logs through `get_logger(__name__)`; `setup_logging()` (called once by each
entry point) prints `[train] message` on global rank 0 at INFO, and only warnings and errors,
tagged `[train rank 3]`, on the other ranks, so an 8-rank run does not print everything 8
times. Progress bars are drawn only when stderr is a terminal: redirected to a file, a run
writes one log line per step instead of megabytes of carriage returns.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

_PACKAGE = "megatron_tbrm"


def rank() -> int:
    """Global rank from the launcher's environment (torchrun, SLURM); 0 when not launched."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


class _Format(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        name = record.name.removeprefix(_PACKAGE + ".").removesuffix(".__main__")
        tag = name if self.rank == 0 else f"{name} rank {self.rank}"
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        msg = f"[{tag}] {level}{record.getMessage()}"
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return msg


def setup_logging(level: Optional[int] = None) -> None:
    """Send the package's records to stderr: INFO on rank 0, WARNING elsewhere (`level`
    overrides both). Idempotent."""
    r = rank()
    logger = logging.getLogger(_PACKAGE)
    logger.setLevel(level if level is not None else (logging.INFO if r == 0 else logging.WARNING))
    if not any(getattr(h, "_tbrm", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Format(r))
        handler._tbrm = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


def get_logger(name: str) -> logging.Logger:
    """The logger of module `name` (pass __name__; a module run with -m is named as imported)."""
    if name == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        name = spec.name if spec is not None else name
    return logging.getLogger(name if name.startswith(_PACKAGE) else f"{_PACKAGE}.{name}")


def on_terminal() -> bool:
    return sys.stderr.isatty()


def progress_bar(total: int, desc: str, enabled: bool = True, **kw):
    """A tqdm bar when `enabled` and stderr is a terminal, else None (callers log a line per
    step instead)."""
    if not (enabled and on_terminal()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, **kw)
