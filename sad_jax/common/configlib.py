"""Config files as `get_config(arg)` Python modules, with `--config.a.b=value` overrides.

`load("configs/x.py:arg", ["--config.a.b=3"])` imports the file, calls get_config(arg),
applies the overrides (typed like the field they replace) and locks the config, so
that an unknown key is an error, not a silent new field.

A config is a path to a file, or a packaged config (`sad_jax/configs/`) by name: `x`,
`x.py` or `configs/x.py` when no such file exists (the docs' spelling, which then works
from any folder and from an installed wheel).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
import traceback
from collections.abc import Sequence

import ml_collections

from sad_jax.common.errors import DataError

PACKAGED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def packaged_names() -> list[str]:
  return sorted(n[:-3] for n in os.listdir(PACKAGED) if n.endswith(".py") and n[0] != "_")


def resolve(path: str) -> str:
  """The file of a config: `path` when it exists, else the packaged config it names."""
  if os.path.exists(path):
    return path
  folder, name = os.path.split(path)
  name = name[:-3] if name.endswith(".py") else name
  if os.path.basename(folder) in ("", "configs") and name in packaged_names():
    return os.path.join(PACKAGED, name + ".py")
  raise DataError("config file not found (a path, or a packaged config: "
                  f"{', '.join(packaged_names())})", path=path)


def _import_file(path: str):
  if os.path.dirname(os.path.abspath(path)) != PACKAGED:
    # a user's configs may import siblings as `configs.x`: the folder above is importable
    parent = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if parent not in sys.path:
      sys.path.insert(0, parent)
  name = "_sad_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise DataError("cannot import config file", path=path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise DataError(f"syntax error at line {e.lineno}: {e.msg}", path=path) from None
  except Exception as e:  # the config is user code: report it, located, without a traceback
    raise DataError(f"{_where(e, path)}{type(e).__name__}: {e}", path=path) from None
  return module


def _where(e: BaseException, path: str) -> str:
  """'line N: ' of the innermost frame of the config file in e's traceback, if any."""
  frames = [f for f in traceback.extract_tb(e.__traceback__)
            if os.path.abspath(f.filename) == os.path.abspath(path)]
  return f"line {frames[-1].lineno}: " if frames else ""


def _parse_value(text: str, old):
  if isinstance(old, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError(f"expected a boolean, got {text!r}")
  if isinstance(old, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(old, float) and isinstance(value, int):
    value = float(value)
  if isinstance(old, tuple) and isinstance(value, (list, str)):
    value = tuple(value) if isinstance(value, list) else (value,)
  if old is not None and not isinstance(value, type(old)):
    raise ValueError(f"expected {type(old).__name__}, got {text!r}")
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  for item in overrides:
    if not item.startswith("--config."):
      raise DataError(f"unknown argument {item!r} (overrides look like --config.a.b=value)")
    key, sep, text = item[len("--config."):].partition("=")
    if not sep:
      raise DataError(f"override {item!r} has no '='")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
        raise DataError(f"unknown config key {key!r}", field=key)
      node = node[p]
    if leaf not in node:
      raise DataError(f"unknown config key {key!r}; known here: {', '.join(sorted(node))}",
                      field=key)
    try:
      node[leaf] = _parse_value(text, node[leaf])
    except (ValueError, TypeError) as e:
      raise DataError(f"bad value for {key}: {e}", field=key) from None


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`path.py[:arg]` → a locked ConfigDict with overrides applied."""
  path, _, arg = spec.partition(":")
  path = resolve(path)
  module = _import_file(path)
  if not hasattr(module, "get_config"):
    raise DataError("config file has no get_config(arg)", path=path)
  try:
    config = module.get_config(arg or None)
  except Exception as e:  # user code; configs raise ValueError for an argument they refuse
    kind = "" if isinstance(e, ValueError) else f"{type(e).__name__}: "
    raise DataError(f"get_config({arg or None!r}): {_where(e, path)}{kind}{e}", path=path,
                    field="get_config") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise DataError(f"get_config returned {type(config).__name__}, not an "
                    "ml_collections.ConfigDict", path=path, field="get_config")
  apply_overrides(config, overrides)
  config.lock()
  return config
