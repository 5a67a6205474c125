"""Reading prompt rows from JSONL and Parquet files, with nested fields ("a.b") and bad rows
reported (not raised) one by one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

if TYPE_CHECKING:
    from .prompts import LoadStats

PathLike = Union[str, Path]
_MISSING = object()


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
