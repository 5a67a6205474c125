"""Trajectories from files, for off-policy TBRM (shared/notes/tbrm.md: the objective holds for
data from any policy, with no importance ratio).

Two row forms, in JSONL or Parquet, one trajectory per row:
- token ids (what `rollout.save: true` writes to RUN/rollouts/step_N.jsonl):
  `prompt_token_ids`, `response_token_ids`, `reward`; optional `rollout_logprobs` (the
  sampler's, per response token), `policy_version`, `policy_version_end`;
- text: `prompt` (a string or chat messages: templated like training prompts, with
  data.system_prompt), `response` (a string: tokenized without special tokens, then the chat
  template's end-of-turn token unless `finish_reason` is "length"), `reward`.
A row that is neither (or has an empty response, or a non-finite reward) is counted in
`stats.bad` and skipped, like a bad prompt row.
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..rollout.batch import Sample
from .prompts import to_messages
from .rows import BadRow, read_rows

SUFFIXES = (".jsonl", ".json", ".parquet")


def resolve_trajectory_files(spec: str) -> list[Path]:
    """A file, a folder (its *.jsonl / *.parquet, sorted) or a glob -> files, sorted.
    FileNotFoundError naming `spec` when nothing matches."""
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES)
    else:
        files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    if not files:
        raise FileNotFoundError(f"no trajectory files (*.jsonl, *.parquet) match {spec!r}")
    return files


@dataclass
class TrajectoryStats:
    rows: int = 0
    bad: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class TrajectoryDataset:
    """Every valid row of the files as a `Sample` (rollout/batch.py), in file order.
    `eot_id`: the token that ends a text response (the chat template's end of turn)."""

    def __init__(self, spec: str, tokenizer: Any, pad_id: int, system_prompt: Optional[str] = None,
                 eot_id: Optional[int] = None, max_tokens: Optional[int] = None):
        self.files = resolve_trajectory_files(spec)
        self.stats = TrajectoryStats()
        self.samples: list[Sample] = []
        for path in self.files:
            for index, row in read_rows(path):
                self.stats.rows += 1
                try:
                    if isinstance(row, BadRow):
                        raise row
                    sample = self._sample(row, index, tokenizer, pad_id, system_prompt, eot_id)
                    if max_tokens is not None and len(sample.tokens) > max_tokens:
                        raise BadRow(f"longer than {max_tokens} tokens")
                except (BadRow, KeyError, TypeError, ValueError) as e:
                    self.stats.bad += 1
                    reason = str(e).split(":")[0][:80]
                    self.stats.reasons[reason] = self.stats.reasons.get(reason, 0) + 1
                    continue
                self.samples.append(sample)
        if not self.samples:
            raise ValueError(f"data.trajectories={spec!r}: no usable trajectory in {len(self.files)} file(s) "
                             f"({self.stats.rows} rows; bad: {self.stats.reasons})")

    @staticmethod
    def _sample(row: dict, index: int, tok, pad_id, system_prompt, eot_id) -> Sample:
        reward = float(row["reward"])
        if not math.isfinite(reward):
            raise BadRow(f"non-finite reward {reward}")
        if "prompt_token_ids" in row and "response_token_ids" in row:
            prompt, response = list(row["prompt_token_ids"]), list(row["response_token_ids"])
            logprobs = list(row.get("rollout_logprobs") or [])
            version = int(row.get("policy_version", -1))
            version_end = int(row.get("policy_version_end", version))
        elif "prompt" in row and "response" in row:
            # as PromptDataset templates prompts: the text, then ids without extra special tokens
            text = tok.apply_chat_template(to_messages(row["prompt"], system_prompt), tokenize=False,
                                           add_generation_prompt=True)
            prompt = tok(text, add_special_tokens=False)["input_ids"]
            if not isinstance(row["response"], str):
                raise BadRow("response is not a string")
            response = tok(row["response"], add_special_tokens=False)["input_ids"]
            if eot_id is not None and row.get("finish_reason") != "length":
                response = response + [eot_id]
            logprobs, version, version_end = [], -1, -1
        else:
            raise BadRow(f"no prompt_token_ids/response_token_ids or prompt/response fields (has {sorted(row)[:8]})")
        sample = Sample.from_ids(prompt, response, logprobs, reward, index, pad_id, version, version_end)
        if sample is None:
            raise BadRow("empty prompt or response")
        return sample

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.samples[i]
