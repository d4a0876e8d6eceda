"""Project settings from ``[tool.initaudit]`` in pyproject.toml.

Where settings come from, and why (security):

- The config is the nearest ``pyproject.toml`` found from the **current working directory**
  upward, or the file given with ``--config``. It is never looked up next to the model file.
  ``trust-model = true`` lets files run code when loaded; a downloaded model directory could
  ship a pyproject.toml that grants exactly that, so trust may only come from the project you
  run initaudit in (or a file you name). The residual risk: running initaudit *inside* a
  downloaded repository means trusting that repository's pyproject.toml, so don't. When trust
  comes from a config file the command line says so on stderr, naming the file.
- Command-line flags override the config (``--no-trust-model`` revokes a config's trust).
- Unknown keys are warnings, not errors: a config written for a newer initaudit should not
  break an older one. Known keys with a wrong type are errors, because guessing (above all
  about trust) is worse than stopping.

Keys: ``trust-model`` (bool), ``model`` ("pkg.module:factory"), ``input-shape`` ("1,3,224,224"
or a list of ints), ``input-dtype`` ("float32", "int64", ...).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from initaudit.errors import UsageError

KNOWN_KEYS = ("trust-model", "model", "input-shape", "input-dtype")


@dataclass
class Config:
    trust_model: bool | None = None
    model: str | None = None
    input_shape: tuple[int, ...] | None = None
    input_dtype: str | None = None
    #: The file the settings came from; None when no config was found.
    source: Path | None = None
    warnings: list[str] = field(default_factory=list)


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest pyproject.toml at or above ``start`` (the working directory by default)."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load_config(explicit: Path | None = None, start: Path | None = None) -> Config:
    """Read ``[tool.initaudit]`` from ``explicit`` or the pyproject.toml above ``start``.

    An explicit file may be a pyproject.toml (its ``[tool.initaudit]`` table) or a file whose
    top level holds the keys directly. A missing table is an empty config.
    """
    path = explicit if explicit is not None else find_pyproject(start)
    if path is None:
        return Config()
    try:
        with Path(path).open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: cannot read config ({exc})") from None
    # An explicit file without a [tool] table holds the keys at its top level.
    table = doc.get("tool", {}).get("initaudit", {}) if "tool" in doc or explicit is None else doc
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [tool.initaudit] must be a table")
    return _parse(table, Path(path))


def _parse(table: dict[str, Any], path: Path) -> Config:
    config = Config(source=path)
    for key, value in table.items():
        where = f"{path}: [tool.initaudit] {key}"
        if key == "trust-model":
            if not isinstance(value, bool):
                raise UsageError(f"{where} must be true or false, got {value!r}")
            config.trust_model = value
        elif key == "model":
            if not isinstance(value, str) or ":" not in value:
                raise UsageError(f"{where} must be a string like 'mypkg.models:build', got {value!r}")
            config.model = value
        elif key == "input-shape":
            config.input_shape = _shape(value, where)
        elif key == "input-dtype":
            if not isinstance(value, str):
                raise UsageError(f"{where} must be a string like 'float32', got {value!r}")
            config.input_dtype = value
        else:
            hint = key.replace("_", "-")
            suggestion = f" (did you mean {hint!r}?)" if hint in KNOWN_KEYS else ""
            config.warnings.append(f"{path}: unknown key [tool.initaudit] {key!r} ignored{suggestion}")
    return config


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, str):
        parts: list[Any] = [p.strip() for p in value.split(",")]
        try:
            dims = tuple(int(p) for p in parts)
        except ValueError:
            raise UsageError(f"{where} must look like '1,3,224,224', got {value!r}") from None
    elif isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        dims = tuple(value)
    else:
        raise UsageError(f"{where} must be a list of integers or '1,3,224,224', got {value!r}")
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"{where}: dimensions must be positive, got {value!r}")
    return dims
