"""``revcol compare``: its parser and command function (MLflow is imported when the command runs)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable

from pipeline.compare.comparison import DEFAULT_METRICS, compare_runs
from pipeline.compare.plots import X_AXES
from pipeline.compare.report import write_html_report
from pipeline.compare.selection import CompareError
from pipeline.compare.table import format_table


def _split_csv(values: Iterable[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _default_tracking_uri() -> str:
    from pipeline.config import TrackingConfig

    return os.environ.get("MLFLOW_TRACKING_URI") or TrackingConfig().uri


def _cmd_compare(args: argparse.Namespace) -> int:
    """Runs ``revcol compare``: prints the table (or one JSON object with ``--json``), writes the PNGs and, with
    ``--html``, the self-contained report.

    Args:
        args: the parsed command line.

    Returns:
        0 on success, 1 when the tracking store cannot be read; selection errors raise :class:`CompareError`
        (exit status 2 through ``pipeline.cli.main``).
    """
    import sys

    from mlflow.exceptions import MlflowException

    from pipeline.output import print_json

    if not (args.run_ids or args.experiment or args.parent):
        raise CompareError("nothing selected: give RUN_ID(s), --experiment NAME or --parent RUN_ID")
    # an interactive command: fail within seconds, not minutes, when the tracking server is down (unless set)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    tracking_uri = args.tracking_uri or _default_tracking_uri()
    metrics = _split_csv([args.metrics]) if args.metrics is not None else None
    try:
        comparison = compare_runs(
            tracking_uri,
            experiments=args.experiment,
            parent=args.parent,
            run_ids=_split_csv(args.run_ids),
            stage=args.stage,
            metrics=metrics,
            out_dir=args.out,
            x=args.x,
        )
    except MlflowException as err:
        print(f"revcol compare: cannot read runs from {tracking_uri}: {err.message}", file=sys.stderr)
        return 1
    report = str(write_html_report(comparison, args.html)) if args.html else None
    if args.json:
        print_json({**comparison.to_json(), "html": report})
    else:
        print(format_table(comparison))
        for metric, path in comparison.pngs.items():
            print(f"plot {metric}: {path}")
        if report:
            print(f"report: {report}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``revcol compare`` to the command line.

    Args:
        subparsers: the ``revcol`` sub-command registry.

    Returns:
        The ``compare`` parser (its ``func`` is set).
    """
    parser = subparsers.add_parser(
        "compare",
        help="compare MLflow runs: differing params, final/best metrics, PNG curves, an HTML report",
        description=(
            "Compare MLflow runs or whole pipelines (a parent run and its stages). The table lays a pipeline's "
            "stages end to end; the plots draw one panel per kind of stage, sibling stages overlaid, eval results "
            "as bars. Selections combine. "
            "Best = max for top1/top5/acc/samples_per_s, min for loss/stall_frac; other metrics show the final "
            "value only."
        ),
    )
    parser.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to compare (a parent run = its pipeline)")
    parser.add_argument(
        "--experiment", action="append", default=[], metavar="NAME", help="an experiment's top-level runs (repeatable)"
    )
    parser.add_argument("--parent", default=None, metavar="RUN_ID", help="a pipeline's stage runs, each on its own")
    parser.add_argument(
        "--stage", default=None, help="only runs tagged revcol.stage=STAGE (with --experiment/--parent)"
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the recipe default)",
    )
    parser.add_argument(
        "--metrics",
        default=None,
        metavar="M1,M2",
        help=f"metrics to plot (default: {','.join(DEFAULT_METRICS)}, those logged)",
    )
    parser.add_argument(
        "--out", default="runs/compare", metavar="DIR", help="folder for the PNGs (default runs/compare)"
    )
    parser.add_argument(
        "--x", default="steps", choices=X_AXES,
        help="x axis of the curves: steps as logged, training samples or epochs (default steps)",
    )
    parser.add_argument(
        "--html", default=None, metavar="REPORT.html",
        help="also write one self-contained HTML report (table, differing params, plots embedded) for sharing",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.set_defaults(func=_cmd_compare)
    return parser
