"""``revcol plan``: its parser and command function. Imports nothing heavy at module level (the CLI builds every
parser for ``--help``); the planner, and torch with it, load when the command runs."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeline.output import print_json


def _cmd_plan(args: argparse.Namespace) -> int:
    """``revcol plan``: exit status 0 when every planned stage fits, 1 (reason on stderr) when one does not."""
    from pipeline.config import load_recipe
    from pipeline.plan.clusters import DEFAULT_CLUSTERS_FILE, ClusterShape, declared_cluster
    from pipeline.plan.planner import plan_recipe  # torch: only when planning
    from pipeline.plan.report import format_plan

    recipe = load_recipe(args.recipe, args.set)
    if args.clusters_file is not None and args.cluster is None:
        raise ValueError("--clusters-file: give --cluster NAME too")
    declared = None
    if args.cluster is not None:
        declared = declared_cluster(args.cluster, path=args.clusters_file or DEFAULT_CLUSTERS_FILE)
    cluster = ClusterShape.from_recipe(
        recipe, workers=args.workers, gpu_mem_gib=args.gpu_mem, host_mem_gib=args.cpu_mem, cpus_per_worker=args.cpus,
        declared=declared,
    )
    if args.stage is not None and args.stage not in [s.name for s in recipe.stages]:
        raise ValueError(f"--stage: no stage {args.stage!r}; recipe has {[s.name for s in recipe.stages]}")
    plan = plan_recipe(recipe, cluster, stage=args.stage)
    if not plan.fits:
        print(f"revcol plan: {plan.refusal()}", file=sys.stderr)
    if args.json:
        print_json(plan.to_dict())
    else:
        print(format_plan(plan))
    return 0 if plan.fits else 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``revcol plan`` to the CLI's subcommands.

    Args:
        subparsers: the ``add_subparsers()`` object of the ``revcol`` parser.

    Returns:
        The new parser (its ``func`` is set).
    """
    p = subparsers.add_parser(
        "plan",
        help="per-worker memory and step cost of each stage; exit 1 when it cannot fit",
        description="per-worker memory and step cost of each stage of a recipe on a cluster shape, before launching",
    )
    p.add_argument("recipe", help="recipe YAML (see jobs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument(
        "--cluster", default=None, metavar="NAME",
        help="plan for a cluster declared in infra/clusters.yaml (aws, local, k8s): its training workers, GPU and "
             "host memory per worker and CPUs replace the recipe's; the options below override it",
    )
    p.add_argument(
        "--clusters-file", default=None, metavar="PATH",
        help="the clusters file for --cluster (default: infra/clusters.yaml of this checkout)",
    )
    p.add_argument("--workers", type=int, default=None, help="workers (default: scaling.num_workers)")
    p.add_argument(
        "--gpu-mem", type=float, default=None, metavar="GiB",
        help="GPU memory per worker (default: scaling.gpu_memory_gb, else 80)",
    )
    p.add_argument(
        "--cpu-mem", type=float, default=None, metavar="GiB",
        help="host memory per worker (default: scaling.memory_per_worker_gb; unchecked without)",
    )
    p.add_argument("--cpus", type=float, default=None, metavar="N", help="CPU cores per worker (default: not checked)")
    p.add_argument("--stage", default=None, metavar="NAME", help="plan only this stage")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    p.set_defaults(func=_cmd_plan)
    return p
