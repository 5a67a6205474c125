"""Reading a Hugging Face folder's weights: model.safetensors or a sharded index, headers
checked (truncated or corrupt shards named), tensors read lazily, one slice at a time."""
from __future__ import annotations

import json
import struct
from contextlib import ExitStack
from pathlib import Path


class WeightsError(ValueError):
    """The HF weights do not fit the model: a missing/truncated file, tensor or shape."""


def _safetensors_header(path: Path) -> dict:
    """The header of a .safetensors file, checked against the file's size (a truncated
    download otherwise fails later, deep inside a read, or reads garbage)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"shard file {path} is truncated: {size} bytes, not even a header")
        n = struct.unpack("<Q", head)[0]
        if 8 + n > size:
            raise WeightsError(f"shard file {path} is truncated: {size} bytes, its header alone needs {8 + n}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise WeightsError(f"shard file {path} has a corrupt header: {e}") from None
    header.pop("__metadata__", None)
    end = 8 + n + max((t["data_offsets"][1] for t in header.values()), default=0)
    if end > size:
        raise WeightsError(f"shard file {path} is truncated: {size} bytes, its tensors need {end}")
    return header


class HFWeights:
    """Lazy, sliced access to the tensors of an HF folder (one model.safetensors or shards
    listed in model.safetensors.index.json). Opening validates every file's header, so all
    ranks fail the same way before any collective starts."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            weight_map = {k: single.name for k in _safetensors_header(single)}
        else:
            raise WeightsError(f"{self.dir}: no model.safetensors or model.safetensors.index.json "
                               f"(only safetensors weights are supported)")
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for fname in sorted(set(weight_map.values())):
            path = self.dir / fname
            if not path.is_file():
                raise WeightsError(f"shard file {path} is missing (listed in {index.name})")
            header = _safetensors_header(path)
            for name, meta in header.items():
                if weight_map.get(name) == fname:
                    self.files[name] = path
                    self.shapes[name] = tuple(meta["shape"])
                    self.dtypes[name] = meta["dtype"]
        for name, fname in weight_map.items():
            if name not in self.files:
                raise WeightsError(f"tensor {name!r} is listed in {index.name} but missing from shard file {fname}")
        self._stack = ExitStack()
        self._open: dict[Path, object] = {}


    def slice(self, name: str):
        """A safetensors slice: index it (`[a:b]`, `[:, a:b]`) to read only those elements."""
        from safetensors import safe_open

        path = self.files[name]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._open[path].get_slice(name)

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def __enter__(self) -> "HFWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
