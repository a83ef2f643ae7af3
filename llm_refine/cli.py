"""The ``llm-refine`` command line.

User errors (bad paths, malformed files, unknown options) exit with code 2 and one line on stderr
that names the file, the problem and the fix; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from .errors import UserError, run_reporting_errors

_WARN_LOGGER = "llm_refine.cli.warnings"
_HOLD_WARNINGS = ("refine", "show", "plot")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_schedule_summary(artifact: dict, path: str = "") -> str:
    prov = artifact.get("provenance") or {}
    d = artifact.get("diagnostics") or {}
    fit = artifact.get("fit") or {}
    T = len(artifact["multipliers"])
    lines = [
        f"schedule {path}".rstrip(),
        f"  source     {prov.get('source', '?')} (column {prov.get('column', '?')}, sha256 {str(prov.get('source_sha256', '?'))[:12]})",
        f"  refinement norm={prov.get('norm', '?')} power={_fmt(prov.get('power', '?'))} tau={_fmt(prov.get('tau', '?'))} "
        f"median width={prov.get('median_width', '?')} T={T} steps",
    ]
    inp = prov.get("input")
    if isinstance(inp, dict) and inp:
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
        trend = f"LR area {d['lr_area_vs_linear']:.2f} of linear decay's" if "lr_area_vs_linear" in d else ""
        if "norm_rise_after_min" in d:
            trend = (f"norms: minimum at {d['norm_min_fraction']:.0%} of the run, then x{d['norm_rise_after_min']:.2f} "
                     f"by the end; " + trend)
        if trend:
            lines.append("  trend      " + trend)
        if d.get("degenerate"):
            from .refine import degenerate_message

            lines.append("  WARNING    " + degenerate_message(d))
        if d.get("anneals_early"):
            from .refine import early_anneal_message

            lines.append("  WARNING    " + early_anneal_message(d))
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

    if args.plot is not None:
        from .figures import figure_format

        figure_format(args.plot)  # an unknown figure suffix fails before any work

    art = refine_file(args.history, args.output, norm=args.norm, tau=args.tau, power=args.power, column=args.column, plot=args.plot)
    print(format_schedule_summary(art, args.output))
    print(f"wrote {args.output}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def cmd_show(args) -> int:
    import numpy as np

    from .artifact import read_schedule
    from .refine import anneals_early, describe_schedule, fit_warmup_poly

    art = read_schedule(args.schedule)
    # The summary describes the multipliers actually in the file, not what was stored beside them;
    # only the norms' trend, which the file cannot hold, comes from the stored diagnostics.
    m = np.asarray(art["multipliers"], dtype=np.float64)
    stored = art.get("diagnostics") if isinstance(art.get("diagnostics"), dict) else {}
    d = describe_schedule(m)
    d.update({k: v for k, v in stored.items() if k.startswith("norm_") and isinstance(v, (int, float)) and not isinstance(v, bool)})
    d["anneals_early"] = anneals_early(d)
    art["diagnostics"], art["fit"] = d, fit_warmup_poly(m)
    print(format_schedule_summary(art, args.schedule))
    return 0


_PLOT_DEFAULTS = {"norm": "l1", "tau": 0.1, "power": None, "column": None}


def _is_schedule_file(path: str) -> bool:
    """A .json file that is a schedule (a .json history starts with a gradnorms header or a step)."""
    if not str(path).lower().endswith(".json"):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return True  # reported by read_schedule, with the schedule's wording
    return not (b'"llm-refine/gradnorms"' in head or b'"step"' in head)


def _schedule_source(args, art: dict) -> tuple[str, dict]:
    """The source history of a schedule and its refinement settings, checked against the file."""
    from .fileio import sha256_file

    prov = art.get("provenance") or {}
    src = prov.get("source")
    if not prov or not isinstance(src, str) or not src:
        raise UserError(f"{args.input}: has no provenance, so the history it was refined from is unknown; pass that history file to `llm-refine plot` instead")
    if not Path(src).is_file():
        raise UserError(f"{args.input}: its source history {src!r} is gone; pass the history file to `llm-refine plot` instead")
    sha = prov.get("source_sha256")
    if isinstance(sha, str) and sha and sha256_file(src) != sha:
        raise UserError(
            f"{args.input}: its source history {src} has changed since the refinement (sha256 differs); "
            "re-run `llm-refine refine` on it, or plot the history file itself"
        )
    settings = {}
    for key, ok in (
        ("norm", lambda v: v in ("l1", "l2")),
        ("tau", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and v == v and v != float("inf")),
        ("column", lambda v: v is None or isinstance(v, str)),
    ):
        v = prov.get(key, _PLOT_DEFAULTS[key])
        if not ok(v):
            raise UserError(f"{args.input}: provenance {key!r} is {v!r}, which is not valid; regenerate it with `llm-refine refine`")
        settings[key] = v
    return src, settings


def cmd_plot(args) -> int:
    import numpy as np

    from .artifact import read_schedule
    from .figures import figure_format
    from .fileio import check_outputs
    from .history import load_trace
    from .plotting import plot_refinement
    from .refine import describe_schedule, median_width, prepare_norms, refine_trace, smooth_norms

    given = {k: getattr(args, k) for k in _PLOT_DEFAULTS if getattr(args, k) is not None}
    check_outputs({"-o": args.output}, {"input": args.input})
    figure_format(args.output)
    if _is_schedule_file(args.input):
        # A schedule file: draw its own multipliers; the norms panel comes from its source history,
        # which must be the file it was refined from.
        if given:
            flags = " ".join(f"--{k}" for k in given)
            raise UserError(f"{args.input}: {flags} only apply when plotting a history; a schedule file carries its own settings; drop {flags}")
        art = read_schedule(args.input)
        src, s = _schedule_source(args, art)
        check_outputs({"-o": args.output}, {"source history": src})
        m = np.asarray(art["multipliers"], dtype=np.float64)
        trace = load_trace(src, norm=s["norm"], column=s["column"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the hygiene warnings were shown when it was refined
            steps, values, _ = prepare_norms(trace.steps, trace.values, source=trace.source)
        info = {
            "steps": steps,
            "norms": values,
            "smoothed": smooth_norms(values, s["tau"]),
            "width": median_width(values.size, s["tau"]),
            "diagnostics": describe_schedule(m),
        }
    else:
        opts = {**_PLOT_DEFAULTS, **given}
        trace = load_trace(args.input, norm=opts["norm"], column=opts["column"])
        m, info = refine_trace(trace, norm=opts["norm"], tau=opts["tau"], power=opts["power"])
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


def _pretrain_entry():
    from .train import __main__ as entry  # the packaged entry point (python -m llm_refine.train)

    return entry


def cmd_pretrain(args) -> int:
    """``llm-refine pretrain`` = ``python -m llm_refine.train``: its arguments, its run."""
    from .logsetup import stdout_logging

    # Bad input (the file, its YAML, a --set key, missing data) raises UserError, which the CLI
    # reports as its one line `llm-refine pretrain: error: ...`, exit 2.
    with stdout_logging():
        return _pretrain_entry().run(args)


def cmd_examples_list(args) -> int:
    from .examples import format_examples, list_examples

    print(format_examples(list_examples()))
    return 0


def cmd_examples_show(args) -> int:
    from .examples import find_example

    sys.stdout.write(find_example(args.name).path.read_text(encoding="utf-8"))
    return 0


def cmd_examples_copy(args) -> int:
    from .examples import copy_example

    target = copy_example(args.name, args.dest, force=args.force)
    print(f"wrote {target}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2): the problem and where to look."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
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
    r.add_argument("--plot", default=None, help="also write this figure (.png, .pdf or .svg)")
    r.set_defaults(func=cmd_refine)

    s = sub.add_parser("show", help="print a schedule file's diagnostics and fit")
    s.add_argument("schedule")
    s.set_defaults(func=cmd_show)

    pl = sub.add_parser("plot", help="PNG of raw/smoothed norms and the refined schedule vs linear and cosine")
    pl.add_argument("input", help="a history file (refined with the options), or a schedule JSON (its multipliers; norms from its source history)")
    pl.add_argument("--norm", choices=["l1", "l2"], default=None, help="history only; default l1")
    pl.add_argument("--tau", type=float, default=None, help="history only; default 0.1")
    pl.add_argument("--power", type=float, default=None, help="history only")
    pl.add_argument("--column", default=None, help="history only")
    pl.add_argument("-o", "--output", required=True, help="figure to write (.png, .pdf or .svg)")
    pl.set_defaults(func=cmd_plot)

    sz = sub.add_parser("sizes", help="print the table of named model sizes")
    sz.set_defaults(func=cmd_sizes)

    b = sub.add_parser("bench", help="benchmark: refinement speed and memory vs numpy.sort")
    from .bench import add_bench_arguments

    add_bench_arguments(b)
    b.set_defaults(func=cmd_bench)

    pt = sub.add_parser(
        "pretrain", parents=[_pretrain_entry().build_parser()], add_help=False,
        help="pretrain one model from a config (= python -m llm_refine.train)",
        description="Pretrain a LLaMA-style model from a pretraining YAML (sections model, data, train, "
                    "schedule, output_dir) or a run's run_config.json: the same as `python -m llm_refine.train "
                    "CONFIG`, which is also what `torchrun -m llm_refine.train` and `accelerate launch -m "
                    "llm_refine.train` run. `llm-refine examples copy pretrain_tiny` gives a config to start from.",
    )
    pt.set_defaults(func=cmd_pretrain)

    ex = sub.add_parser("examples", help="list, show or copy the shipped recipes and launch configs",
                        description="The recipes (recipes/*.yaml) and launch configs (launch/*.yaml, launch/*.sh) "
                                    "that ship with llm-refine. NAME is the file name without its suffix "
                                    "(tiny, single_cpu, slurm); the file name or its path (launch/slurm.sh) works too.")
    exsub = ex.add_subparsers(dest="examples_command", required=True, metavar="ACTION")
    el = exsub.add_parser("list", help="name, kind (recipe or launch) and the first comment line of each")
    el.set_defaults(func=cmd_examples_list)
    es = exsub.add_parser("show", help="print one example")
    es.add_argument("name", metavar="NAME", help="an example: tiny, single_cpu, slurm, ... (`llm-refine examples list`)")
    es.set_defaults(func=cmd_examples_show)
    ec = exsub.add_parser("copy", help="copy one example into your directory to edit",
                          description="Copy the example NAME to DEST: a directory (existing, or with a trailing "
                                      "slash) receives it under its own file name, any other path is the file to "
                                      "write. An existing file is never replaced without --force.")
    ec.add_argument("name", metavar="NAME", help="an example: tiny, single_cpu, slurm, ... (`llm-refine examples list`)")
    ec.add_argument("dest", metavar="DEST", nargs="?", default=None, help="directory or file (default: the current directory)")
    ec.add_argument("--force", action="store_true", help="overwrite an existing file")
    ec.set_defaults(func=cmd_examples_copy)

    from .pipeline import add_pipeline_arguments, main_pipeline
    from .report import add_compare_arguments, main_compare

    for name, add, func, help_ in (
        ("pipeline", add_pipeline_arguments, main_pipeline, "per size: linear baseline -> refine -> rerun (+ controls) -> report"),
        ("compare", add_compare_arguments, main_compare, "rebuild the comparison report from existing run directories"),
    ):
        sp = sub.add_parser(name, help=help_)
        add(sp)
        sp.set_defaults(func=func)
    return p


class _StderrLine(logging.Handler):
    """``warning: <message>`` on the current sys.stderr, one line per warning."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write("warning: " + " ".join(record.getMessage().split("\n")) + "\n")
        except Exception:  # pragma: no cover
            self.handleError(record)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed on one line)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    # Warnings become "warning: ..." lines on stderr for this call only: the filters and
    # warnings.showwarning are restored, and the handler removed, when main returns.
    log = logging.getLogger(_WARN_LOGGER)
    handler = _StderrLine()
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.WARNING)
    # refine/show/plot are short: their warnings are held until the command succeeds, so a failed
    # command prints exactly one line, its error. Long commands (pipeline) warn as they go.
    held: list[str] | None = [] if args.command in _HOLD_WARNINGS else None

    def show(message, category, filename, lineno, file=None, line=None):
        if held is None:
            log.warning("%s", message)
        else:
            held.append(str(message))

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show

            def command() -> int:
                rc = int(args.func(args) or 0)
                for msg in held or ():
                    log.warning("%s", msg)
                return rc

            return run_reporting_errors(f"llm-refine {args.command}", command)
    finally:
        log.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
