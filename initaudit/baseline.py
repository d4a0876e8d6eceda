"""Baselines: accept today's findings so that CI fails only on new ones.

A baseline is a JSON file listing findings by fingerprint (:meth:`Finding.fingerprint`: rule
code, the model's path, tensor or node name, and for a finding without one its message with the
numbers blanked; never byte offsets or numbers). The
path in a fingerprint is relative to the baseline file's directory, in POSIX form, so the same
baseline works from any working directory, on any OS, and in a clone at any other place. The
file is sorted and has no timestamp: rewriting it after no change gives the same bytes, and a
diff shows exactly which findings were accepted or fixed.

Matching counts: a fingerprint listed twice suppresses two findings with that fingerprint (two
notes that differ only in a number share one), and a third is new.

Baselines written before findings without a location were told apart by their message hold the
old fingerprint (``code|path|``) for each of them; :func:`load_baseline` recomputes those from
the entry's stored message, so such a baseline keeps accepting exactly what it listed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from initaudit import __version__
from initaudit.atomic import write_text
from initaudit.discover import absolute_path
from initaudit.errors import UsageError

if TYPE_CHECKING:
    from initaudit.audit import AuditResult

BASELINE_VERSION = 1
_ENTRY_KEYS = ("fingerprint", "code", "path", "location", "message")


@dataclass(frozen=True)
class BaselineEntry:
    fingerprint: str
    code: str = ""
    path: str = ""
    location: str = ""
    message: str = ""


@dataclass
class Baseline:
    """Accepted findings, loaded from :attr:`source`; model paths are relative to :attr:`root`."""

    source: Path
    root: Path
    entries: list[BaselineEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._counts = Counter(entry.fingerprint for entry in self.entries)

    def key_path(self, result: AuditResult) -> str:
        """The model's path as the baseline's fingerprints use it."""
        return relative_path(result.path, self.root)

    def filter(self, result: AuditResult) -> tuple[AuditResult, int]:
        """``result`` without the findings the baseline accepts, and how many those were. The
        result's :attr:`~AuditResult.suppressed` count grows by the same number."""
        path = self.key_path(result)
        used: Counter[str] = Counter()
        kept = []
        for finding in result.findings:
            fingerprint = finding.fingerprint(path)
            if used[fingerprint] < self._counts[fingerprint]:
                used[fingerprint] += 1
            else:
                kept.append(finding)
        suppressed = len(result.findings) - len(kept)
        return replace(result, findings=kept, suppressed=result.suppressed + suppressed), suppressed

    def stale(self, results: Iterable[AuditResult]) -> list[BaselineEntry]:
        """Entries for the audited models that match no finding any more (fixed, or the tensor was
        renamed): candidates to drop with ``--write-baseline``. Entries for models this run did
        not audit are not stale (pre-commit audits only the staged files).

        ``results`` must be the findings *before* :meth:`filter`, after the policy."""
        present: Counter[str] = Counter()
        audited = set()
        for result in results:
            path = self.key_path(result)
            audited.add(path)
            present.update(f.fingerprint(path) for f in result.findings)
        stale = []
        for entry in self.entries:
            if entry.path in audited:
                if present[entry.fingerprint] > 0:
                    present[entry.fingerprint] -= 1
                else:
                    stale.append(entry)
        return stale

    def __len__(self) -> int:
        return len(self.entries)


def relative_path(model: str | Path, root: Path) -> str:
    """``model`` relative to ``root``, POSIX, with symlinked directories resolved on both sides
    (``..`` where the model lies outside the root)."""
    return Path(os.path.relpath(absolute_path(Path(model)), absolute_path(root))).as_posix()


def entries_for(results: Sequence[AuditResult], root: Path) -> list[BaselineEntry]:
    """One entry per finding, sorted by path, code, location, fingerprint."""
    entries = []
    for result in results:
        path = relative_path(result.path, root)
        for f in result.findings:
            entries.append(BaselineEntry(f.fingerprint(path), f.code, path, f.location, f.message))
    return sorted(entries, key=lambda e: (e.path, e.code, e.location, e.fingerprint, e.message))


def write_baseline(results: Sequence[AuditResult], path: Path, root: Path | None = None) -> int:
    """Write every finding of ``results`` to the baseline ``path`` atomically; returns the number
    of entries. Model paths are relative to ``root``, by default (and preferably) the baseline's
    own directory; another root is stored relative to that directory.

    Pass the results after the policy (select, ignore, per-file-ignores, severities) and without
    an existing baseline's filter: the new file replaces the old one.
    """
    path = Path(path)
    directory = path.absolute().parent
    if not directory.is_dir():
        raise UsageError(f"--write-baseline {path}: directory {directory} does not exist")
    root = Path(root) if root is not None else directory
    entries = entries_for(results, root)
    document = {
        "version": BASELINE_VERSION,
        "tool": "initaudit",
        "tool_version": __version__,
        "root": relative_path(root, directory),
        "entries": [{key: getattr(e, key) for key in _ENTRY_KEYS} for e in entries],
    }
    write_text(path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return len(entries)


def load_baseline(path: Path) -> Baseline:
    """Read a baseline written by :func:`write_baseline`. A missing or malformed file is a
    :class:`UsageError` naming it."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"baseline {path}: no such file (create it with --write-baseline {path})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"baseline {path}: not a readable JSON baseline ({exc})") from None
    if not isinstance(document, dict) or not isinstance(document.get("entries"), list):
        raise UsageError(f"baseline {path}: expected an object with an 'entries' list")
    version = document.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise UsageError(f"baseline {path}: 'version' must be an integer, got {version!r}")
    if version > BASELINE_VERSION:
        raise UsageError(
            f"baseline {path}: version {version} was written by a newer initaudit "
            f"({document.get('tool_version', '?')}); this is {__version__}"
        )
    root_text = document.get("root", ".")
    if not isinstance(root_text, str):
        raise UsageError(f"baseline {path}: 'root' must be a path, got {root_text!r}")
    entries = [_upgrade(_entry(raw, n, path)) for n, raw in enumerate(document["entries"])]
    return Baseline(source=path, root=path.absolute().parent / root_text, entries=entries)


def _entry(raw: Any, index: int, path: Path) -> BaselineEntry:
    where = f"baseline {path}: entry {index}"
    if not isinstance(raw, dict):
        raise UsageError(f"{where} must be an object, got {raw!r}")
    fingerprint = raw.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise UsageError(f"{where} has no 'fingerprint'")
    values = {key: raw.get(key, "") for key in _ENTRY_KEYS[1:]}
    for key, value in values.items():
        if not isinstance(value, str):
            raise UsageError(f"{where}: '{key}' must be a string, got {value!r}")
    return BaselineEntry(fingerprint, **values)


def _upgrade(entry: BaselineEntry) -> BaselineEntry:
    """``entry`` with today's fingerprint where it holds the one every finding without a location
    shared before their messages counted (``code|path|``); other entries unchanged."""
    if entry.location or not entry.code:
        return entry
    shared = hashlib.sha256(f"{entry.code}|{entry.path}|".encode()).hexdigest()[:16]
    if entry.fingerprint != shared:
        return entry
    from initaudit.rules import Finding, Severity  # the severity is not part of a fingerprint

    return replace(
        entry, fingerprint=Finding(entry.code, Severity.INFO, entry.message).fingerprint(entry.path)
    )
