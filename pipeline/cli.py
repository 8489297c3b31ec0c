"""The `revcol` command line (also `python -m pipeline`). Thin: parse, build, run, close.

Every reporting command takes ``--json`` and then prints one JSON object on its last line for scripts.
Exit status: 0 success, 1 the work failed (e.g. bad shards), 2 bad input (usage, invalid recipe).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.output import print_json

__all__ = ["main"]

logger = logging.getLogger("pipeline")

RUN_LOGS = "runs/logs"
"""Where ``revcol run`` writes each run's log file (relative to the working directory; under ``ray job submit``
the job's uploaded working directory on the head node)."""

_VERBOSE_HELP = ("everything on the console: Ray's, Ray Data's and DeepSpeed's output, progress bars, every worker "
                 "line, debug logging (default: those go to the run's log file, named on the first line)")


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """``--verbose`` after the subcommand too (``revcol demo --verbose``); SUPPRESS keeps ``revcol -v demo``'s."""
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)


def _stage_names(text: str | None) -> list[str] | None:
    """``--stages a,b`` as a list (checked against the recipe by the pipeline); None: every stage."""
    return [s.strip() for s in text.split(",") if s.strip()] or None if text else None


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.console import RunConsole, run_log_path
    from pipeline.demo import run_demo

    with RunConsole(run_log_path(Path(args.workdir) / "logs", "demo"), verbose=args.verbose) as console:
        result = run_demo(workdir=args.workdir, overrides=args.set, seed=args.seed,
                          progress=args.verbose and not args.json, services=args.services,
                          stages=_stage_names(args.stages), events=console)
    _disconnect_ray()
    if args.json:
        print_json(result)
    return 0


def _cmd_shards_write(args: argparse.Namespace) -> int:
    from pipeline.data.shards import write_shards

    manifest = write_shards(
        args.source,
        args.dest,
        shard_size=args.shard_size,
        shard_bytes=args.shard_bytes,
        seed=args.seed,
        force=args.force,
        progress=not args.json,
        split=args.split,
        splits=args.splits,
        split_seed=args.split_seed,
    )
    if args.json:
        print_json(
            {
                "dest": args.dest,
                "shards": manifest["num_shards"],
                "samples": manifest["num_samples"],
                "num_classes": manifest["num_classes"],
                "split": args.split,
                "skipped": manifest["skipped"],
            }
        )
    return 0


def _cmd_shards_verify(args: argparse.Namespace) -> int:
    from pipeline.data.shards import verify_shards

    report = verify_shards(args.dest, progress=not args.json)
    if args.json:
        print_json(report)
    else:
        for name, problem in sorted(report["bad_shards"].items()):
            print(f"BAD {name}: {problem}", file=sys.stderr)
        print(f"{report['ok_shards']} shards ok, {len(report['bad_shards'])} bad")
    return 0 if report["ok"] else 1


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    wanted = _stage_names(args.stages)
    if args.dry_run:
        from pipeline.stages import plan_pipeline

        plan = plan_pipeline(recipe, stages=wanted)
        if args.json:
            print_json({**plan, "valid": True})
        else:
            print(f"recipe {recipe.name!r} is valid; storage {recipe.storage_path}; tracking {recipe.tracking.uri}")
            for st in plan["stages"]:
                print("  " + ", ".join(f"{k}={v}" for k, v in st.items()))
        return 0
    from dataclasses import asdict

    from pipeline.console import RunConsole, run_log_path
    from pipeline.stages import run_pipeline

    with RunConsole(run_log_path(RUN_LOGS, recipe.name), verbose=args.verbose) as console:
        outcomes = run_pipeline(recipe, stages=wanted, events=console)
    _disconnect_ray()
    for o in outcomes:
        top1 = o.metrics.get("val/top1")
        print(f"{o.stage:<12} {o.status:<9} run {o.run_id}  top-1 {'-' if top1 is None else f'{top1:.4f}'}")
    if args.json:
        print_json({"recipe": recipe.name, "stages": {o.stage: asdict(o) for o in outcomes}})
    return 0


def _disconnect_ray() -> None:
    """Leaves the Ray cluster before the summary: until then Ray forwards its processes' lines (a raylet's warning,
    a worker's last words), and none may follow the summary, whose last line is the JSON of ``--json``."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stderr.flush()


def _cmd_eval(args: argparse.Namespace) -> int:
    import os

    from pipeline.evaluate import evaluate_file

    summary = evaluate_file(
        args.weights, args.data, model=args.model, workers=args.workers, use_gpu=args.gpu,
        batch_size=args.batch_size, image_size=args.image_size,
        tracking_uri=args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), experiment=args.experiment,
    )
    _disconnect_ray()
    if args.json:
        print_json(summary)
        return 0
    metrics = summary["metrics"]
    print(f"{summary['weights']} ({summary['model']}, {summary['num_classes']} classes) on {summary['data']}: "
          f"{int(metrics['val/samples'])} samples, {summary['world_size']} worker(s)")
    for key in ["val/top1", "val/top5", *sorted(k for k in metrics if k.startswith("val/top1_col"))]:
        print(f"  {key.removeprefix('val/'):<12} {metrics[key]:.4f}")
    if summary["run_id"]:
        print(f"MLflow run {summary['run_id']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="revcol", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; for run and demo: " + _VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the embedded default: pretrain → finetune → eval on scikit-learn's digits")
    demo.add_argument("--workdir", default="runs/demo", help="where outputs go (default: runs/demo)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of jobs/demo_digits.yaml (e.g. stages.pretrain.optim.epochs=1)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data split")
    demo.add_argument("--services", action="store_true",
                      help="run against a local S3 server + MLflow server (started and stopped by the demo), "
                           "the way a cluster run does, instead of local storage and a local MLflow store")
    demo.add_argument("--stages", default=None,
                      help="comma-separated subset of stages to run (pretrain,finetune,scratch,eval; default all)")
    demo.add_argument("--json", action="store_true", help="print one JSON summary object last")
    _add_verbose(demo)
    demo.set_defaults(func=_cmd_demo)

    shards = sub.add_parser("shards", help="write or verify WebDataset shards")
    shards_sub = shards.add_subparsers(dest="shards_command", required=True)
    write = shards_sub.add_parser("write", help="SOURCE (image folder or 'digits') -> shards + manifest.json")
    write.add_argument("source", help="an image-folder path (one subfolder per class) or 'digits'")
    write.add_argument("dest", help="a folder or s3://bucket/prefix")
    write.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    write.add_argument("--shard-bytes", type=int, default=None, help="also cap a shard's bytes")
    write.add_argument("--seed", type=int, default=0, help="seed of the sample order (default 0)")
    write.add_argument("--force", action="store_true", help="overwrite a different dataset at DEST")
    write.add_argument("--split", default=None, help="write only this part of a deterministic stratified partition")
    write.add_argument(
        "--splits", default=None, metavar="NAME=FRAC,...", help="the partition (default train=0.8,test=0.2)"
    )
    write.add_argument("--split-seed", type=int, default=0, help="seed of the partition (default 0; not --seed)")
    write.add_argument("--json", action="store_true")
    write.set_defaults(func=_cmd_shards_write)
    verify = shards_sub.add_parser("verify", help="re-read shards, check counts and hashes against the manifest")
    verify.add_argument("dest", help="a folder or s3://bucket/prefix holding manifest.json")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=_cmd_shards_verify)

    run = sub.add_parser("run", help="run a recipe's stages")
    run.add_argument("recipe", help="recipe YAML (see jobs/)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    run.add_argument("--stages", default=None, help="comma-separated subset of stages to run")
    run.add_argument("--dry-run", action="store_true", help="validate and print the plan; take no resources")
    run.add_argument("--json", action="store_true")
    _add_verbose(run)
    run.set_defaults(func=_cmd_run)

    evaluate = sub.add_parser("eval", help="top-1/5 of a weights file on shards, on Ray Train workers")
    evaluate.add_argument("weights", help="a .safetensors file or export folder, or an official RevCol .pth "
                                          "checkpoint; local or s3://")
    evaluate.add_argument("--data", required=True, help="the shards: a manifest, a folder or an s3:// prefix")
    evaluate.add_argument("--model", default=None,
                          help="the RevCol variant (default: the one the weights record; exports of this pipeline do)")
    evaluate.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
    evaluate.add_argument("--gpu", action="store_true", help="one GPU per worker")
    evaluate.add_argument("--batch-size", type=int, default=128, help="eval batch per worker (default 128)")
    evaluate.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
    evaluate.add_argument("--tracking-uri", default=None,
                          help="MLflow tracking URI for a run of the results (default: $MLFLOW_TRACKING_URI; none: no run)")
    evaluate.add_argument("--experiment", default="revcol-eval", help="MLflow experiment (default revcol-eval)")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=_cmd_eval)

    # Subcommands that live in their own modules register themselves here: each module has
    # `add_parser(subparsers)` which adds its parser and sets `func`. One line per module, in this block.
    # --- module subcommands ---
    from pipeline import compare; compare.add_parser(sub)  # noqa: E702
    from pipeline import plan; plan.add_parser(sub)  # noqa: E702
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help and usage errors exit here, before any import below

    from pipeline.config import RecipeError
    from pipeline.storage import S3AccessError

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except RecipeError as err:
        print(f"revcol: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, S3AccessError) as err:
        print(f"revcol: error: {err}", file=sys.stderr)
        return 2
