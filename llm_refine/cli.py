"""The ``llm-refine`` command line.

User errors (bad paths, malformed files, unknown options) exit with code 2 and one line on stderr
that names the file, the problem and the fix; no traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .errors import UserError


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_schedule_summary(artifact: dict, path: str = "") -> str:
    prov = artifact.get("provenance", {})
    d = artifact.get("diagnostics", {})
    fit = artifact.get("fit", {})
    T = len(artifact["multipliers"])
    lines = [
        f"schedule {path}".rstrip(),
        f"  source     {prov.get('source', '?')} (column {prov.get('column', '?')}, sha256 {str(prov.get('source_sha256', '?'))[:12]})",
        f"  refinement norm={prov.get('norm', '?')} power={_fmt(prov.get('power', '?'))} tau={_fmt(prov.get('tau', '?'))} "
        f"median width={prov.get('median_width', '?')} T={T} steps",
    ]
    inp = prov.get("input", {})
    if inp:
        lines.append(
            "  input      "
            + ", ".join(f"{k}={v}" for k, v in inp.items() if k in ("logged", "filled", "duplicates", "dropped_nonfinite", "skipped_steps"))
        )
    if d:
        lines.append(
            f"  shape      warm-up {d['warmup_steps']} steps ({d['warmup_steps'] / max(T, 1):.1%}), peak at step {d['peak_step']} "
            f"({d['peak_fraction']:.1%}), {d['above_half_fraction']:.1%} of steps above half the peak, "
            f"final anneal {d['final_anneal_steps']} steps ({d['final_anneal_fraction']:.1%}), starts at {d['start_multiplier']:.3g}"
        )
        if d.get("degenerate"):
            from .refine import degenerate_message

            lines.append("  WARNING    " + degenerate_message(d))
    if fit:
        lines.append(
            f"  fit        warm-up {fit['warmup_fraction']:.1%} of the run from {fit['start']:.3g}, then (1-progress)^{fit['power']:.3g}; "
            f"R^2={fit['r2']:.3f}"
        )
    lines.append(f"  created    {prov.get('created', '?')} by llm-refine {prov.get('package_version', '?')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_refine(args) -> int:
    from .refine import refine_file

    art = refine_file(args.history, args.output, norm=args.norm, tau=args.tau, power=args.power, column=args.column, plot=args.plot)
    print(format_schedule_summary(art, args.output))
    print(f"wrote {args.output}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def cmd_show(args) -> int:
    from .artifact import read_schedule

    print(format_schedule_summary(read_schedule(args.schedule), args.schedule))
    return 0


def cmd_plot(args) -> int:
    from .artifact import read_schedule
    from .history import load_trace
    from .plotting import plot_refinement
    from .refine import refine_trace

    src, norm, tau, column, power = args.input, args.norm, args.tau, args.column, args.power
    if str(src).endswith(".json"):
        # A schedule file: re-derive the plot from the history it was refined from.
        prov = read_schedule(src)["provenance"]
        src = prov.get("source")
        if not src or not Path(src).exists():
            raise UserError(f"{args.input}: its source history {src!r} is gone; pass the history file to `llm-refine plot` instead")
        norm, tau, column, power = prov.get("norm", norm), prov.get("tau", tau), prov.get("column"), prov.get("power")
    trace = load_trace(src, norm=norm, column=column)
    m, info = refine_trace(trace, norm=norm, tau=tau, power=power)
    plot_refinement(info, m, args.output, title=Path(trace.source).name)
    print(f"wrote {args.output}")
    return 0


def cmd_sizes(args) -> int:
    from .train.models import format_size_table

    print(format_size_table())
    return 0


def cmd_bench(args) -> int:
    from .bench import main_bench

    return main_bench(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm-refine",
        description="Refined learning-rate schedules from gradient-norm histories (arXiv 2310.07831).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("refine", help="refine a gradient-norm history into a schedule file")
    r.add_argument("history", help="gradnorms.jsonl, a CSV (step,value or W&B export) or .npy")
    r.add_argument("--norm", choices=["l1", "l2"], default="l1", help="l1: w=1/n (AdamW); l2: w=1/n^2 (SGD). Default l1")
    r.add_argument("--tau", type=float, default=0.1, help="median-filter width as a fraction of the run (0 = none)")
    r.add_argument("--power", type=float, default=None, help="explicit weight power w=n^-power (overrides --norm)")
    r.add_argument("--column", default=None, help="column (CSV) or key (JSONL) holding the norms")
    r.add_argument("-o", "--output", required=True, help="schedule JSON to write")
    r.add_argument("--plot", default=None, help="also write this PNG")
    r.set_defaults(func=cmd_refine)

    s = sub.add_parser("show", help="print a schedule file's diagnostics and fit")
    s.add_argument("schedule")
    s.set_defaults(func=cmd_show)

    pl = sub.add_parser("plot", help="PNG of raw/smoothed norms and the refined schedule vs linear and cosine")
    pl.add_argument("input", help="a history file, or a schedule JSON (its source history is used)")
    pl.add_argument("--norm", choices=["l1", "l2"], default="l1")
    pl.add_argument("--tau", type=float, default=0.1)
    pl.add_argument("--power", type=float, default=None)
    pl.add_argument("--column", default=None)
    pl.add_argument("-o", "--output", required=True, help="PNG to write")
    pl.set_defaults(func=cmd_plot)

    sz = sub.add_parser("sizes", help="print the table of named model sizes")
    sz.set_defaults(func=cmd_sizes)

    b = sub.add_parser("bench", help="benchmark: refinement speed and memory vs numpy.sort")
    from .bench import add_bench_arguments

    add_bench_arguments(b)
    b.set_defaults(func=cmd_bench)

    from .pipeline.runner import add_pipeline_arguments, main_pipeline
    from .report import add_compare_arguments, main_compare

    for name, add, func, help_ in (
        ("pipeline", add_pipeline_arguments, main_pipeline, "per size: linear baseline -> refine -> rerun (+ controls) -> report"),
        ("compare", add_compare_arguments, main_compare, "rebuild the comparison report from existing run directories"),
    ):
        sp = sub.add_parser(name, help=help_)
        add(sp)
        sp.set_defaults(func=func)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"llm-refine {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        name = getattr(e, "filename", None) or ""
        print(f"llm-refine {args.command}: error: {name}: {e.strerror}; check the path", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llm-refine {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
