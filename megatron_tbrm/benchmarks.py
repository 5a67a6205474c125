"""Evaluation benchmarks: the paper's presets and loaders for the files users bring.

    bench = get_benchmark("aime24")                   # k=32, temperature 1.0
    items = load_benchmark(bench, tokenizer, data_dir="data/benchmarks", limit=None)

Presets follow the paper's protocol: AIME24, AIME25 and AMC23 are reported as avg@32 at
temperature 1.0; MATH500, Minerva Math and OlympiadBench as avg@1 at temperature 0 (greedy).
Responses are capped at 3072 tokens, as in common Qwen2.5-Math evaluation setups.

Nothing is downloaded. A benchmark's data is a local JSONL / JSON-lines / Parquet file in
`data_dir`, found under one of the usual names (aime24.jsonl, aime_2024.parquet,
math500/test.jsonl, ...), with the prompt and answer fields detected among the usual ones
(problem / question / prompt; answer / final_answer / expected_answer / ground_truth /
solution). A list-valued answer (OlympiadBench's final_answer) takes its first element; a
solution without a separate answer field gives its last \\boxed{}. The `mini` preset is a
20-problem arithmetic/algebra set shipped in the package (megatron_tbrm/benchmark_data/mini_math.jsonl) for
tests and the CPU demo. Any other path to a data file works as an ad-hoc benchmark (avg@1,
greedy).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from megatron_tbrm.data.rows import _MISSING  # get_field's "no such field"
from megatron_tbrm.data import (SYSTEM_PROMPT, BadRow, PromptItem, get_field, load_tokenizer,
                                read_rows, to_messages)
from megatron_tbrm.reward import extract_boxed

PathLike = Union[str, Path]

MINI_MATH = Path(__file__).resolve().parent / "benchmark_data" / "mini_math.jsonl"  # package data
DATA_DIR_ENV = "TBRM_BENCHMARK_DIR"  # default --data-dir
EXTENSIONS = (".jsonl", ".json", ".parquet")

# Field names in the order they are tried.
PROMPT_KEYS = ("problem", "question", "prompt", "Problem", "Question", "input", "query")
ANSWER_KEYS = ("answer", "final_answer", "expected_answer", "ground_truth", "reward_model.ground_truth",
               "gt", "target", "Answer", "solution")


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    k: int  # samples per problem: the score is avg@k (and pass@k)
    temperature: float
    top_p: float = 1.0
    max_tokens: int = 3072
    file_stems: tuple[str, ...] = ()  # names looked for in data_dir (without extension)
    path: Optional[str] = None  # a fixed file (the shipped mini set, or an ad-hoc benchmark)
    prompt_key: Optional[str] = None  # None: auto-detect among PROMPT_KEYS
    answer_key: Optional[str] = None  # None: auto-detect among ANSWER_KEYS

    def with_overrides(self, **kw: Any) -> "Benchmark":
        """A copy with the given settings replaced; None values are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})

    def candidates(self, data_dir: Path) -> list[Path]:
        """Files that may hold this benchmark, in the order they are tried."""
        out = []
        for stem in self.file_stems:
            out += [data_dir / f"{stem}{ext}" for ext in EXTENSIONS]
            out += [data_dir / stem / f"test{ext}" for ext in EXTENSIONS]
        return out


def _preset(name: str, k: int, temperature: float, *stems: str) -> Benchmark:
    return Benchmark(name, k=k, temperature=temperature, file_stems=(name, *stems))


PRESETS: dict[str, Benchmark] = {b.name: b for b in (
    _preset("aime24", 32, 1.0, "aime_2024", "aime-2024", "aime2024", "AIME24", "AIME_2024"),
    _preset("aime25", 32, 1.0, "aime_2025", "aime-2025", "aime2025", "AIME25", "AIME_2025"),
    _preset("amc23", 32, 1.0, "amc_2023", "amc-2023", "amc2023", "amc", "AMC23"),
    _preset("math500", 1, 0.0, "math_500", "math-500", "MATH500", "MATH-500"),
    _preset("minerva", 1, 0.0, "minerva_math", "minerva-math", "minervamath", "Minerva"),
    _preset("olympiadbench", 1, 0.0, "olympiad_bench", "olympiad-bench", "olympiadbench_en", "OlympiadBench"),
    Benchmark("mini", k=1, temperature=0.0, max_tokens=256, path=str(MINI_MATH)),
)}
PAPER_BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")
ALIASES = {"minerva_math": "minerva", "olympiad_bench": "olympiadbench", "math_500": "math500",
           "aime_2024": "aime24", "aime_2025": "aime25", "amc_2023": "amc23"}


def get_benchmark(name_or_path: str) -> Benchmark:
    """A preset by name (case-insensitive), or an ad-hoc avg@1 greedy benchmark for a path
    to a .jsonl/.json/.parquet file."""
    key = name_or_path.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    p = Path(name_or_path)
    if p.suffix.lower() in EXTENSIONS:
        if not p.is_file():
            raise FileNotFoundError(f"benchmark file {p} does not exist")
        return Benchmark(p.stem, k=1, temperature=0.0, path=str(p))
    raise KeyError(f"unknown benchmark {name_or_path!r}; presets: {', '.join(PRESETS)} "
                   f"(or a path to a {'/'.join(EXTENSIONS)} file)")


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, "data/benchmarks"))


def find_data_file(bench: Benchmark, data_dir: Optional[PathLike] = None) -> Path:
    """The file holding `bench`'s problems; FileNotFoundError names the folder and every
    name that would have been accepted."""
    if bench.path is not None:
        p = Path(bench.path)
        if not p.is_file():
            raise FileNotFoundError(f"benchmark {bench.name!r}: data file {p} does not exist")
        return p
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    candidates = bench.candidates(data_dir)
    for p in candidates:
        if p.is_file():
            return p
    exts = "|".join(e.lstrip(".") for e in EXTENSIONS)
    raise FileNotFoundError(
        f"benchmark {bench.name!r}: no data file in {data_dir}"
        f"{'' if data_dir.is_dir() else ' (the folder does not exist)'}. Expected NAME.{{{exts}}} or "
        f"NAME/test.{{{exts}}} with NAME one of: {', '.join(bench.file_stems)}, e.g. {bench.name}.jsonl. "
        f"Bring the public file (nothing is downloaded) and pass --data-dir "
        f"(default: ${DATA_DIR_ENV} or ./data/benchmarks).")


# ---------------------------------------------------------------------------------------
# Rows -> (prompt, answer)


def detect_key(row: dict, candidates: Sequence[str]) -> Optional[str]:
    for key in candidates:
        if get_field(row, key) not in (_MISSING, None):
            return key
    return None


def normalize_answer(value: Any, key: str) -> str:
    r"""A reference answer as the reward expects it: a string, first element of a list,
    surrounding $...$ removed; from a full solution, its last \boxed{}."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise BadRow(f"answer field {key!r} is an empty list")
        value = value[0]
    if isinstance(value, dict):
        raise BadRow(f"answer field {key!r} is a dict, not a scalar")
    text = str(value).strip()
    if key == "solution" or ("\\boxed" in text and len(text) > 40):
        boxed = extract_boxed(text)
        if boxed is None and key == "solution":
            raise BadRow("solution field has no \\boxed{} answer")
        text = boxed if boxed is not None else text
    while len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text[1:-1].strip()
    if not text:
        raise BadRow(f"empty answer field {key!r}")
    return text


def load_rows(path: PathLike, prompt_key: Optional[str] = None,
              answer_key: Optional[str] = None) -> list[tuple[int, Any, str]]:
    """(row number, prompt, answer) for every row of a benchmark file. Fields are detected
    on the first row unless given; any unusable row is an error (benchmarks must be whole)."""
    path = Path(path)
    out: list[tuple[int, Any, str]] = []
    for i, row in read_rows(path):
        if isinstance(row, BadRow):
            raise ValueError(f"{path}: row {i}: {row}")
        if prompt_key is None:
            prompt_key = detect_key(row, PROMPT_KEYS)
            if prompt_key is None:
                raise ValueError(f"{path}: no prompt field; looked for {list(PROMPT_KEYS)}, "
                                 f"the rows have {sorted(row)} (set prompt_key)")
        if answer_key is None:
            answer_key = detect_key(row, ANSWER_KEYS)
            if answer_key is None:
                raise ValueError(f"{path}: no answer field; looked for {list(ANSWER_KEYS)}, "
                                 f"the rows have {sorted(row)} (set answer_key)")
        prompt, answer = get_field(row, prompt_key), get_field(row, answer_key)
        try:
            if prompt is _MISSING or prompt is None:
                raise BadRow(f"missing prompt field {prompt_key!r}")
            if answer is _MISSING or answer is None:
                raise BadRow(f"missing answer field {answer_key!r}")
            out.append((i, prompt, normalize_answer(answer, answer_key)))
        except BadRow as e:
            raise ValueError(f"{path}: row {i}: {e} (keys: {sorted(row)})") from None
    if not out:
        raise ValueError(f"{path}: empty file, no problems")
    return out


def load_benchmark(bench: Union[str, Benchmark], tokenizer: Any, data_dir: Optional[PathLike] = None,
                   limit: Optional[int] = None,
                   system_prompt: Optional[str] = SYSTEM_PROMPT) -> list[PromptItem]:
    """The problems of `bench` as chat-templated, tokenized PromptItems (the training
    prompt format: the paper's system prompt + the problem as the user turn)."""
    bench = get_benchmark(bench) if isinstance(bench, str) else bench
    path = find_data_file(bench, data_dir)
    rows = load_rows(path, bench.prompt_key, bench.answer_key)
    if limit is not None:
        rows = rows[:limit]
    tok = load_tokenizer(tokenizer)
    items = []
    for i, prompt, answer in rows:
        try:
            messages = to_messages(prompt, system_prompt)
        except BadRow as e:
            raise ValueError(f"{path}: row {i}: {e}") from None
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        items.append(PromptItem(i, text, list(ids), answer))
    return items
