"""The command line: parses options, calls the library, picks a renderer. Nothing else.

Exit codes (ruff/mypy convention): 0 nothing at or above --fail-on, 1 findings at or above
it, 2 usage, load or internal error.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
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
) -> LoadOptions:
    """Flags over ``[tool.initaudit]``: the config is read from the working directory upward
    (or --config), never from beside a model, so a downloaded model cannot grant itself trust."""
    from initaudit.config import load_config
    from initaudit.frontends import LoadOptions

    config = load_config(config_file)
    for warning in config.warnings:
        _stderr().print(f"initaudit: warning: {warning}", markup=False)
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
        help="Model files: .onnx, .pt/.pth (state dict or trusted module), .pt2, TorchScript, .safetensors.",
        show_default=False,
        metavar="MODEL...",
    ),
]


@app.command()
@guarded
def check(
    paths: ModelPaths,
    output_format: FormatOption = Format.text,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the report here (with --fix: the fixed model)."),
    ] = None,
    fail_on: FailOnOption = FailOn.error,
    select: SelectOption = None,
    ignore: IgnoreOption = None,
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
    """Audit model files: per-layer lengths, FM1/FM2 verdicts and fixes."""
    from initaudit.audit import Selection, audit_file
    from initaudit.rules import Severity

    selection = Selection(_codes(select), _codes(ignore))
    options = load_options(input_shape, input_dtype, model, trust_model, config_file)
    if fix:
        code = _run_fix(
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
        raise typer.Exit(EXIT_OK if exit_zero else code)
    if dry_run or redraw or in_place or force:
        raise UsageError("--dry-run, --redraw, --in-place and --force go with --fix")
    mc_options = _mc_options(mc, resample, device, seed, mc_batch, curvature)
    results = [
        audit_file(
            path, selection=selection, options=options, mc=mc_options, progress=_progress(path, mc_options)
        )
        for path in paths
    ]
    threshold = Severity.parse(fail_on.value)

    if output_format is Format.json:
        from initaudit.report.json_report import render_json

        _emit(render_json(results, fail_on.value), output)
    else:
        from initaudit.report.console import render_console

        if output is not None:
            with output.open("w", encoding="utf-8") as handle:
                console = Console(file=handle, width=120, no_color=True, highlight=False)
                for result in results:
                    render_console(result, console, verbose, quiet)
        else:
            console = Console(highlight=False)
            for result in results:
                render_console(result, console, verbose, quiet)
    failed = any(result.fails(threshold) for result in results)
    raise typer.Exit(EXIT_FINDINGS if failed and not exit_zero else EXIT_OK)


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
        output.write_text(text, encoding="utf-8")


@app.command()
@guarded
def rules(
    output_format: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.text,
    debug: Annotated[bool, typer.Option(help="Show tracebacks for errors.")] = False,
) -> None:
    """List every rule: code, name, worst severity, summary."""
    from initaudit.rules import RULES

    if output_format is Format.json:
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
    debug: Annotated[bool, typer.Option(help="Show tracebacks for errors.")] = False,
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
