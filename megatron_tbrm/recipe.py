"""Recipe files: YAML with inheritance, `key.sub=value` overrides and `${...}` interpolation.

A recipe may start from others:

    defaults: [base/qwen2.5_math_7b.yaml]     # paths relative to this file, merged in order
    rollout:
      n: 1                                    # then this file's keys on top (mappings merge,
    run:                                      # lists and scalars replace)
      dir: runs/qwen2.5-math-7b-tbrm-n1

Bases may have bases of their own (a cycle is an error naming the files). Merging and
interpolation are OmegaConf's: `${parallel.tp}` is another key's value, `${oc.env:VAR}` an
environment variable, `\\${` a literal `${`. Interpolations are resolved last, after the
command-line overrides, so `parallel.tp=4` also moves every value that refers to it.

Every file is checked against the typed schema (config.py) before it is merged, so an unknown
key or a bad value names the file it is in; after merging, each key remembers the file (or
the command line) that set it last, for the errors of the final type check.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import ConfigError

BASES_KEY = "defaults"
COMMAND_LINE = "the command line"

# check(tree, where) raises ConfigError for an unknown key or a bad value of a partial tree;
# where(dotted key) is the text that says where the key was set, appended to the message.
Where = Callable[[str], str]
Check = Callable[[dict, Where], None]


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(tree).__name__}")
    return tree


def _bases(path: Path, tree: dict) -> list[Path]:
    entries = tree.pop(BASES_KEY, None)
    if entries is None:
        return []
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        raise ConfigError(f"config file {path}: '{BASES_KEY}' must be a recipe file or a list of them "
                          f"(paths relative to {path.parent}), got {entries!r}")
    bases = []
    for entry in entries:
        base = path.parent / entry
        if not base.is_file():
            raise ConfigError(f"config file {path}: base recipe {entry!r} in '{BASES_KEY}' not found: {base}")
        bases.append(base)
    return bases


def _leaf_keys(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            yield from _leaf_keys(v, key)
        else:
            yield key


def _merge(trees: list[dict]) -> dict:
    """OmegaConf's merge (mappings merge key by key, the rest is replaced), interpolations kept."""
    try:
        merged = OmegaConf.merge(*(OmegaConf.create(t) for t in trees))
        return OmegaConf.to_container(merged, resolve=False)
    except OmegaConfBaseException as e:  # the trees were checked: not expected
        raise ConfigError(f"config key '{e.full_key}': {str(e).splitlines()[0]}") from None


def _load(path: Path, check: Check, chain: tuple[Path, ...], origin: dict[str, str]) -> dict:
    """The recipe at `path` with its bases merged in; records in `origin` who set each key."""
    resolved = path.resolve()
    if resolved in chain:
        files = [str(p) for p in chain[chain.index(resolved):]] + [str(resolved)]
        raise ConfigError(f"recipe inheritance cycle in '{BASES_KEY}': {' -> '.join(files)}")
    tree = read_yaml(path)
    bases = _bases(path, tree)
    check(tree, lambda key: f" (in {path})")
    trees = [_load(base, check, chain + (resolved,), origin) for base in bases]
    origin.update((key, str(path)) for key in _leaf_keys(tree))
    return _merge(trees + [tree]) if trees else tree


def apply_override(tree: dict, item: str) -> str:
    """Set `key.sub=value` (value read as YAML) in `tree`; returns the dotted key."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. "a: b: c", "[1"): the raw text, type-checked like any value
    parts = key.strip().split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: '{p}' is not a section")
    node[parts[-1]] = value
    return ".".join(parts)


def _resolve(tree: dict, where: Where) -> dict:
    try:
        return OmegaConf.to_container(OmegaConf.create(tree), resolve=True)
    except OmegaConfBaseException as e:
        key = str(e.full_key)
        raise ConfigError(f"config key '{key}': cannot resolve its interpolation: "
                          f"{str(e).splitlines()[0]}{where(key)}") from None


def load_tree(path: Optional[Path], overrides: list[str], check: Check) -> tuple[dict, Where]:
    """The recipe at `path` (or none) with its bases and `overrides`, interpolations resolved,
    and where(key): where the key was set last (a file or the command line; '' for defaults)."""
    origin: dict[str, str] = {}
    tree = _load(Path(path), check, (), origin) if path is not None else {}
    for item in overrides:
        key = apply_override(tree, item)
        for k in [k for k in origin if k.startswith(key + ".")]:
            del origin[k]
        origin[key] = COMMAND_LINE

    def where(key: str) -> str:
        parts = key.split(".")
        # The key, else the section that was set as a whole, else the last key set inside it.
        setters = [origin[k] for k in (".".join(parts[:n]) for n in range(len(parts), 0, -1)) if k in origin]
        setters = setters or [v for k, v in origin.items() if k.startswith(key + ".")][-1:]
        return f" (from {setters[0]})" if setters else ""

    check(tree, where)  # the overrides' keys and values
    return _resolve(tree, where), where
