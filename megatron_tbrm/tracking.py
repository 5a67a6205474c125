"""Where a run's metrics go, with the same names everywhere: RUN/metrics.jsonl always (one
JSON object per logged step; non-finite values written as null), TensorBoard scalars under
RUN/tensorboard (`run.tensorboard`), and Weights & Biases (`run.wandb_project`,
`run.wandb_mode: offline` for no network). Rank 0 only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from .log import get_logger

log = get_logger(__name__)
METRICS_FILE = "metrics.jsonl"


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v)}


class Tracking:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, wandb_project: Optional[str] = None,
                 wandb_mode: str = "online", wandb_name: Optional[str] = None, config: Optional[dict] = None):
        """Raises ImportError naming the package when W&B is asked for and not installed."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.run_dir / METRICS_FILE, "a")
        self.writer = self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard scalars")
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError(f"run.wandb_project={wandb_project!r} needs Weights & Biases: pip install wandb") from e
            self.wandb = wandb.init(project=wandb_project, name=wandb_name or self.run_dir.name, mode=wandb_mode,
                                    dir=str(self.run_dir), config=config or {}, reinit=True)
            log.info(f"W&B run {self.wandb.name} ({wandb_mode}) in {self.run_dir / 'wandb'}")

    def log(self, metrics: dict) -> None:
        """One step's metrics (must hold "step")."""
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        step = int(metrics["step"])
        numbers = _numbers(metrics)
        if self.writer is not None:
            for k, v in numbers.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
