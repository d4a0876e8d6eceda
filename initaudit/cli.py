"""The command line: parses options, calls the library, picks a renderer. Nothing else.

Exit codes (ruff/mypy convention): 0 nothing at or above --fail-on, 1 findings at or above
it, 2 usage, load or internal error.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from initaudit import __version__
from initaudit.errors import InitauditError, UsageError

if TYPE_CHECKING:
    from initaudit.audit import Selection
    from initaudit.frontends import LoadOptions
    from initaudit.montecarlo.measure import MCOptions
    from initaudit.runner import CheckRun

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2

app = typer.Typer(
    name="initaudit",
    help="Will this network start training? Checks signal propagation at initialization (FM1/FM2).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class Format(StrEnum):
    text = "text"
    json = "json"
    sarif = "sarif"
    github = "github"
    markdown = "markdown"
    junit = "junit"


class ListFormat(StrEnum):
    text = "text"
    json = "json"


class Resample(StrEnum):
    gaussian = "gaussian"
    bootstrap = "bootstrap"
    scheme = "scheme"
    inputs = "inputs"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class FailOn(StrEnum):
    info = "info"
    warning = "warning"
    error = "error"


class ResidualScale(StrEnum):
    sqrt = "sqrt"
    zero = "zero"


F = TypeVar("F", bound=Callable[..., Any])


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def guarded(func: F) -> F:
    """Turn library errors into one line on stderr and exit 2; tracebacks only with --debug."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except (InitauditError, ValueError) as error:
            if debug:
                traceback.print_exc()
            _stderr().print(f"initaudit: error: {error}", markup=False)
            raise typer.Exit(EXIT_ERROR) from None
        except Exception as error:
            if debug:
                traceback.print_exc()
            _stderr().print(
                f"initaudit: internal error: {type(error).__name__}: {error} (--debug shows the traceback)",
                markup=False,
            )
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"initaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Will this network start training?"""


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: expected integers like 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape {text!r}: dimensions must be positive")
    return dims


#: Input dtypes by the names users type; values are torch attribute names.
DTYPES = {
    **{name: name for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32")},
    **{"float": "float32", "fp32": "float32", "half": "float16", "fp16": "float16", "bf16": "bfloat16"},
    **{"double": "float64", "fp64": "float64", "long": "int64", "int": "int32"},
}


def parse_dtype(text: str | None, where: str = "--input-dtype") -> str | None:
    if not text:
        return None
    dtype = DTYPES.get(text.strip().lower().removeprefix("torch."))
    if dtype is None:
        raise UsageError(f"{where} {text!r}: expected one of {', '.join(sorted(set(DTYPES.values())))}")
    return dtype


def load_options(
    input_shape: str | None,
    input_dtype: str | None,
    model: str | None,
    trust_model: bool | None,
    config_file: Path | None,
    warn: Callable[[str], None] | None = None,
) -> LoadOptions:
    """Flags over ``[tool.initaudit]``: the config is read from the working directory upward
    (or --config), never from beside a model, so a downloaded model cannot grant itself trust."""
    from initaudit.config import load_config
    from initaudit.frontends import LoadOptions

    config = load_config(config_file)
    warn = warn or _warn_once()
    for warning in config.warnings:
        warn(warning)
    trust_source = "--trust-model"
    if trust_model is None and config.trust_model:
        trust_source = f"trust-model = true in {config.source}"
        _stderr().print(f"initaudit: note: model files may run code on load ({trust_source})", markup=False)
    factory = model or config.model
    if factory:
        from initaudit.frontends.torch_load import parse_factory

        parse_factory(factory)  # a malformed spec fails now, not after the first file loads
    return LoadOptions(
        input_shape=parse_shape(input_shape) or config.input_shape,
        input_dtype=parse_dtype(input_dtype)
        or parse_dtype(config.input_dtype, f"input-dtype in {config.source}"),
        trust_model=bool(config.trust_model if trust_model is None else trust_model),
        model_factory=factory,
        trust_source=trust_source,
    )


def _mc_options(
    samples: int, resample: Resample, device: Device, seed: int, batch: int | None, curvature: bool
) -> MCOptions | None:
    if samples < 0 or samples == 1:
        raise UsageError(f"--mc {samples}: expected 0 (off) or at least 2 samples")
    if batch is not None and batch < 1:
        raise UsageError(f"--mc-batch {batch}: expected a positive number of samples")
    if not samples and not curvature:
        return None
    from initaudit.montecarlo.measure import MCOptions

    return MCOptions(samples, resample.value, device.value, seed, batch, curvature)


def _progress(path: Path, options: MCOptions | None) -> Callable[[int, int], None] | None:
    """Monte Carlo progress on stderr: a rich bar on a terminal, else a line per 10%."""
    if options is None or not options.samples:
        return None
    console = _stderr()
    if console.is_terminal:
        from rich.progress import Progress

        bar = Progress(console=console, transient=True)
        task = bar.add_task(f"Monte Carlo {path.name}", total=options.samples)
        bar.start()

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done)
            if done >= total:
                bar.stop()

        return update
    shown = [-1]

    def report(done: int, total: int) -> None:
        tenth = done * 10 // total
        if tenth > shown[0]:
            shown[0] = tenth
            sys.stderr.write(f"initaudit: Monte Carlo {path.name}: {done * 100 // total}% ({done}/{total})\n")
            sys.stderr.flush()

    return report


def _codes(values: list[str] | None) -> list[str]:
    return [code.strip().upper() for value in values or [] for code in value.split(",") if code.strip()]


# Options shared by several commands: one definition each (typer reads the Annotated metadata).
FormatOption = Annotated[Format, typer.Option("--format", "-f", help="Output format.")]
FailOnOption = Annotated[FailOn, typer.Option(help="Exit 1 when a finding is at or above this.")]
SelectOption = Annotated[list[str] | None, typer.Option(help="Only these rule codes or prefixes.")]
IgnoreOption = Annotated[list[str] | None, typer.Option(help="Skip these rule codes or prefixes.")]
InputShapeOption = Annotated[str | None, typer.Option(help="Input shape, e.g. 1,3,224,224.")]
InputDtypeOption = Annotated[
    str | None, typer.Option(help="Input dtype for PyTorch modules, e.g. float32 or int64 (token ids).")
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        metavar="MODULE:FACTORY",
        help="Architecture for a state dict or safetensors file: a callable returning an nn.Module "
        "(imports your code).",
    ),
]
TrustOption = Annotated[
    bool | None,
    typer.Option(
        "--trust-model/--no-trust-model",
        help="Allow files that run code when loaded (full pickles, TorchScript, .pt2). "
        "Only for files from a source you trust.",
        show_default=False,
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Read settings from this file instead of the pyproject.toml above the working directory.",
    ),
]
SeedOption = Annotated[int, typer.Option(help="Seed for everything random (results are reproducible).")]
ResidualScaleOption = Annotated[
    ResidualScale,
    typer.Option(help="Fixing residual branches: eta = 1/sqrt(L) (sqrt), or a zero last layer (zero)."),
]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Show the fix plan, write nothing.")]
RedrawOption = Annotated[
    bool,
    typer.Option("--redraw", help="Fix by drawing fresh weights, not rescaling the existing ones."),
]
InPlaceOption = Annotated[bool, typer.Option("--in-place", help="Write the fixed model over the input.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Replace an existing fixed-model output.")]
ExitZeroOption = Annotated[bool, typer.Option("--exit-zero", help="Exit 0 even with findings.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Only findings, one per line.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Show every layer and block.")]
DebugOption = Annotated[bool, typer.Option(help="Show tracebacks for errors.")]
ModelPaths = Annotated[
    list[Path],
    typer.Argument(
        help="Model files: .onnx, .pt/.pth (state dict or trusted module), .pt2, TorchScript, .safetensors, "
        "sharded-checkpoint index.json.",
        show_default=False,
        metavar="MODEL...",
    ),
]


PathsOption = Annotated[list[str] | None, typer.Option(metavar="PATTERN", show_default=False)]


@app.command()
@guarded
def check(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Model files, directories (searched for .onnx .pt .pth .pt2 .safetensors *.index.json) "
            "or globs.",
            show_default=False,
            metavar="PATH...",
        ),
    ],
    output_format: FormatOption = Format.text,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the report here (with --fix: the fixed model)."),
    ] = None,
    json_output: Annotated[Path | None, typer.Option(help="Also write the JSON report here.")] = None,
    sarif_output: Annotated[Path | None, typer.Option(help="Also write SARIF 2.1.0 here.")] = None,
    junit_output: Annotated[Path | None, typer.Option(help="Also write JUnit XML here.")] = None,
    summary_output: Annotated[
        Path | None,
        typer.Option(
            help="Also write a markdown summary here (under 1 MiB); appends when the path is "
            "$GITHUB_STEP_SUMMARY."
        ),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Draw the signal-propagation plot: FILE.png, .svg or .html.")
    ] = None,
    fail_on: Annotated[
        FailOn | None,
        typer.Option(help="Exit 1 when a finding is at or above this (config: fail-on; default error)."),
    ] = None,
    select: SelectOption = None,
    ignore: IgnoreOption = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Skip paths matching these globs (replaces the config's).")
    ] = None,
    extend_exclude: Annotated[list[str] | None, typer.Option(help="Skip these globs as well.")] = None,
    force_exclude: Annotated[
        bool | None,
        typer.Option(
            "--force-exclude/--no-force-exclude",
            help="Apply excludes to files named on the command line too (for pre-commit).",
            show_default=False,
        ),
    ] = None,
    respect_gitignore: Annotated[
        bool | None,
        typer.Option(
            "--respect-gitignore/--no-respect-gitignore",
            help="Skip files git ignores when walking directories (config: respect-gitignore; default on).",
            show_default=False,
        ),
    ] = None,
    baseline: Annotated[
        Path | None, typer.Option(help="Accept the findings recorded in this baseline file.")
    ] = None,
    write_baseline: Annotated[
        Path | None, typer.Option(help="Record every current finding in this baseline file, exit 0.")
    ] = None,
    input_shape: InputShapeOption = None,
    input_dtype: InputDtypeOption = None,
    model: ModelOption = None,
    trust_model: TrustOption = None,
    config_file: ConfigOption = None,
    mc: Annotated[
        int,
        typer.Option(
            "--mc", metavar="SAMPLES", help="Also measure: run the graph with this many fresh weight draws."
        ),
    ] = 0,
    resample: Annotated[
        Resample, typer.Option(help="How Monte Carlo draws weights (inputs: weights as they are).")
    ] = Resample.gaussian,
    device: Annotated[Device, typer.Option(help="Where Monte Carlo runs.")] = Device.auto,
    seed: SeedOption = 0,
    mc_batch: Annotated[
        int | None, typer.Option(help="Samples per Monte Carlo chunk (default: sized to memory).")
    ] = None,
    curvature: Annotated[
        bool, typer.Option("--curvature", help="Estimate Hessian top eigenvalue, trace and gradient norms.")
    ] = False,
    fix: Annotated[
        bool, typer.Option("--fix", help="Rewrite the weights so the model passes (as `initaudit fix`).")
    ] = False,
    dry_run: DryRunOption = False,
    redraw: RedrawOption = False,
    residual_scale: ResidualScaleOption = ResidualScale.sqrt,
    in_place: InPlaceOption = False,
    force: ForceOption = False,
    exit_zero: ExitZeroOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
) -> None:
    """Audit models: per-layer lengths, FM1/FM2 verdicts and fixes. Exit 0 clean, 1 findings at
    or above --fail-on, 2 errors."""
    from initaudit.audit import Selection

    warn = _warn_once()
    options = load_options(input_shape, input_dtype, model, trust_model, config_file, warn)
    if fix:
        selection = Selection(_codes(select), _codes(ignore))
        code = _run_fix(
            paths,
            output=output,
            output_format=output_format,
            fail_on=fail_on or FailOn.error,
            selection=selection,
            options=options,
            dry_run=dry_run,
            redraw=redraw,
            seed=seed,
            residual_scale=residual_scale,
            in_place=in_place,
            force=force,
            quiet=quiet,
            verbose=verbose,
        )
        raise typer.Exit(EXIT_OK if exit_zero else code)
    if dry_run or redraw or in_place or force:
        raise UsageError("--dry-run, --redraw, --in-place and --force go with --fix")
    from initaudit.policy import CliPolicy
    from initaudit.rules import Severity
    from initaudit.runner import run_check

    cli_policy = CliPolicy(
        select=_codes(select) if select else None,
        ignore=_codes(ignore) if ignore else None,
        fail_on=Severity.parse(fail_on.value) if fail_on else None,
        baseline=baseline,
        exclude=exclude,
        extend_exclude=tuple(extend_exclude or ()),
        force_exclude=force_exclude,
        respect_gitignore=respect_gitignore,
    )
    mc_options = _mc_options(mc, resample, device, seed, mc_batch, curvature)
    run = run_check(
        [str(p) for p in paths],
        cli=cli_policy,
        config_file=config_file,
        options=options,
        mc=mc_options,
        progress=lambda path: _progress(path, mc_options),
        warn=warn,
        use_baseline=write_baseline is None,
        debug=debug,
    )
    for error in run.errors:
        _stderr().print(f"initaudit: error: {error.path}: {error.message}", markup=False)
    if write_baseline is not None:
        from initaudit.baseline import write_baseline as write

        count = write(run.results, write_baseline)
        _stderr().print(f"initaudit: wrote {count} finding(s) to {write_baseline}", markup=False)
        raise typer.Exit(EXIT_ERROR if run.errors else EXIT_OK)
    if run.suppressed and not quiet:
        _stderr().print(f"initaudit: {run.suppressed} finding(s) accepted by the baseline", markup=False)
    if run.stale:
        _stderr().print(
            f"initaudit: {run.stale} baseline entr{'y' if run.stale == 1 else 'ies'} no longer match a "
            "finding (fixed, or the tensor was renamed); --write-baseline rewrites the file without them",
            markup=False,
        )
    # A run where no model could be read writes nothing (bad input: exit 2, nothing written);
    # otherwise the reports carry each unreadable model as an error entry.
    if run.results:
        _report(run, output_format, output, fail_on, verbose, quiet)
        _sinks(run, fail_on, json=json_output, sarif=sarif_output, junit=junit_output, summary=summary_output)
        if plot is not None:
            from initaudit.report.plot import render_plot

            render_plot(run.results, plot)
    raise typer.Exit(run.exit_code(exit_zero))


def _run_fail_on(run: CheckRun, fail_on: FailOn | None) -> str:
    """The --fail-on the reports mark findings against: the flag, else the models' own (all
    the same in the usual one-config repository), else error."""
    if fail_on is not None:
        return fail_on.value
    levels = set(run.fail_on.values())
    return str(levels.pop()) if len(levels) == 1 else "error"


def _report(
    run: CheckRun,
    output_format: Format,
    output: Path | None,
    fail_on: FailOn | None,
    verbose: bool,
    quiet: bool,
) -> None:
    if output_format is not Format.text:
        from initaudit.report.formats import render

        _emit(render(output_format.value, run.entries, _run_fail_on(run, fail_on), Path.cwd()), output)
        return
    from initaudit.report.console import render_console

    with _text_console(output) as console:
        for result in run.results:
            render_console(result, console, verbose, quiet)


@contextlib.contextmanager
def _text_console(output: Path | None) -> Iterator[Console]:
    """The text report's console: the terminal, or a plain 120-column file for -o."""
    if output is None:
        yield Console(highlight=False)
        return
    from initaudit.atomic import write_text

    buffer = io.StringIO()
    yield Console(file=buffer, width=120, no_color=True, highlight=False)
    write_text(output, buffer.getvalue())


def _sinks(run: CheckRun, fail_on: FailOn | None, **paths: Path | None) -> None:
    """--json-output, --sarif-output, --junit-output, --summary-output: any together."""
    from initaudit.report.formats import render

    formats = {"json": "json", "sarif": "sarif", "junit": "junit", "summary": "markdown"}
    level = _run_fail_on(run, fail_on)
    for sink, path in paths.items():
        if path is None:
            continue
        text = render(formats[sink], run.entries, level, Path.cwd())
        summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
        if sink == "summary" and summary_file and Path(summary_file).absolute() == path.absolute():
            with path.open("a", encoding="utf-8") as handle:  # the step summary is shared: append
                handle.write(text)
        else:
            _emit(text, path)


def _warn_once() -> Callable[[str], None]:
    said: set[str] = set()

    def warn(message: str) -> None:
        if message not in said:
            said.add(message)
            _stderr().print(f"initaudit: warning: {message}", markup=False)

    return warn


@app.command()
@guarded
def fix(
    paths: ModelPaths,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the fixed model here (default: <stem>.fixed.<ext>)."),
    ] = None,
    dry_run: DryRunOption = False,
    redraw: RedrawOption = False,
    seed: SeedOption = 0,
    residual_scale: ResidualScaleOption = ResidualScale.sqrt,
    in_place: InPlaceOption = False,
    force: ForceOption = False,
    output_format: FormatOption = Format.text,
    fail_on: FailOnOption = FailOn.error,
    select: SelectOption = None,
    ignore: IgnoreOption = None,
    input_shape: InputShapeOption = None,
    input_dtype: InputDtypeOption = None,
    model: ModelOption = None,
    trust_model: TrustOption = None,
    config_file: ConfigOption = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
) -> None:
    """Rewrite the weights so the network can start training, and prove the new file passes.
    The input is never modified unless --in-place."""
    from initaudit.audit import Selection

    options = load_options(input_shape, input_dtype, model, trust_model, config_file)
    selection = Selection(_codes(select), _codes(ignore))
    raise typer.Exit(
        _run_fix(
            paths,
            output=output,
            output_format=output_format,
            fail_on=fail_on,
            selection=selection,
            options=options,
            dry_run=dry_run,
            redraw=redraw,
            seed=seed,
            residual_scale=residual_scale,
            in_place=in_place,
            force=force,
            quiet=quiet,
            verbose=verbose,
        )
    )


def _run_fix(
    paths: list[Path],
    *,
    output: Path | None,
    output_format: Format,
    fail_on: FailOn,
    selection: Selection,
    options: LoadOptions,
    dry_run: bool,
    redraw: bool,
    seed: int,
    residual_scale: ResidualScale,
    in_place: bool,
    force: bool,
    quiet: bool,
    verbose: bool,
) -> int:
    from initaudit.fix.command import run_fix

    if output_format not in (Format.text, Format.json):
        raise UsageError(f"fixing reports as text or json, not {output_format.value}")
    return run_fix(
        paths,
        output=output,
        in_place=in_place,
        force=force,
        dry_run=dry_run,
        redraw=redraw,
        seed=seed,
        residual_scale=residual_scale.value,
        fail_on=fail_on.value,
        output_format=output_format.value,
        quiet=quiet,
        verbose=verbose,
        options=options,
        selection=selection,
    )


def _emit(text: str, output: Path | None) -> None:
    """Machine formats are plain text: never through rich, which wraps and eats brackets."""
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        from initaudit.atomic import write_text

        write_text(output, text)


@app.command()
@guarded
def predict(
    widths: Annotated[
        str,
        typer.Option(help="Layer widths: 64x50 (50 layers of 64), 10,20,30,40, or mixed: 784,256x10,10."),
    ],
    activation: Annotated[str, typer.Option(help="relu, tanh, gelu, silu, ... after each layer.")] = "relu",
    init: Annotated[
        str, typer.Option(help="he, xavier, lecun, pytorch (their _normal/_uniform forms) or std=0.02.")
    ] = "he",
    bias_std: Annotated[float, typer.Option(help="Std of the biases (0: no bias).")] = 0.0,
    residual: Annotated[
        int | None, typer.Option(metavar="BLOCKS", help="Residual blocks on a stream of the last width.")
    ] = None,
    eta: Annotated[
        str | None, typer.Option(help="Residual branch scale: a number, or 1/sqrt(L) (default 1).")
    ] = None,
    branch_depth: Annotated[int, typer.Option(help="Dense layers per residual branch.")] = 2,
    input_width: Annotated[
        int | None, typer.Option(help="Input features (default: the first width).")
    ] = None,
    norm: Annotated[
        str | None, typer.Option(help="Put a normalization (layer or batch) before each branch.")
    ] = None,
    output_format: FormatOption = Format.text,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the report here.")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Draw the signal-propagation plot: FILE.png, .svg or .html.")
    ] = None,
    fail_on: FailOnOption = FailOn.error,
    select: SelectOption = None,
    ignore: IgnoreOption = None,
    mc: Annotated[
        int, typer.Option("--mc", metavar="SAMPLES", help="Also measure by Monte Carlo (plain nets).")
    ] = 0,
    seed: SeedOption = 0,
    exit_zero: ExitZeroOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
) -> None:
    """The same theory for an architecture that has no file yet, with the design answers:
    how wide for this depth, how deep for this width, what eta for this many blocks."""
    from initaudit.audit import Selection
    from initaudit.predict import audit_design, make_spec, parse_widths
    from initaudit.rules import Severity

    spec = make_spec(
        parse_widths(widths),
        activation=activation,
        init=init,
        bias_std=bias_std,
        residual=residual,
        eta=eta,
        branch_depth=branch_depth,
        input_width=input_width,
        norm=norm,
    )
    mc_options = _mc_options(mc, Resample.gaussian, Device.auto, seed, None, False)
    result, answers = audit_design(
        spec.graph(),
        selection=Selection(_codes(select), _codes(ignore)),
        mc=mc_options,
        progress=_progress(Path(result_name := spec.describe()), mc_options),
    )
    if output_format is Format.json:
        import json

        from initaudit.report.json_report import render_json

        document = json.loads(render_json([result], fail_on.value))
        document["reports"][0]["design"] = answers.to_dict()
        _emit(json.dumps(document, indent=2) + "\n", output)
    elif output_format is not Format.text:
        from initaudit.report.formats import render

        _emit(render(output_format.value, [result], fail_on.value), output)
    else:
        from rich.text import Text

        from initaudit.report.console import render_console

        with _text_console(output) as console:
            render_console(result, console, verbose, quiet)
            if not quiet:
                console.print(Text(f"Design answers ({result_name})", style="bold"))
                for line in answers.lines():
                    console.print(f"  {line}", markup=False, soft_wrap=True)
    if plot is not None:
        from initaudit.report.plot import render_plot

        render_plot([result], plot)
    failed = result.fails(Severity.parse(fail_on.value))
    raise typer.Exit(EXIT_FINDINGS if failed and not exit_zero else EXIT_OK)


@app.command()
@guarded
def rules(
    output_format: Annotated[
        ListFormat, typer.Option("--format", "-f", help="Output format.")
    ] = ListFormat.text,
    debug: DebugOption = False,
) -> None:
    """List every rule: code, name, worst severity, summary."""
    from initaudit.rules import RULES

    if output_format is ListFormat.json:
        import json

        rows = [
            {"code": r.code, "name": r.name, "severity": str(r.severity), "summary": r.summary}
            for r in RULES.values()
        ]
        _emit(json.dumps(rows, indent=2) + "\n", None)
        return
    from rich.table import Table

    table = Table(header_style="bold")
    for column in ("code", "name", "severity", "summary"):
        table.add_column(column, overflow="fold")
    for r in RULES.values():
        table.add_row(r.code, r.name, str(r.severity), r.summary)
    Console(highlight=False).print(table)


@app.command()
@guarded
def explain(
    code: Annotated[str, typer.Argument(help="A rule code, e.g. IA201.")],
    debug: DebugOption = False,
) -> None:
    """Explain a rule: the theory behind it and how to fix what it reports."""
    from initaudit.rules import RULES

    rule = RULES.get(code.strip().upper())
    if rule is None:
        raise UsageError(f"unknown rule {code!r}; `initaudit rules` lists them")
    typer.echo(f"{rule.code} {rule.name} ({rule.severity})\n\n{rule.summary}\n\n{rule.explanation}")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: every path out returns 0, 1 or 2."""
    try:
        code = app(args=argv, prog_name="initaudit", standalone_mode=False)
    except typer.Exit as done:
        return int(done.exit_code)
    except typer.Abort:
        _stderr().print("initaudit: aborted", markup=False)
        return EXIT_ERROR
    except typer.TyperException as error:  # usage errors know how to show themselves
        show = getattr(error, "show", None)
        if callable(show):
            show()
        else:
            _stderr().print(f"initaudit: error: {error}", markup=False)
        return EXIT_ERROR
    except Exception as error:
        if "--debug" in (argv if argv is not None else sys.argv):
            traceback.print_exc()
        _stderr().print(f"initaudit: internal error: {type(error).__name__}: {error}", markup=False)
        return EXIT_ERROR
    return code if isinstance(code, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
