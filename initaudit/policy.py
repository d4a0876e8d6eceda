"""Policy: which findings count, how much, and for which files, per model.

Where each setting comes from:

- Policy keys (``select``, ``ignore``, ``per-file-ignores``, ``severity``, ``fail-on``,
  ``exclude``, ``extend-exclude``, ``force-exclude``, ``baseline``) and the input keys
  (``input-shape``, ``input-dtype``) come from the nearest ``pyproject.toml`` with a
  ``[tool.initaudit]`` table above each model (looked up once per directory), falling back to the
  project's config (the working directory's, see :mod:`initaudit.config`) when there is none.
  With ``--config`` that one file decides for every model.
- ``trust-model`` and ``model`` decide what code runs, so they come only from the project's
  config or ``--config``; found in a config beside a model they are ignored with a warning
  naming the file (a downloaded model cannot grant itself trust).
- How paths are walked (``force-exclude``, ``respect-gitignore``, and the ``exclude`` patterns
  applied while walking) comes from the project's config: one walk, one answer. A sub-project's
  ``exclude`` still drops its own files afterwards; its ``respect-gitignore`` is not read.
- Command-line flags replace the config's value for the same key (``--select``, ``--ignore``,
  ``--fail-on``, ``--baseline``, ``--exclude``, ``--[no-]force-exclude``,
  ``--[no-]respect-gitignore``); ``--extend-exclude`` adds to it.
- Globs and paths in a config are relative to the directory holding that config file.

Severity overrides rewrite the findings themselves (copies), so every consumer agrees: the
verdicts, :meth:`AuditResult.fails`, the counts and every report format. ``"off"`` drops a rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from initaudit.audit import AuditResult, Selection
from initaudit.baseline import Baseline, load_baseline
from initaudit.config import Config, has_initaudit_table, load_config, read_config
from initaudit.discover import DEFAULT_EXCLUDE, discover, is_excluded, matches
from initaudit.rules import RULES, Finding, Severity


@dataclass(frozen=True)
class CliPolicy:
    """What the command line said; None (or empty for ``extend_exclude``) where it said nothing."""

    select: Sequence[str] | None = None
    ignore: Sequence[str] | None = None
    fail_on: Severity | None = None
    baseline: Path | None = None
    exclude: Sequence[str] | None = None
    extend_exclude: Sequence[str] = ()
    force_exclude: bool | None = None
    respect_gitignore: bool | None = None


@dataclass(frozen=True)
class Policy:
    """The rules one model is judged by."""

    selection: Selection = field(default_factory=Selection)
    #: Codes or prefixes ``per-file-ignores`` drops for this model.
    file_ignores: tuple[str, ...] = ()
    #: Code or prefix -> the severity to report instead; None drops the rule ("off").
    severity: Mapping[str, Severity | None] = field(default_factory=dict)
    fail_on: Severity = Severity.ERROR
    baseline: Path | None = None
    input_shape: tuple[int, ...] | None = None
    input_dtype: str | None = None
    #: The config file the policy came from, None for defaults and flags alone.
    source: Path | None = None

    def allows(self, code: str) -> bool:
        return self.selection.allows(code) and not any(code.startswith(p) for p in self.file_ignores)

    def severity_of(self, finding: Finding) -> Severity | None:
        """The finding's severity after overrides (the most specific code or prefix wins)."""
        keys = [key for key in self.severity if finding.code.startswith(key)]
        return self.severity[max(keys, key=len)] if keys else finding.severity


def apply(policy: Policy, result: AuditResult) -> AuditResult:
    """``result`` with the policy's findings: unselected and per-file-ignored codes dropped,
    severities overridden on copies, "off" dropped, re-sorted as :func:`rules.evaluate` sorts."""
    findings = []
    for finding in result.findings:
        if not policy.allows(finding.code):
            continue
        severity = policy.severity_of(finding)
        if severity is None:
            continue
        findings.append(finding if severity is finding.severity else replace(finding, severity=severity))
    order = list(RULES)
    findings.sort(key=lambda f: (-f.severity, order.index(f.code) if f.code in RULES else len(order)))
    return replace(result, findings=findings)


class PolicyResolver:
    """Finds each model's config (cached per directory), builds its :class:`Policy`, discovers
    files with the project's excludes, and loads baselines once.

    ``warn`` hears each warning once: unknown keys in any config read, trust keys ignored in a
    config beside a model, directories that held no model. :attr:`project` is the config that
    may grant trust and name a factory: read loading settings from it, not from a model's policy.
    """

    def __init__(
        self,
        cli: CliPolicy | None = None,
        explicit_config: Path | None = None,
        *,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.cli = cli or CliPolicy()
        self.explicit = explicit_config
        self.cwd = Path.cwd()
        self._warn = warn or (lambda message: None)
        self._configs: dict[Path, Config] = {}
        self._nearest: dict[Path, Path | None] = {}
        self._baselines: dict[Path, Baseline] = {}
        self.project = self._remember(load_config(explicit_config))

    def _remember(self, config: Config) -> Config:
        if config.source is not None:
            self._configs[config.source.resolve()] = config
        for warning in config.warnings:
            self._warn(warning)
        return config

    def _nearest_config(self, directory: Path) -> Path | None:
        visited = []
        found: Path | None = None
        for here in (directory, *directory.parents):
            if here in self._nearest:
                found = self._nearest[here]
                break
            visited.append(here)
            candidate = here / "pyproject.toml"
            if candidate.is_file() and has_initaudit_table(candidate):
                found = candidate
                break
        for here in visited:
            self._nearest[here] = found
        return found

    def config_for(self, model: Path) -> Config:
        """The config whose policy judges ``model``."""
        if self.explicit is not None:
            return self.project
        source = self._nearest_config(Path(model).absolute().parent.resolve())
        if source is None:
            return self.project
        if source in self._configs:
            return self._configs[source]
        config = self._remember(read_config(source))
        if config.grants_execution:
            keys = " and ".join(
                key for key, value in (("trust-model", config.trust_model), ("model", config.model)) if value
            )
            self._warn(
                f"{source}: {keys} ignored: a config found beside a model cannot make loading run "
                "code; set it in the working directory's pyproject.toml or pass --config"
            )
        return config

    def policy_for(self, model: str | Path) -> Policy:
        model = Path(model)
        config = self.config_for(model)
        cli = self.cli
        root = config.root or self.cwd
        select = cli.select if cli.select is not None else config.select
        ignore = cli.ignore if cli.ignore is not None else config.ignore
        if cli.fail_on is not None:
            fail_on = cli.fail_on
        else:
            fail_on = Severity.parse(config.fail_on) if config.fail_on else Severity.ERROR
        return Policy(
            selection=Selection(list(select or []), list(ignore or [])),
            file_ignores=tuple(
                code
                for pattern, codes in config.per_file_ignores.items()
                if matches(pattern, model, root)
                for code in codes
            ),
            severity={
                code: None if level == "off" else Severity.parse(level)
                for code, level in config.severity.items()
            },
            fail_on=fail_on,
            baseline=(self.cwd / cli.baseline) if cli.baseline is not None else config.baseline,
            input_shape=config.input_shape,
            input_dtype=config.input_dtype,
            source=config.source,
        )

    def discover(self, paths: Sequence[str | Path]) -> list[Path]:
        """The files to audit: the project's excludes while walking, then each walked file's own
        config's excludes (a sub-project's ``exclude`` holds for its files)."""
        cli, project = self.cli, self.project
        force = cli.force_exclude if cli.force_exclude is not None else bool(project.force_exclude)
        gitignore = next(
            (v for v in (cli.respect_gitignore, project.respect_gitignore) if v is not None), True
        )
        files = discover(
            paths,
            exclude=self._exclude(project),
            extend_exclude=[*project.extend_exclude, *cli.extend_exclude],
            force_exclude=force,
            root=project.root or self.cwd,
            warn=self._warn,
            respect_gitignore=gitignore,
        )
        if self.explicit is not None:
            return files
        named = {Path(p).resolve() for p in paths if Path(p).is_file()}
        kept = []
        for file in files:
            config = self.config_for(file)
            if config is not project and (force or file.resolve() not in named):
                patterns = [*self._exclude(config), *config.extend_exclude, *cli.extend_exclude]
                if is_excluded(file, patterns, config.root or self.cwd):
                    continue
            kept.append(file)
        return kept

    def _exclude(self, config: Config) -> Sequence[str]:
        if self.cli.exclude is not None:
            return self.cli.exclude
        return config.exclude if config.exclude is not None else DEFAULT_EXCLUDE

    def baseline_for(self, policy: Policy) -> Baseline | None:
        """The policy's baseline, loaded once per file; None when it names none."""
        if policy.baseline is None:
            return None
        key = policy.baseline.resolve()
        if key not in self._baselines:
            self._baselines[key] = load_baseline(policy.baseline)
        return self._baselines[key]

    def judge(self, policy: Policy, result: AuditResult) -> AuditResult:
        """:func:`apply`, then the baseline's filter when the policy names one."""
        result = apply(policy, result)
        baseline = self.baseline_for(policy)
        return baseline.filter(result)[0] if baseline is not None else result


def policy_for(model_path: Path, cli: CliPolicy | None = None, explicit_config: Path | None = None) -> Policy:
    """One model's policy (a :class:`PolicyResolver` caches across many; use one for a run)."""
    return PolicyResolver(cli, explicit_config).policy_for(model_path)
