"""The ``qpass`` command line: inspect models, list passes and recipes, run pipelines, demo.

User mistakes print one line on stderr and exit with code 2 (``--debug`` shows the
traceback). The input model is never modified; outputs are written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from qpass.errors import QpassError
from qpass.model_io import write_text

console = Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, highlight=False)


class _Group(click.Group):
    """Turns QpassError into one line + exit 2, and hides tracebacks without --debug."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QpassError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"qpass: error: {e}", err=True)
            ctx.exit(2)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("qpass: interrupted", err=True)
            ctx.exit(130)
        except Exception as e:  # a bug, not a user error: say so in one line
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"qpass: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (rerun with --debug for the traceback)", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log what each pass does.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors and the final summary line.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.version_option(package_name="qpass")
@click.pass_context
def main(ctx: click.Context, verbose: bool, quiet: bool, debug: bool) -> None:
    """qpass: a compiler for post-training quantization.

    Load an ONNX model, run a pipeline of verified passes on it, and write the result.
    Try 'qpass demo' for a tour on built-in models.
    """
    ctx.obj = {"verbose": verbose, "quiet": quiet, "debug": debug}
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@main.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(model: Path, as_json: bool) -> None:
    """Summarize MODEL: opset, inputs/outputs, parameters, ops, quantizable nodes."""
    from qpass.inspect_model import describe
    from qpass.model_io import load_model

    info = describe(load_model(model))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    console.print(f"[bold]{model}[/]  opset {info['opset']}  ir {info['ir_version']}  producer {info['producer']}")
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            console.print(f"  {kind[:-1]:6} {v['name']}: {v['dtype']} {v['shape']}")
    console.print(
        f"  parameters {info['parameters']:,} ({_fmt_bytes(info['parameter_bytes'])}) in {info['initializers']} initializers"
        f", external data: {info['external_data_tensors']} tensors, functions: {info['functions']}"
    )
    table = Table(title=f"{info['nodes']} nodes", show_edge=False)
    table.add_column("op")
    table.add_column("count", justify="right")
    for op, count in info["op_histogram"].items():
        table.add_row(op, str(count))
    console.print(table)
    q = info["quantizable"]
    console.print(f"  quantizable: {q['weight']} nodes with constant weights, {q['activation']} activation x activation MatMuls")


@main.command("passes")
def list_passes() -> None:
    """List the passes with the first line of their docstring."""
    import inspect as pyinspect

    from qpass.registry import available_passes

    table = Table(show_edge=False)
    table.add_column("pass")
    table.add_column("kind")
    table.add_column("what it does")
    for name, cls in available_passes().items():
        doc = (pyinspect.getmodule(cls).__doc__ or cls.__doc__ or "").strip().splitlines()[0]
        table.add_row(name, "equivalence" if cls.preserves_float else "quantizing", doc)
    console.print(table)


@main.command("recipes")
def list_recipes() -> None:
    """List the named recipes and their passes."""
    from qpass.registry import available_recipes

    table = Table(show_edge=False)
    table.add_column("recipe")
    table.add_column("what it does")
    table.add_column("passes")
    for name, recipe in available_recipes().items():
        table.add_row(name, recipe.description, ", ".join(n for n, _ in recipe.passes))
    console.print(table)


def _stats_table(result, title: str) -> Table:
    table = Table(title=title, show_edge=False)
    for col, justify in (("pass", "left"), ("rewrites", "right"), ("nodes", "right"), ("+/-", "right"), ("time", "right"), ("verification", "left"), ("notes", "left")):
        table.add_column(col, justify=justify)
    for s in result.stats:
        notes = "; ".join(f"{reason}: {n}" for reason, n in s.skipped.items())
        check = s.verification + (f" ({s.max_error:.0e})" if s.max_error else "")
        table.add_row(
            s.name, str(s.rewritten), f"{s.nodes_before}->{s.nodes_after}", f"+{s.added}/-{s.removed}",
            f"{s.seconds * 1000:.0f} ms", check, notes,
        )
    return table


_FORMAT_HELP = (
    "Output form: 'qdq' (QuantizeLinear/DequantizeLinear around float ops; onnxruntime fuses them into "
    "integer kernels) or 'qoperator' (the integer ops themselves, default ONNX domain: QLinearConv, "
    "QLinearMatMul; MatMul/Gemm islands QLinearMatMul cannot express stay QDQ). Default: qdq."
)
_CONTRIB_HELP = (
    "With --format qoperator: also emit onnxruntime's com.microsoft ops (QLinearAdd/Mul/Sigmoid/"
    "LeakyRelu/Concat/AveragePool/GlobalAveragePool, QGemm, MatMulIntegerToFloat); the model then runs "
    "on onnxruntime only."
)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the result (.onnx).")
@click.option("-r", "--recipe", help="A named recipe (see 'qpass recipes') or a YAML recipe file. Default: fold.")
@click.option("-p", "--passes", "pass_list", help="Comma-separated passes instead of a recipe, e.g. 'fold-constants,fuse-gelu'.")
@click.option("--add-pass", multiple=True, help="Append a pass to the pipeline: name or name(option=value,...). Repeatable.")
@click.option("--remove-pass", multiple=True, help="Remove a pass from the recipe by name. Repeatable.")
@click.option("--no-verify", is_flag=True, help="Skip graph checks and numeric verification after each pass (faster).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Also write the per-pass statistics as JSON.")
@click.option("-c", "--calib", type=click.Path(path_type=Path), help="Calibration data, for pipelines that quantize.")
@click.option("--random-calib", type=int, default=0, metavar="N", help="Calibrate on N random samples instead (warns: accuracy will suffer).")
@click.option("--format", "out_format", default="qdq", metavar="qdq|qoperator", help=_FORMAT_HELP)
@click.option("--contrib-ops", is_flag=True, help=_CONTRIB_HELP)
@click.pass_context
def run(ctx, model, output, recipe, pass_list, add_pass, remove_pass, no_verify, report_path, calib, random_calib, out_format, contrib_ops) -> None:
    """Run a pass pipeline on MODEL and write the result to OUTPUT."""
    from qpass.api import build_passes, check_format, to_format
    from qpass.model_io import load_model, save_model
    from qpass.pipeline import Pipeline

    if recipe and pass_list:
        raise click.UsageError("give --recipe or --passes, not both")
    if Path(output).resolve() == Path(model).resolve():
        from qpass.errors import OutputError

        raise OutputError(f"output '{output}' is the input model: choose another output path (the input is never overwritten)")
    check_format(out_format, contrib_ops)
    passes = build_passes(recipe, pass_list, add=add_pass, remove=remove_pass)
    ir_model = load_model(model)
    context, probe = {"progress": _progress(ctx.obj["quiet"])}, None
    if calib is not None or random_calib:
        from qpass.calib_data import load_calibration

        if calib is None:
            click.echo(f"qpass: warning: calibrating on {random_calib} RANDOM samples: scales will not fit real data", err=True)
        context["calibration"] = load_calibration(calib, ir_model, random_samples=random_calib)
        probe = next(iter(context["calibration"]))
    result = Pipeline(passes, verify=not no_verify, context=context, probe_feeds=probe).run(ir_model)
    result.model = to_format(result.model, out_format, contrib_ops=contrib_ops, verify=not no_verify)
    save_model(result.model, output, input_path=model)
    if report_path:
        write_text(report_path, json.dumps(result.to_dict(), indent=2))
    if not ctx.obj["quiet"]:
        console.print(_stats_table(result, f"{model} -> {output}"))
    verdict = "verified" if result.verified else "not verified"
    console.print(f"wrote {output} ({result.model.graph.num_nodes()} nodes, {len(result.stats)} passes, {verdict}, {result.seconds:.2f} s)")


def _report_table(report, limit: int = 15) -> Table:
    table = Table(title="per-layer SQNR (worst first)", show_edge=False)
    for col, justify in (("layer", "left"), ("op", "left"), ("SQNR", "right")):
        table.add_column(col, justify=justify)
    for layer in report.layers[:limit]:
        table.add_row(layer.node, layer.op_type, f"{layer.sqnr_db:.1f} dB")
    if len(report.layers) > limit:
        table.add_row(f"... {len(report.layers) - limit} more", "", "")
    return table


def _print_report(report) -> None:
    console.print(_report_table(report))
    outs = ", ".join(f"{k} {v:.1f} dB" for k, v in report.output_sqnr_db.items())
    console.print(f"model output SQNR: {outs} (on {report.samples} calibration samples)")
    console.print(f"weights: {_fmt_bytes(report.float_bytes)} float -> {_fmt_bytes(report.quantized_bytes)} quantized")
    fused = report.fused
    if fused:
        ints = ", ".join(f"{k} {v}" for k, v in fused["integer"].items()) or "none"
        left = ", ".join(f"{k} {v}" for k, v in fused["float_behind_dq"].items()) or "none"
        console.print(f"onnxruntime {fused['onnxruntime']} kernels: integer ({ints}); float behind DequantizeLinear ({left})", markup=False)


def _progress(quiet: bool):
    from tqdm import tqdm

    return lambda it, **kw: tqdm(it, disable=quiet or not sys.stderr.isatty(), file=sys.stderr, leave=False, **kw)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the quantized model (.onnx).")
@click.option("-c", "--calib", type=click.Path(path_type=Path), help="Calibration data: an .npz (one array per input) or a folder of .npy/.npz files.")
@click.option("--random-calib", type=int, default=0, metavar="N", help="Calibrate on N random samples instead (for trying things out; accuracy will suffer).")
@click.option("-r", "--recipe", default="w8a8", show_default=True, help="A quantizing recipe (see 'qpass recipes') or a YAML file.")
@click.option("--exclude", multiple=True, metavar="NAME|OP|REGEX", help="Leave matching nodes in float. Repeatable.")
@click.option("--per-channel/--per-tensor", default=None, help="Weight scales per output channel (default) or per tensor.")
@click.option("--observer", type=click.Choice(["minmax", "moving_average", "percentile", "mse", "entropy"]), help="How activation ranges are calibrated.")
@click.option("--activation-dtype", type=click.Choice(["uint8", "int8", "uint16", "int16"]), help="Activation integer type.")
@click.option("--weight-dtype", type=click.Choice(["int8", "uint8", "int4", "uint4"]), help="Weight integer type.")
@click.option("--limit", type=int, help="Use at most this many calibration samples.")
@click.option("--no-verify", is_flag=True, help="Skip the checks after each pass.")
@click.option("--report-json", type=click.Path(path_type=Path), help="Write the report as JSON.")
@click.option("--report-html", type=click.Path(path_type=Path), help="Write the report as an HTML page with a per-layer SQNR chart.")
@click.option("--format", "out_format", default="qdq", metavar="qdq|qoperator", help=_FORMAT_HELP)
@click.option("--contrib-ops", is_flag=True, help=_CONTRIB_HELP)
@click.pass_context
def quantize(ctx, model, output, calib, random_calib, recipe, exclude, per_channel, observer, activation_dtype, weight_dtype, limit, no_verify, report_json, report_html, out_format, contrib_ops) -> None:
    """Quantize MODEL with calibration data and write a model onnxruntime runs with integer kernels:
    QDQ (default) or, with --format qoperator, integer operators."""
    import qpass
    from qpass.errors import OutputError

    if Path(output).resolve() == Path(model).resolve():
        raise OutputError(f"output '{output}' is the input model: choose another output path (the input is never overwritten)")
    if random_calib and calib is None:
        click.echo(f"qpass: warning: calibrating on {random_calib} RANDOM samples: scales will not fit real data", err=True)
    result = qpass.quantize(
        model, calib, recipe=recipe, random_calibration=random_calib, limit=limit, verify=not no_verify,
        progress=_progress(ctx.obj["quiet"]), exclude=tuple(exclude) or None, per_channel=per_channel,
        observer=observer, activation_dtype=activation_dtype, weight_dtype=weight_dtype,
        format=out_format, contrib_ops=contrib_ops,
    )
    if calib is None and not random_calib:  # it ran without data: no pass of the recipe needed any
        click.echo(f"qpass: note: recipe '{recipe}' needs no calibration data; the report compares on 4 generated inputs", err=True)
    qpass.save_model(result.model, output, input_path=model)
    if report_json:
        write_text(report_json, result.report.to_json())
    if report_html:
        write_text(report_html, result.report.to_html(f"qpass: {Path(model).name}"))
    if not ctx.obj["quiet"]:
        console.print(_stats_table(_Stats(result.stats), f"{model} -> {output} (recipe {recipe})"))
        _print_report(result.report)
    console.print(f"wrote {output} ({result.seconds:.2f} s)")


@dataclasses.dataclass
class _Stats:
    stats: list


@main.command()
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), help="Also write the demo models and their results here.")
@click.pass_context
def demo(ctx, output_dir) -> None:
    """Quantize two built-in models (a small CNN and a transformer block) and print the reports."""
    import onnx

    import qpass
    from qpass.demo import demo_calibration, demo_models

    for name, proto in demo_models().items():
        result = qpass.quantize(proto, demo_calibration(proto), progress=_progress(ctx.obj["quiet"]))
        console.rule(f"{name}: recipe 'w8a8', {len(demo_calibration(proto))} generated calibration samples")
        console.print(_stats_table(_Stats(result.stats), "passes"))
        _print_report(result.report)
        if output_dir:
            output_dir.mkdir(parents=True, exist_ok=True)
            onnx.save(proto, output_dir / f"{name}.onnx")
            qpass.save_model(result.model, output_dir / f"{name}.w8a8.onnx")
    console.print("next: 'qpass quantize MODEL -o OUT --calib DATA', 'qpass inspect MODEL', 'qpass passes', 'qpass recipes'")


if __name__ == "__main__":  # pragma: no cover
    main()
