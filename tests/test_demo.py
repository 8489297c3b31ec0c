"""The embedded default runs end to end through the CLI on the bundled digits."""

from __future__ import annotations

import json
import subprocess
import sys

from safetensors.torch import load_file

import revcol


def test_demo_cli_trains_and_exports(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo", "--epochs", "3", "--workdir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["test_samples"] == 449 and summary["train_samples"] == 1348
    assert summary["test_top1"] > 0.5  # ten classes: chance is 0.1
    model = revcol.create_model("revcol_test", num_classes=10)
    model.load_state_dict(load_file(summary["weights"]))  # the export loads without the pipeline
