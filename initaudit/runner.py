"""One ``check`` run over many models: discover the files, judge each by its own policy, keep
going past a file that cannot be read, and decide the exit code.

The CLI parses flags into these arguments and renders what comes back; nothing here prints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from initaudit.audit import AuditResult, audit_file, display_path
from initaudit.baseline import Baseline
from initaudit.errors import InitauditError, UsageError
from initaudit.policy import CliPolicy, Policy, PolicyResolver, apply
from initaudit.report.model_error import ModelError
from initaudit.rules import Severity

if TYPE_CHECKING:
    from initaudit.frontends import LoadOptions
    from initaudit.montecarlo.measure import MCOptions, Progress

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2

Entry = AuditResult | ModelError


@dataclass
class CheckRun:
    """What a run produced: one entry per model, in the order discovered."""

    entries: list[Entry] = field(default_factory=list)
    #: Each audited model's --fail-on (its own config may set it), by report path.
    fail_on: dict[str, Severity] = field(default_factory=dict)
    #: Findings baselines accepted, over all models.
    suppressed: int = 0
    #: Baseline entries for audited models that match no finding any more (like ruff's unused
    #: noqa): fixed problems or renamed tensors, to drop with --write-baseline.
    stale: int = 0

    @property
    def results(self) -> list[AuditResult]:
        return [e for e in self.entries if isinstance(e, AuditResult)]

    @property
    def errors(self) -> list[ModelError]:
        return [e for e in self.entries if isinstance(e, ModelError)]

    def exit_code(self, exit_zero: bool = False) -> int:
        """2 when a model could not be audited (ruff and mypy: errors outrank findings), else 1
        when a model has findings at or above its --fail-on, unless --exit-zero."""
        if self.errors:
            return EXIT_ERROR
        failed = any(r.fails(self.fail_on[r.path]) for r in self.results)
        return EXIT_FINDINGS if failed and not exit_zero else EXIT_OK


def run_check(
    paths: Sequence[str | Path],
    *,
    cli: CliPolicy,
    config_file: Path | None,
    options: LoadOptions,
    mc: MCOptions | None = None,
    progress: Callable[[Path], Progress | None] | None = None,
    warn: Callable[[str], None] | None = None,
    use_baseline: bool = True,
    debug: bool = False,
) -> CheckRun:
    """Audit every model ``paths`` names (files, directories, globs).

    ``options`` are the loading settings from the flags and the project's config; a model's
    own config may add its input shape and dtype where the flags gave none. A model that fails
    to load becomes a :class:`ModelError` entry and the run goes on; a usage error (a bad flag,
    config or baseline) stops it. ``use_baseline=False`` reports what a baseline would accept
    (for --write-baseline). ``debug`` lets an unexpected exception through, for its traceback.
    """
    resolver = PolicyResolver(cli, config_file, warn=warn)
    # Empty only when --force-exclude dropped every named file (pre-commit staging only excluded
    # models): nothing to judge, exit 0. Paths that match nothing are discover()'s usage errors.
    files = resolver.discover(paths)
    run = CheckRun()
    judged: dict[int, tuple[Baseline, list[AuditResult]]] = {}  # by id: baselines are not hashable
    for path in files:
        policy = resolver.policy_for(path)
        shown = display_path(path)
        try:
            result = audit_file(
                path,
                selection=policy.selection,
                options=_model_options(options, policy),
                mc=mc,
                progress=progress(path) if progress else None,
            )
        except UsageError:
            raise
        except Exception as error:
            # One unreadable model must not hide the verdicts on the others (a CI gate over a
            # directory); the entry says what went wrong and the run exits 2.
            if debug and not isinstance(error, InitauditError | ValueError):
                raise
            run.entries.append(ModelError.from_exception(shown, error))
            continue
        result = apply(policy, result)
        baseline = resolver.baseline_for(policy) if use_baseline else None
        if baseline is not None:
            judged.setdefault(id(baseline), (baseline, []))[1].append(result)
            result, accepted = baseline.filter(result)
            run.suppressed += accepted
        run.entries.append(result)
        run.fail_on[result.path] = policy.fail_on
    run.stale = sum(len(baseline.stale(results)) for baseline, results in judged.values())
    return run


def _model_options(options: LoadOptions, policy: Policy) -> LoadOptions:
    """Flags and the project's config first; the model's config fills in the input's shape and
    dtype (never trust or a factory: those stay with the project, see :mod:`initaudit.config`)."""
    return replace(
        options,
        input_shape=options.input_shape or policy.input_shape,
        input_dtype=options.input_dtype or policy.input_dtype,
    )
