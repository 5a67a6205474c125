"""Prompts as the rollouts see them: chat-templated with the paper's system prompt,
tokenized, deduplicated, DAPO's instruction wrapper optionally stripped; evaluation sets with
their own fields."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from .rows import _MISSING, BadRow, PathLike, _distinct_parquet_rows, get_field, read_rows

# The paper's (Qwen2.5-Math's) system prompt.
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
_TOKENIZE_CHUNK = 1024  # prompts templated and tokenized per call


@dataclasses.dataclass(frozen=True)
class PromptItem:
    index: int  # row number in the source file (0-based, counting bad rows too)
    prompt: str  # chat-templated text, ending with the assistant generation prompt
    prompt_ids: list[int]
    answer: str  # reference answer for the reward


def to_messages(prompt: Any, system_prompt: Optional[str]) -> list[dict]:
    """A prompt given as a string or a list of chat messages -> messages, with the system
    prompt prepended unless it is None or the messages bring their own."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRow("empty prompt")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)) and prompt:
        messages = []
        for m in prompt:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise BadRow(f"prompt message {m!r} is not {{'role': str, 'content': str}}")
            messages.append({"role": m["role"], "content": m["content"]})
        if not any(m["content"].strip() for m in messages if m["role"] != "system"):
            raise BadRow("empty prompt")
    else:
        raise BadRow(f"prompt must be a string or a non-empty list of messages, got {type(prompt).__name__}"
                     + (" (empty)" if isinstance(prompt, (list, tuple)) else ""))
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


# DAPO-Math-17k wraps each problem in an instruction asking for a last line "Answer: ..."
# (shared/notes/tbrm.md). The paper's recipe trains on the problem with its own system prompt.
DAPO_INSTRUCTION_PREFIX = ("Solve the following math problem step by step. The last line of your response should "
                           "be of the form Answer: $Answer (without quotes) where $Answer is the answer to the "
                           "problem.")
DAPO_INSTRUCTION_SUFFIX = 'Remember to put your answer on its own line after "Answer:"'


def strip_dapo_instruction(text: str) -> Optional[str]:
    """The problem inside DAPO's instruction wrapper (`DAPO_INSTRUCTION_PREFIX` + blank line +
    problem + blank line + `DAPO_INSTRUCTION_SUFFIX`; the suffix may be missing), or None when
    `text` does not start with the prefix or nothing is left."""
    body = text.strip()
    if not body.startswith(DAPO_INSTRUCTION_PREFIX):
        return None
    body = body[len(DAPO_INSTRUCTION_PREFIX):]
    if body.rstrip().endswith(DAPO_INSTRUCTION_SUFFIX):
        body = body.rstrip()[:-len(DAPO_INSTRUCTION_SUFFIX)]
    return body.strip() or None


def load_tokenizer(tokenizer: Any):
    """A tokenizer object as is, or AutoTokenizer from a model folder."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


# ---------------------------------------------------------------------------------------
# Dataset


@dataclasses.dataclass
class LoadStats:
    rows: int = 0
    kept: int = 0
    bad: int = 0
    too_long: int = 0
    duplicates: int = 0  # rows dropped because an earlier row had the same prompt and answer
    instruction_stripped: int = 0  # prompts whose DAPO instruction wrapper was removed
    reasons: Counter = dataclasses.field(default_factory=Counter)


class PromptDataset:
    """All usable, distinct prompts of one file, templated and tokenized at load time.

    Bad rows (not UTF-8, invalid JSON, missing/empty prompt or answer, malformed
    messages) are skipped and counted in `stats` with one warning, or raise ValueError in
    strict mode. A row whose messages (after `strip_instruction`) and answer equal an earlier
    row's is dropped and counted in `stats.duplicates` (`dedupe=False` keeps it); only the
    distinct prompts are templated and tokenized. Prompts longer than `max_prompt_tokens` are
    skipped and counted as too long. `strip_instruction`: user turns wrapped in DAPO's
    "Answer: $Answer" instruction keep only the problem (`strip_dapo_instruction`).
    Raises FileNotFoundError, ValueError (empty file, no usable prompt; both name the file).
    """

    def __init__(self, path: PathLike, tokenizer: Any, prompt_key: str = "prompt",
                 answer_key: str = "answer", system_prompt: Optional[str] = SYSTEM_PROMPT,
                 max_prompt_tokens: Optional[int] = None, strict: bool = False,
                 strip_instruction: bool = False, dedupe: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"prompt file {self.path} does not exist")
        tok = load_tokenizer(tokenizer)
        self.stats = LoadStats()
        first_bad: Optional[str] = None
        rows: list[tuple[int, list[dict], str]] = []
        seen: set[tuple] = set()
        if dedupe and self.path.suffix.lower() in (".parquet", ".pq"):
            source = _distinct_parquet_rows(self.path, prompt_key, answer_key, self.stats)
        else:
            source = read_rows(self.path, keys=(prompt_key, answer_key))
        for i, row in source:
            self.stats.rows += 1
            try:
                if isinstance(row, BadRow):
                    raise row
                messages, answer = self._parse_row(row, prompt_key, answer_key, system_prompt)
            except BadRow as e:
                msg = f"{self.path}: row {i}: {e}"
                if strict:
                    raise ValueError(msg) from None
                self.stats.bad += 1
                self.stats.reasons[_reason(str(e))] += 1
                first_bad = first_bad or msg
                continue
            if strip_instruction:
                self.stats.instruction_stripped += _strip_instruction(messages)
            if dedupe:
                key = (tuple((m["role"], m["content"]) for m in messages), answer)
                if key in seen:
                    self.stats.duplicates += 1
                    continue
                seen.add(key)
            rows.append((i, messages, answer))
        del seen
        if self.stats.rows == 0:
            raise ValueError(f"{self.path}: empty file, no rows")

        self.items: list[PromptItem] = []
        for start in range(0, len(rows), _TOKENIZE_CHUNK):  # bounded tokenizer-side memory
            chunk = rows[start:start + _TOKENIZE_CHUNK]
            texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for _, m, _ in chunk]
            # The template already holds the special tokens; add_special_tokens=False keeps a
            # tokenizer with a BOS (Llama) from adding a second one.
            ids = tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
            for (i, _, answer), text, tids in zip(chunk, texts, ids):
                if max_prompt_tokens is not None and len(tids) > max_prompt_tokens:
                    self.stats.too_long += 1
                    continue
                self.items.append(PromptItem(i, text, list(tids), answer))
        self.stats.kept = len(self.items)

        if self.stats.bad:
            warnings.warn(f"{self.path}: skipped {self.stats.bad} of {self.stats.rows} rows "
                          f"({dict(self.stats.reasons)}); first: {first_bad}", stacklevel=2)
        if self.stats.duplicates:
            warnings.warn(f"{self.path}: dropped {self.stats.duplicates} duplicate rows (same prompt and answer "
                          f"as an earlier row); {len(rows)} distinct prompts of {self.stats.rows} rows", stacklevel=2)
        if strip_instruction and not self.stats.instruction_stripped and rows:
            warnings.warn(f"{self.path}: strip_instruction is on but no prompt carries DAPO's instruction "
                          f"({DAPO_INSTRUCTION_PREFIX[:40]!r}...); prompts are used as they are", stacklevel=2)
        if self.stats.too_long:
            warnings.warn(f"{self.path}: skipped {self.stats.too_long} prompts longer than "
                          f"max_prompt_tokens={max_prompt_tokens}", stacklevel=2)
        if not self.items:
            raise ValueError(f"{self.path}: no usable prompts among {self.stats.rows} rows "
                             f"(bad: {dict(self.stats.reasons)}, too long: {self.stats.too_long})")

    @staticmethod
    def _parse_row(row: dict, prompt_key: str, answer_key: str,
                   system_prompt: Optional[str]) -> tuple[list[dict], str]:
        prompt = get_field(row, prompt_key)
        if prompt is _MISSING or prompt is None:
            raise BadRow(f"missing prompt field {prompt_key!r} (keys: {sorted(row)})")
        answer = get_field(row, answer_key)
        if answer is _MISSING or answer is None:
            raise BadRow(f"missing answer field {answer_key!r} (keys: {sorted(row)})")
        if isinstance(answer, (dict, list)):
            raise BadRow(f"answer field {answer_key!r} is a {type(answer).__name__}, not a scalar")
        answer = str(answer).strip()
        if not answer:
            raise BadRow(f"empty answer field {answer_key!r}")
        return to_messages(prompt, system_prompt), answer

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> PromptItem:
        return self.items[k]


def _strip_instruction(messages: list[dict]) -> int:
    """Replace each user turn wrapped in DAPO's instruction by its problem, in place.
    Returns 1 if any turn was stripped, else 0."""
    stripped = 0
    for m in messages:
        if m["role"] == "user":
            problem = strip_dapo_instruction(m["content"])
            if problem is not None:
                m["content"] = problem
                stripped = 1
    return stripped


def _reason(msg: str) -> str:
    """A short category for counting ("line 7: invalid JSON (...)" -> "invalid JSON")."""
    msg = re.sub(r"^line \d+: ", "", msg)
    return re.split(r" \(|: |\{", msg, maxsplit=1)[0].strip()


# ---------------------------------------------------------------------------------------
# Checking a file's fields up front, evaluation sets


def check_prompt_fields(path: PathLike, prompt_key: str, answer_key: str, scan: int = 1000) -> None:
    """Raise ValueError, naming the file, the keys and the fields the rows have, when none of
    the first `scan` readable rows of `path` has both `prompt_key` and `answer_key` (the
    dataset would find no usable prompt). Cheap: a Parquet file's first batch only."""
    first: Optional[dict] = None
    for n, (_, row) in enumerate(read_rows(path)):
        if n >= scan:
            break
        if isinstance(row, BadRow):
            continue
        first = first if first is not None else row
        if get_field(row, prompt_key) not in (_MISSING, None) and get_field(row, answer_key) not in (_MISSING, None):
            return
    if first is None:
        raise ValueError(f"{path}: no readable row among the first {scan}")
    raise ValueError(f"{path}: no row has both the prompt field {prompt_key!r} and the answer field "
                     f"{answer_key!r}; the rows have fields {sorted(first, key=str)}")


def resolve_eval_fields(path: PathLike, prompt_key: Optional[str] = None,
                        answer_key: Optional[str] = None) -> tuple[str, str]:
    """The (prompt, answer) field names of an evaluation file: the given ones, checked on its
    first row, or for None the first present among the benchmark loader's usual names
    (benchmarks.PROMPT_KEYS / ANSWER_KEYS: problem/answer for MATH500, DAPO's prompt and
    reward_model.ground_truth, ...). Raises ValueError naming the file, the keys and the row's
    fields."""
    from ..benchmarks import ANSWER_KEYS, PROMPT_KEYS, detect_key

    row: Any = None
    for _, r in read_rows(path):
        row = r
        break
    if row is None:
        raise ValueError(f"{path}: empty file, no rows")
    if isinstance(row, BadRow):
        raise ValueError(f"{path}: row 0: {row}")
    keys = []
    for given, candidates, what in ((prompt_key, PROMPT_KEYS, "prompt"), (answer_key, ANSWER_KEYS, "answer")):
        if given is not None:
            if get_field(row, given) in (_MISSING, None):
                raise ValueError(f"{path}: no {what} field {given!r}; the rows have fields {sorted(row, key=str)}")
            keys.append(given)
        else:
            found = detect_key(row, candidates)
            if found is None:
                raise ValueError(f"{path}: no {what} field; looked for {list(candidates)}, the rows have fields "
                                 f"{sorted(row, key=str)}")
            keys.append(found)
    return keys[0], keys[1]


def load_eval_items(path: PathLike, tokenizer: Any, prompt_key: Optional[str] = None,
                    answer_key: Optional[str] = None, system_prompt: Optional[str] = SYSTEM_PROMPT,
                    limit: Optional[int] = None) -> list[PromptItem]:
    """An evaluation set (MATH500-style problem/answer, AIME, DAPO rows, ...) read with its own
    fields (`resolve_eval_fields`) and the benchmark loader's answer normalisation, templated
    like the training prompts. Raises ValueError naming the file on any unusable row."""
    from ..benchmarks import get_benchmark, load_benchmark

    prompt_key, answer_key = resolve_eval_fields(path, prompt_key, answer_key)
    bench = get_benchmark(str(path)).with_overrides(prompt_key=prompt_key, answer_key=answer_key)
    return load_benchmark(bench, tokenizer, limit=limit, system_prompt=system_prompt)
