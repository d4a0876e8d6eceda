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

Policy keys (see :mod:`initaudit.policy`) are different: they say what to report, not what to
run, so they are also read from the nearest ``pyproject.toml`` with a ``[tool.initaudit]`` table
above each model (:func:`find_config_above`), and ``trust-model``/``model`` found there are
ignored with a warning.

Keys: ``trust-model`` (bool), ``model`` ("pkg.module:factory"), ``input-shape`` ("1,3,224,224"
or a list of ints), ``input-dtype`` ("float32", "int64", ...); policy: ``select``, ``ignore``
(lists of codes or prefixes), ``per-file-ignores`` ({glob: [codes]}), ``severity`` ({code:
"error"|"warning"|"info"|"off"}), ``fail-on``, ``exclude``, ``extend-exclude`` (lists of globs),
``force-exclude`` (bool), ``respect-gitignore`` (bool, default true), ``baseline`` (a path).
Paths and globs are relative to the directory holding the config file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from initaudit.errors import UsageError

#: Keys that decide what runs on load: read only from the project's config (see above).
TRUST_KEYS = ("trust-model", "model")
POLICY_KEYS = (
    "select",
    "ignore",
    "per-file-ignores",
    "severity",
    "fail-on",
    "exclude",
    "extend-exclude",
    "force-exclude",
    "respect-gitignore",
    "baseline",
)
KNOWN_KEYS = (*TRUST_KEYS, "input-shape", "input-dtype", *POLICY_KEYS)
SEVERITY_VALUES = ("error", "warning", "info", "off")


@dataclass
class Config:
    trust_model: bool | None = None
    model: str | None = None
    input_shape: tuple[int, ...] | None = None
    input_dtype: str | None = None
    # Policy; None means "not set here" so that flags and defaults can tell.
    select: list[str] | None = None
    ignore: list[str] | None = None
    #: glob -> codes, in file order (a later pattern adds to an earlier one that also matches).
    per_file_ignores: dict[str, list[str]] = field(default_factory=dict)
    #: code or prefix -> "error" | "warning" | "info" | "off".
    severity: dict[str, str] = field(default_factory=dict)
    fail_on: str | None = None
    exclude: list[str] | None = None
    extend_exclude: list[str] = field(default_factory=list)
    force_exclude: bool | None = None
    #: Skip what git ignores while walking directories (None: not set here; the default is true).
    respect_gitignore: bool | None = None
    #: Absolute: resolved against the config file's directory.
    baseline: Path | None = None
    #: The file the settings came from; None when no config was found.
    source: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def root(self) -> Path | None:
        """The directory the config's globs and paths are relative to."""
        return self.source.parent if self.source is not None else None

    @property
    def grants_execution(self) -> bool:
        """Whether the config sets a key that may make loading run code."""
        return self.trust_model is not None or self.model is not None


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest pyproject.toml at or above ``start`` (the working directory by default)."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def has_initaudit_table(path: Path) -> bool:
    """Whether ``path`` (a pyproject.toml) has a ``[tool.initaudit]`` table. An unreadable file
    counts as having one, so that reading it reports the problem instead of skipping it."""
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return True
    tool = doc.get("tool")
    return isinstance(tool, dict) and "initaudit" in tool


def find_config_above(start: Path) -> Path | None:
    """The nearest pyproject.toml at or above the directory ``start`` that has a
    ``[tool.initaudit]`` table (ruff's rule: a pyproject.toml without the table, such as a
    sub-package's, does not hide the project's)."""
    here = start.resolve()
    for directory in (here, *here.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file() and has_initaudit_table(candidate):
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
    return read_config(Path(path), explicit=explicit is not None)


def read_config(path: Path, explicit: bool = False) -> Config:
    """Parse one config file; see :func:`load_config` for ``explicit``."""
    try:
        with Path(path).open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: cannot read config ({exc})") from None
    # An explicit file without a [tool] table holds the keys at its top level.
    table = doc.get("tool", {}).get("initaudit", {}) if "tool" in doc or not explicit else doc
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [tool.initaudit] must be a table")
    return _parse(table, Path(path))


def _parse(table: dict[str, Any], path: Path) -> Config:
    config = Config(source=path)
    for key, value in table.items():
        where = f"{path}: [tool.initaudit] {key}"
        if key == "trust-model":
            config.trust_model = _bool(value, where)
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
        elif key in POLICY_KEYS:
            _policy_key(config, key, value, where)
        else:
            hint = key.replace("_", "-")
            suggestion = f" (did you mean {hint!r}?)" if hint in KNOWN_KEYS else ""
            config.warnings.append(f"{path}: unknown key [tool.initaudit] {key!r} ignored{suggestion}")
    return config


def _policy_key(config: Config, key: str, value: Any, where: str) -> None:
    if key in ("select", "ignore"):
        setattr(config, key, _codes(value, where))
    elif key == "per-file-ignores":
        if not isinstance(value, dict):
            raise UsageError(f'{where} must be a table like {{"legacy/*.onnx" = ["IA103"]}}')
        config.per_file_ignores = {
            _glob(pattern, where): _codes(codes, f"{where} {pattern!r}") for pattern, codes in value.items()
        }
    elif key == "severity":
        if not isinstance(value, dict):
            raise UsageError(f'{where} must be a table like {{IA103 = "error"}}')
        config.severity = {}
        for code, level in value.items():
            (checked,) = _codes([code], where)
            if not isinstance(level, str) or level.lower() not in SEVERITY_VALUES:
                raise UsageError(
                    f"{where} {code}: expected one of {', '.join(SEVERITY_VALUES)}, got {level!r}"
                )
            config.severity[checked] = level.lower()
    elif key == "fail-on":
        if not isinstance(value, str) or value.lower() not in ("info", "warning", "error"):
            raise UsageError(f'{where} must be "info", "warning" or "error", got {value!r}')
        config.fail_on = value.lower()
    elif key in ("exclude", "extend-exclude"):
        patterns = _strings(value, where, 'globs like ["legacy/", "*.tmp.onnx"]')
        setattr(config, key.replace("-", "_"), [_glob(p, where) for p in patterns])
    elif key == "force-exclude":
        config.force_exclude = _bool(value, where)
    elif key == "respect-gitignore":
        config.respect_gitignore = _bool(value, where)
    else:  # baseline
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f'{where} must be a path like "initaudit-baseline.json", got {value!r}')
        assert config.source is not None  # _parse sets it first
        config.baseline = (config.source.parent / value).absolute()


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{where} must be true or false, got {value!r}")
    return value


def _strings(value: Any, where: str, example: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where} must be a list of {example}, got {value!r}")
    return value


def _codes(value: Any, where: str) -> list[str]:
    """Rule codes or prefixes, upper-cased, each matching at least one rule."""
    from initaudit.rules import RULES  # the rule table, not the checks: cheap once audit runs anyway

    codes = [code.strip().upper() for code in _strings(value, where, 'rule codes like ["IA103", "IA9"]')]
    for code in codes:
        if not code or not any(known.startswith(code) for known in RULES):
            raise UsageError(f"{where}: unknown rule code or prefix {code!r} (see `initaudit rules`)")
    return codes


def _glob(pattern: Any, where: str) -> str:
    if not isinstance(pattern, str) or not pattern.strip():
        raise UsageError(f"{where}: a glob must be a non-empty string, got {pattern!r}")
    from initaudit.discover import compile_glob

    try:
        compile_glob(pattern)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None
    return pattern


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
