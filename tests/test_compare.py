"""`revcol compare` (pipeline.compare) against a real MLflow server: runs created here with MlflowClient."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import cli
from pipeline.compare import (
    CompareError,
    compare_runs,
    format_table,
    load_subjects,
    metric_direction,
    plot_metric,
    select_runs,
)

REPO = Path(__file__).resolve().parents[1]

BASE_PARAMS = {
    "name": "cmp",
    "scaling.num_workers": "2",
    "s3.secret_access_key": "***",
    "stages.pretrain.optim.base_lr": "0.001",
    "stages.finetune.optim.base_lr": "0.0005",
    "seed": "0",
}


@dataclass
class Runs:
    """What the fixture logged: ids by role."""

    uri: str
    experiment: str
    empty_experiment: str
    pipe_a: str
    pipe_b: str
    a_pretrain: str
    a_finetune: str
    solo_1: str
    solo_2: str
    pipe_c: str
    """A pipeline of every kind of stage (pretrain, finetune, its from-scratch sibling, eval), in its own
    experiment."""


def _run(client: MlflowClient, exp_id: str, name: str, start: int, *, params: dict[str, str],
         metrics: dict[str, list[tuple[int, float]]], tags: dict[str, str] | None = None) -> str:
    run_id = client.create_run(exp_id, start_time=start, run_name=name, tags=tags or {}).info.run_id
    stamp = int(time.time() * 1000)
    points = [
        Metric(key, value, stamp + i, step) for key, series in metrics.items() for i, (step, value) in enumerate(series)
    ]
    client.log_batch(run_id, metrics=points, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run_id)
    return run_id


def _pipeline(client: MlflowClient, exp_id: str, name: str, start: int, params: dict[str, str],
              stages: list[tuple[str, dict[str, list[tuple[int, float]]], dict[str, str]]]) -> list[str]:
    parent = _run(client, exp_id, name, start, params=params, metrics={}, tags={"revcol.pipeline": "cmp"})
    ids = [parent]
    for i, (stage, metrics, extra) in enumerate(stages):
        tags = {"revcol.stage": stage, "mlflow.parentRunId": parent}
        ids.append(_run(client, exp_id, f"{name}-{stage}", start + 1 + i, params={**params, **extra},
                        metrics=metrics, tags=tags))
    return ids


@pytest.fixture(scope="module")
def runs(mlflow_server) -> Runs:
    client = MlflowClient(mlflow_server.tracking_uri)
    tag = uuid.uuid4().hex[:8]
    experiment = f"cmp-{tag}"
    exp_id = client.create_experiment(experiment)
    empty = f"cmp-empty-{tag}"
    client.create_experiment(empty)
    t0 = 1_700_000_000_000
    pipe_a, a_pre, a_fine = _pipeline(client, exp_id, "pipe-a", t0, BASE_PARAMS, [
        ("pretrain", {"train/loss": [(0, 2.0), (1, 1.5), (2, 1.2), (3, 1.3), (4, 1.1)],
                      "train/lr": [(0, 0.1), (4, 0.01)], "val/top1": [(4, 0.3)]}, {}),
        ("finetune", {"train/loss": [(1, 0.9), (2, 0.7), (3, 0.8)], "val/top1": [(2, 0.65), (3, 0.6)]}, {}),
    ])
    b_params = {**BASE_PARAMS, "stages.pretrain.optim.base_lr": "0.002", "seed": "1"}
    pipe_b, _, _ = _pipeline(client, exp_id, "pipe-b", t0 + 10, b_params, [
        ("pretrain", {"train/loss": [(0, 2.2), (2, 1.4), (6, 1.0)], "val/top1": [(6, 0.35)]},
         {"stages.pretrain.init_from": "s3://w/x"}),
        ("finetune", {"train/loss": [(0, 0.95), (4, 0.75)], "val/top1": [(4, 0.7)]}, {}),
    ])
    solo_1 = _run(client, exp_id, "solo-1", t0 + 20, params={**BASE_PARAMS, "seed": "7"},
                  metrics={"train/loss": [(0, 3.0), (1, math.nan), (2, 2.5), (3, 2.7)],
                           "train/samples_per_s": [(3, 100.0)]})
    solo_2 = _run(client, exp_id, "solo-2", t0 + 30, params=BASE_PARAMS,
                  metrics={"train/samples_per_s": [(0, 50.0), (1, 80.0), (2, 70.0)], "val/top5": [(2, 0.9)]})
    chain_id = client.create_experiment(f"cmp-chain-{tag}")
    pipe_c = _run(client, chain_id, "pipe-c", t0, params=BASE_PARAMS, metrics={})
    for i, (stage, kind, metrics) in enumerate([
        ("pretrain", "pretrain", {"train/loss": [(0, 3.0), (10, 2.0)], "train/samples": [(0, 0.0), (10, 640.0)],
                                  "train/epoch": [(0, 0.0), (10, 2.0)]}),
        ("finetune", "finetune", {"val/top1": [(4, 0.8)], "train/samples": [(2, 32.0), (4, 64.0)],
                                  "train/epoch": [(2, 0.5), (4, 1.0)]}),
        ("scratch", "finetune", {"val/top1": [(4, 0.6)], "train/samples": [(2, 32.0), (4, 64.0)],
                                 "train/epoch": [(2, 0.5), (4, 1.0)]}),
        ("eval", "eval", {"val/top1": [(0, 0.85)], "raw/val/top1": [(0, 0.82)], "ema/val/top1": [(0, 0.85)]}),
    ]):
        _run(client, chain_id, f"pipe-c-{stage}", t0 + 1 + i, params=BASE_PARAMS, metrics=metrics,
             tags={"revcol.stage": stage, "revcol.kind": kind, "mlflow.parentRunId": pipe_c})
    return Runs(mlflow_server.tracking_uri, experiment, empty, pipe_a, pipe_b, a_pre, a_fine, solo_1, solo_2, pipe_c)


def test_metric_direction_rule() -> None:
    maximized = ("val/top1", "val/top5", "val/top1_col3", "train/samples_per_s")
    assert [metric_direction(k) for k in maximized] == ["max"] * 4
    assert [metric_direction(k) for k in ("train/loss", "val/loss", "data/stall_frac")] == ["min"] * 3
    assert [metric_direction(k) for k in ("train/lr", "train/grad_norm", "data/skipped")] == [None] * 3


def test_pipelines_laid_end_to_end_with_differing_params_and_final_best(runs: Runs, tmp_path: Path) -> None:
    result = compare_runs(runs.uri, run_ids=[runs.pipe_a, runs.pipe_b], metrics=["train/loss", "val/top1"],
                          out_dir=tmp_path)
    a, b = result.subjects
    assert (a.kind, b.kind, a.label, b.label) == ("pipeline", "pipeline", "pipe-a", "pipe-b")
    assert [(p.stage, p.offset, p.last_step) for p in a.stages] == [("pretrain", 0, 4), ("finetune", 4, 3)]
    assert [(p.stage, p.offset, p.last_step) for p in b.stages] == [("pretrain", 0, 6), ("finetune", 6, 4)]

    # exactly the differing params: a missing key differs too; identical ones (and the redacted secret) do not
    assert set(result.params) == {"stages.pretrain.optim.base_lr", "seed", "stages.pretrain.init_from"}
    assert result.params["stages.pretrain.init_from"] == {runs.pipe_a: None, runs.pipe_b: "s3://w/x"}
    assert result.params["seed"] == {runs.pipe_a: "0", runs.pipe_b: "1"}
    table = format_table(result)
    param_rows = table.split("params that differ (3 of 7; blank = not set)\n")[1].split("\nmetrics")[0].splitlines()
    assert sorted(r.split()[0] for r in param_rows) == sorted(result.params)
    assert "scaling.num_workers" not in table and "secret" not in table

    ma, mb = result.metrics[runs.pipe_a], result.metrics[runs.pipe_b]
    assert (ma["train/loss"]["final"], ma["train/loss"]["final_step"]) == (0.8, 7)  # finetune step 3 + offset 4
    assert (ma["train/loss"]["best"], ma["train/loss"]["best_step"]) == (0.7, 6)
    assert (ma["val/top1"]["final"], ma["val/top1"]["best"], ma["val/top1"]["best_step"]) == (0.6, 0.65, 6)
    assert (mb["train/loss"]["final"], mb["train/loss"]["best"], mb["train/loss"]["final_step"]) == (0.75, 0.75, 10)
    assert (mb["val/top1"]["final"], mb["val/top1"]["best"]) == (0.7, 0.7)
    assert ma["train/lr"] == {"final": 0.01, "final_step": 4, "best": None, "best_step": None, "direction": None}
    assert "train/lr" not in mb
    lr_row = next(r for r in table.splitlines() if r.strip().startswith("train/lr"))
    assert lr_row.split() == ["train/lr", "final", "0.01"]  # pipe-b's cell blank
    assert not any(r.strip().startswith("train/lr  best") for r in table.splitlines())

    # the saved plots: a panel per stage, the pipelines' stages overlaid on their own steps (not chained)
    assert set(result.pngs) == {"train/loss", "val/top1"}
    assert Path(result.pngs["train/loss"]) == tmp_path / "train_loss.png"
    fig = plot_metric(result.subjects, "train/loss")
    assert [ax.get_title() for ax in fig.axes] == ["pretrain", "finetune"]
    pretrain, finetune = (ax.get_lines() for ax in fig.axes)
    assert [line.get_label() for line in pretrain] == ["pipe-a: pretrain", "pipe-b: pretrain"]
    assert [line.get_label() for line in finetune] == ["pipe-a: finetune", "pipe-b: finetune"]
    assert list(pretrain[0].get_xdata()) == [0, 1, 2, 3, 4] and list(finetune[1].get_xdata()) == [0, 4]
    assert list(finetune[0].get_ydata()) == [0.9, 0.7, 0.8]
    _check_png(result.pngs["train/loss"], [*pretrain, *finetune], size=(1100, 450))


def test_plots_overlay_sibling_stages_on_samples_and_bar_the_eval(runs: Runs, tmp_path: Path) -> None:
    """finetune and scratch (both kind finetune) share a panel on one x axis; eval is bars per weights kind."""
    result = compare_runs(runs.uri, run_ids=[runs.pipe_c], metrics=["val/top1"], out_dir=tmp_path, x="samples")
    fig = plot_metric(result.subjects, "val/top1", x="samples")
    assert [ax.get_title() for ax in fig.axes] == ["finetune", "eval"]  # pretrain logged no val/top1
    finetune, evaluation = fig.axes
    assert [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in finetune.get_lines()] == [
        ("finetune", [64.0], [0.8]), ("scratch", [64.0], [0.6])]
    assert finetune.get_xlabel() == "training samples"
    bars = {(patch.get_x() + patch.get_width() / 2, patch.get_height()) for patch in evaluation.patches}
    assert sorted(height for _, height in bars) == [0.82, 0.85]  # raw and ema weights, not the duplicate best
    assert [t.get_text() for t in evaluation.get_legend().get_texts()] == ["ema", "raw"]
    epochs = plot_metric(result.subjects, "train/loss", x="epochs")
    assert list(epochs.axes[0].get_lines()[0].get_xdata()) == [0.0, 2.0]
    with pytest.raises(CompareError, match="--x samples: 'pretrain' logged no train/samples"):
        compare_runs(runs.uri, run_ids=[runs.pipe_a], out_dir=tmp_path / "old", x="samples")


def _check_png(path: str, lines, *, size: tuple[int, int]) -> None:
    """The PNG decodes to the figure's size and shows every line's colour (drawn pixels, not just metadata)."""
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours = {tuple(int(round(c * 255)) for c in to_rgb(line.get_color())) for line in lines}
    for colour in colours:
        assert (pixels == colour).all(axis=1).sum() > 50, colour


def test_select_by_experiment_parent_ids_and_stage(runs: Runs, tmp_path: Path) -> None:
    client = MlflowClient(runs.uri)
    by_exp = select_runs(client, experiments=[runs.experiment])
    assert [r.info.run_id for r, _ in by_exp] == [runs.pipe_a, runs.pipe_b, runs.solo_1, runs.solo_2]
    assert [len(kids) for _, kids in by_exp] == [2, 2, 0, 0]
    by_parent = select_runs(client, parent=runs.pipe_a)
    assert [(r.info.run_id, kids) for r, kids in by_parent] == [(runs.a_pretrain, []), (runs.a_finetune, [])]
    by_ids = select_runs(client, run_ids=[runs.solo_2, runs.pipe_b, runs.solo_2])
    assert [r.info.run_id for r, _ in by_ids] == [runs.solo_2, runs.pipe_b]
    finetunes = select_runs(client, experiments=[runs.experiment], stage="finetune")
    assert [r.info.run_name for r, _ in finetunes] == ["pipe-a-finetune", "pipe-b-finetune"]

    # parent selection compares stages on their own axes (no offset), each in its stage's panel
    subjects = load_subjects(client, by_parent)
    assert [s.label for s in subjects] == ["pipe-a-pretrain", "pipe-a-finetune"]
    fig = plot_metric(subjects, "train/loss")
    assert [[list(line.get_xdata()) for line in ax.get_lines()] for ax in fig.axes] == [[[0, 1, 2, 3, 4]], [[1, 2, 3]]]

    # whole experiment: runs without a metric get no line and a blank cell; NaN is never best
    result = compare_runs(runs.uri, experiments=[runs.experiment], out_dir=tmp_path)
    assert set(result.pngs) == {"train/loss", "val/top1"}  # the defaults
    fig = plot_metric(result.subjects, "train/loss")
    assert [ax.get_title() for ax in fig.axes] == ["pretrain", "finetune", "run"]
    assert [line.get_label() for line in fig.axes[2].get_lines()] == ["solo-1"]
    _check_png(result.pngs["train/loss"], [line for ax in fig.axes for line in ax.get_lines()], size=(1650, 450))
    solo_1 = result.metrics[runs.solo_1]["train/loss"]
    assert (solo_1["final"], solo_1["best"], solo_1["best_step"]) == (2.7, 2.5, 2)
    assert result.metrics[runs.solo_2]["train/samples_per_s"]["best"] == 80.0
    assert "train/loss" not in result.metrics[runs.solo_2]
    table = format_table(result).splitlines()
    header = table[0]
    row = next(r for r in table if r.strip().startswith("val/top5  final"))
    assert row.split() == ["val/top5", "final", "0.9"] and row.index("0.9") == header.index("solo-2")


def test_selection_errors(runs: Runs) -> None:
    client = MlflowClient(runs.uri)
    with pytest.raises(CompareError, match="unknown experiment 'nope-x'"):
        select_runs(client, experiments=["nope-x"])
    with pytest.raises(CompareError, match="unknown run id 'deadbeef'"):
        select_runs(client, run_ids=["deadbeef"])
    with pytest.raises(CompareError, match=f"no runs matched: experiment '{runs.empty_experiment}'"):
        select_runs(client, experiments=[runs.empty_experiment])
    with pytest.raises(CompareError, match=f"run '{runs.solo_1}' has no child runs"):
        select_runs(client, parent=runs.solo_1)
    with pytest.raises(CompareError, match="'val/top9' absent in all selected runs"):
        compare_runs(runs.uri, run_ids=[runs.solo_1], metrics=["val/top9"])


def _revcol(*args: str) -> subprocess.Popen[str]:
    """Starts ``python -m pipeline compare ARGS`` (the real entry point) without waiting for it."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "compare", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    return process.returncode, stdout, stderr


def test_cli_json_end_to_end(runs: Runs, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    good = _revcol(runs.pipe_a, f"{runs.pipe_b},{runs.solo_1}", "--tracking-uri", runs.uri,
                   "--metrics", "train/loss,val/top1", "--out", str(out), "--json")
    bad = _revcol("--experiment", "no-such-experiment", "--tracking-uri", runs.uri, "--out", str(out / "bad"), "--json")
    code, stdout, stderr = _finish(good)
    assert code == 0, stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    assert [r["run_id"] for r in report["runs"]] == [runs.pipe_a, runs.pipe_b, runs.solo_1]
    assert [r["kind"] for r in report["runs"]] == ["pipeline", "pipeline", "run"]
    assert [s["stage"] for s in report["runs"][0]["stages"]] == ["pretrain", "finetune"]
    assert set(report["differing_params"]) == {"stages.pretrain.optim.base_lr", "seed", "stages.pretrain.init_from"}
    assert report["metrics"][runs.pipe_a]["val/top1"]["best"] == 0.65
    assert report["directions"]["train/loss"] == "min" and report["directions"]["train/lr"] is None
    assert set(report["pngs"]) == {"train/loss", "val/top1"}
    for path in report["pngs"].values():
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[1] == 450

    code, _, stderr = _finish(bad)
    assert code == 2 and "unknown experiment 'no-such-experiment'" in stderr, stderr
    assert not (out / "bad").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["0123456789abcdef0123456789abcdef"], "unknown run id '0123456789abcdef0123456789abcdef'"),
        (["--experiment", "{empty}"], "no runs matched: experiment '{empty}'"),
        (["--experiment", "{experiment}", "--stage", "distill"], "with stage 'distill'"),
        (["{solo_1}", "--metrics", "train/loss,val/nothing"], "'val/nothing' absent in all selected runs"),
        ([], "nothing selected"),
    ],
)
def test_cli_errors_exit_2(runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str], args, message) -> None:
    names = {"empty": runs.empty_experiment, "experiment": runs.experiment, "solo_1": runs.solo_1}
    argv = ["compare", *(a.format(**names) for a in args), "--tracking-uri", runs.uri, "--out", str(tmp_path), "--json"]
    assert cli.main(argv) == 2
    assert message.format(**names) in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written on error


# ----------------------------------------------------------------------------------------------- the HTML report
@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's headless-capable ``chromium``, installed with apt-get (sudo when not root) when absent."""
    found = shutil.which("chromium")
    if found is None:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        install = [*sudo, "apt-get", "install", "-y", "-q", "chromium"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run([*sudo, "apt-get", "update", "-q"], env=env, check=True, capture_output=True)
            subprocess.run(install, env=env, check=True, capture_output=True)
        found = shutil.which("chromium")
    assert found, "chromium is not installed and could not be installed"
    return found


_IMAGE_PROBE = """<script>
window.addEventListener("load", () => {
  document.body.setAttribute("data-image-widths", Array.from(document.images, i => i.naturalWidth).join(","));
});
</script>"""
"""Added to a copy of the report: after load, each image's decoded width lands in the DOM that --dump-dom prints."""


def _headless(chromium: str, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_html_report_renders_in_headless_chromium(runs: Runs, tmp_path: Path, chromium: str) -> None:
    report = tmp_path / "report.html"
    code = cli.main(["compare", runs.pipe_a, runs.pipe_b, runs.solo_1, "--tracking-uri", runs.uri,
                     "--out", str(tmp_path / "plots"), "--html", str(report)])
    assert code == 0 and report.exists()
    page = report.read_text()
    assert "<img" in page and 'src="data:image/png;base64,' in page and 'src="/' not in page  # self-contained
    assert "stages.pretrain.init_from" in page and "s3://w/x" in page  # a differing param, unclipped
    assert "pipe-a" in page and "solo-1" in page and "train/loss" in page

    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _IMAGE_PROBE + "</body>"))
    dom = _headless(chromium, probe, tmp_path / "profile-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    widths = re.search(r'data-image-widths="([\d,]*)"', dom.stdout)
    assert widths, dom.stdout[-2000:]
    sizes = [Image.open(tmp_path / "plots" / name).size[0] for name in ("train_loss.png", "val_top1.png")]
    assert [int(w) for w in widths.group(1).split(",")] == sizes  # both plots decoded at their size

    shot = tmp_path / "report.png"
    result = _headless(chromium, report, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,1600")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1280, 1600)
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 10  # text, tables and plots drawn, not a blank page
    assert (pixels < 128).mean() > 0.002  # dark pixels: text and curves
