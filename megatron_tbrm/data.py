"""Prompt datasets (JSONL / Parquet), chat templating, a resumable sampler, and the synthetic
arithmetic task of the CPU demo.

    ds = PromptDataset("dapo.parquet", tokenizer=model_dir, prompt_key="prompt",
                       answer_key="reward_model.ground_truth", max_prompt_tokens=1024,
                       strip_instruction=True)      # DAPO's "Answer:" wrapper off, raw problem
    sampler = PromptSampler(ds, batch_size=128, seed=0)
    for batch in sampler: ...                       # list[PromptItem], epochs roll over
    ckpt["data"] = sampler.state_dict(); sampler.load_state_dict(ckpt["data"])

Only the rank that samples (rank 0 in the trainer) loads a dataset; the others hold a
`MirroredSampler`, which keeps the sampler state rank 0 sends with each step. Duplicate rows
(same prompt and answer: the public DAPO-Math-17k parquet repeats each of its ~17.4 k
prompts ~100 times) are dropped and counted before any templating or tokenisation.
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

# The paper's (Qwen2.5-Math's) system prompt.
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

PathLike = Union[str, Path]
_MISSING = object()
_TOKENIZE_CHUNK = 1024  # prompts templated and tokenized per call


@dataclasses.dataclass(frozen=True)
class PromptItem:
    index: int  # row number in the source file (0-based, counting bad rows too)
    prompt: str  # chat-templated text, ending with the assistant generation prompt
    prompt_ids: list[int]
    answer: str  # reference answer for the reward


class BadRow(ValueError):
    pass


# ---------------------------------------------------------------------------------------
# Reading rows


def read_rows(path: PathLike, keys: Optional[Sequence[str]] = None) -> Iterator[tuple[int, Union[dict, BadRow]]]:
    """(row number, row dict or BadRow) for every row of a .jsonl/.json (one object per
    line) or .parquet file. Bad rows are yielded, not raised, so the caller decides.

    `keys` (dotted field names, as for `get_field`): a Parquet file then reads only the
    columns they need; rows are streamed one record batch at a time, never the whole table.
    Raises ValueError for an unknown file extension."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        columns = None
        if keys is not None:
            names = pf.schema_arrow.names
            wanted = {k if k in names else k.split(".")[0] for k in keys}
            columns = [c for c in names if c in wanted]  # a missing field is reported per row
        i = 0
        for batch in pf.iter_batches(batch_size=8192, columns=columns):
            for row in batch.to_pylist():
                yield i, row
                i += 1
    elif suffix in (".jsonl", ".json"):
        with open(path, "rb") as f:
            i = 0
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue  # blank lines (e.g. a trailing newline) are not rows
                try:
                    row = json.loads(raw.decode("utf-8"))
                    if not isinstance(row, dict):
                        raise BadRow(f"line {lineno}: expected a JSON object, got {type(row).__name__}")
                except UnicodeDecodeError as e:
                    row = BadRow(f"line {lineno}: not UTF-8 ({e.reason} at byte {e.start})")
                except json.JSONDecodeError as e:
                    row = BadRow(f"line {lineno}: invalid JSON ({e.msg})")
                except BadRow as e:
                    row = e
                yield i, row
                i += 1
    else:
        raise ValueError(f"{path}: unknown format {suffix!r}; allowed: .jsonl, .json, .parquet")


def _arrow_field(batch: Any, key: str) -> Any:
    """The Arrow array of a dotted field ("reward_model.ground_truth") in a record batch, as
    get_field reads it from a row (a literal column name wins), or None if it is not there."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = batch.schema.names
    if key in names:
        return batch.column(names.index(key))
    parts = key.split(".")
    if parts[0] not in names:
        return None
    arr = batch.column(names.index(parts[0]))
    for part in parts[1:]:
        if not pa.types.is_struct(arr.type) or arr.type.get_field_index(part) < 0:
            return None
        arr = pc.struct_field(arr, part)
    return arr


def _arrow_key_text(arr: Any) -> Any:
    """One string per row that is equal for equal values (null where the value is null or an
    empty list), for a string/number column or a list of {role, content} messages; None for
    any other type (the caller then compares Python rows instead)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return arr
    if pa.types.is_integer(t):
        return pc.cast(arr, pa.string())
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type):
        st = t.value_type
        if st.get_field_index("role") < 0 or st.get_field_index("content") < 0:
            return None
        role, content = pc.struct_field(arr.values, "role"), pc.struct_field(arr.values, "content")
        if not all(pa.types.is_string(x.type) or pa.types.is_large_string(x.type) for x in (role, content)):
            return None
        per_message = pc.binary_join_element_wise(role, content, "\x1f")  # null if either is null
        empty = pc.or_(arr.is_null(), pc.equal(pc.list_value_length(arr), 0))
        lists = type(arr).from_arrays(arr.offsets, per_message, mask=pc.fill_null(empty, True))
        return pc.binary_join(lists, "\x1e")
    return None


def _distinct_parquet_rows(path: Path, prompt_key: str, answer_key: str,
                           stats: "LoadStats") -> Iterator[tuple[int, dict]]:
    """read_rows for a Parquet file, without the rows whose prompt and answer fields are equal
    to an earlier row's: those are counted in `stats.duplicates` (and `stats.rows`) and never
    become Python objects. Equality is decided in Arrow on the raw values; columns of other
    types, and null or empty values, pass through for the caller to judge."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    wanted = {k if k in names else k.split(".")[0] for k in (prompt_key, answer_key)}
    columns = [c for c in names if c in wanted]
    seen: set[str] = set()
    i = 0
    for batch in pf.iter_batches(batch_size=8192, columns=columns):
        parts = [_arrow_field(batch, k) for k in (prompt_key, answer_key)]
        texts = [_arrow_key_text(a) if a is not None else None for a in parts]
        if any(t is None for t in texts):
            keys: list = [None] * batch.num_rows
        else:
            import pyarrow.compute as pc

            keys = pc.binary_join_element_wise(texts[0], texts[1], "\x1d").to_pylist()
        take = []
        for j, key in enumerate(keys):
            if key is None:
                take.append(j)
            elif key in seen:
                stats.duplicates += 1
                stats.rows += 1
            else:
                seen.add(key)
                take.append(j)
        for j, row in zip(take, batch.take(pa.array(take, type=pa.int64())).to_pylist()):
            yield i + j, row
        i += batch.num_rows


def get_field(row: dict, key: str) -> Any:
    """row["a"]["b"] for key "a.b"; a literal key containing dots wins if present."""
    if key in row:
        return row[key]
    cur: Any = row
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


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
# Sampler


class PromptSampler:
    """Endless (or `num_epochs`-long) stream of fixed-size batches over a dataset, reshuffled
    every epoch from (seed, epoch); a batch that reaches the end of an epoch continues into
    the next, so no prompt is dropped. `state_dict()` after a batch + `load_state_dict()`
    resumes with exactly the batches that would have followed."""

    def __init__(self, dataset: Sequence[PromptItem], batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: Optional[int] = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if len(dataset) == 0:
            raise ValueError("PromptSampler: the dataset is empty")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.shuffle, self.num_epochs = shuffle, num_epochs
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if self.shuffle:
            # String seeds hash with SHA-512: stable across Python versions and processes.
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[list[PromptItem]]:
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return

    def next_batch(self) -> list[PromptItem]:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        batch = []
        while len(batch) < self.batch_size:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                break  # the last batch of the last epoch may be short
            batch.append(self.dataset[self._order[self.index]])
            self.index += 1
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "size": len(self.dataset), "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != len(self.dataset):
            raise ValueError(f"sampler state is for a dataset of {state['size']} prompts, "
                             f"this one has {len(self.dataset)} (same file and data.* settings? data.dedupe "
                             f"and data.strip_instruction change the count)")
        if not 0 <= state["index"] < state["size"]:
            raise ValueError(f"sampler state index={state['index']} out of range [0, {state['size']})")
        self.epoch, self.index, self.seed = state["epoch"], state["index"], state["seed"]
        self.shuffle = state.get("shuffle", self.shuffle)
        self._order = self._permutation(self.epoch)


class MirroredSampler:
    """What a rank that does not sample holds in a sampler's place: the sampling rank's
    sampler state as last received (`load_state_dict`, every step in the trainer), so any
    rank reports rank 0's position. It has no dataset and draws no batch."""

    def __init__(self, state: Optional[dict] = None) -> None:
        self._state: Optional[dict] = None
        if state is not None:
            self.load_state_dict(state)

    def load_state_dict(self, state: dict) -> None:
        """Raises ValueError if `state` is not a PromptSampler.state_dict()."""
        need = {"epoch", "index", "seed", "size"}
        if not isinstance(state, dict) or not need <= set(state):
            raise ValueError(f"MirroredSampler: expected a PromptSampler state with keys {sorted(need)}, got {state!r}")
        self._state = dict(state)

    def state_dict(self) -> dict:
        """Raises RuntimeError before any state was received."""
        if self._state is None:
            raise RuntimeError("MirroredSampler: no sampler state received from the sampling rank yet")
        return dict(self._state)

    def next_batch(self) -> list[PromptItem]:
        raise RuntimeError("MirroredSampler: only the sampling rank (rank 0) draws batches; this rank receives them")


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
    from .benchmarks import ANSWER_KEYS, PROMPT_KEYS, detect_key

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
    from .benchmarks import get_benchmark, load_benchmark

    prompt_key, answer_key = resolve_eval_fields(path, prompt_key, answer_key)
    bench = get_benchmark(str(path)).with_overrides(prompt_key=prompt_key, answer_key=answer_key)
    return load_benchmark(bench, tokenizer, limit=limit, system_prompt=system_prompt)


# ---------------------------------------------------------------------------------------
# The synthetic arithmetic task


@dataclasses.dataclass
class TrainingData:
    """What rank 0 loads for a training run: the prompts, their sampler, the evaluation items
    (None without evaluation) and the load counts (floats, logged every step)."""

    dataset: "PromptDataset"
    sampler: "PromptSampler"
    eval_items: Optional[list]
    stats: dict


def load_training_data(cfg, tokenizer: Any) -> TrainingData:
    """The `data` and `eval` sections of a Config -> TrainingData (rank 0 only in the trainer).
    Evaluation prompts longer than data.max_prompt_tokens are skipped with a warning."""
    from .log import get_logger

    log = get_logger(__name__)
    d, e = cfg.data, cfg.eval
    dataset = PromptDataset(d.train_path, tokenizer, d.prompt_key, d.answer_key, d.system_prompt, d.max_prompt_tokens,
                            d.strict, strip_instruction=d.strip_instruction, dedupe=d.dedupe)
    sampler = PromptSampler(dataset, cfg.train.prompts_per_step, seed=d.seed, shuffle=d.shuffle)
    eval_items = None
    if e.every and (e.path or d.eval_path):
        items = load_eval_items(e.path or d.eval_path, tokenizer, e.prompt_key, e.answer_key, d.system_prompt)
        fit = [it for it in items if len(it.prompt_ids) <= d.max_prompt_tokens]
        if len(fit) < len(items):
            log.warning(f"eval: skipped {len(items) - len(fit)} prompts longer than "
                        f"data.max_prompt_tokens={d.max_prompt_tokens}")
        eval_items = fit[: e.max_problems]
    st = dataset.stats
    log.info(f"data: {st.rows} rows -> {len(dataset)} prompts ({st.duplicates} duplicates dropped, {st.bad} bad rows, "
             f"{st.too_long} too long, {st.instruction_stripped} instructions stripped)")
    stats = {"data_rows": float(st.rows), "data_rows_skipped": float(st.bad), "data_rows_duplicate": float(st.duplicates),
             "data_prompts_too_long": float(st.too_long), "data_prompts": float(len(dataset))}
    return TrainingData(dataset, sampler, eval_items, stats)
