"""Provenance tags: every run says which version, commit and command made it; every experiment
the project creates opens on MLflow 3's model-training view. Read back from a real sqlite store."""

from __future__ import annotations

import re
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from mlflow import MlflowClient

from maxdeeplab.platform import provenance, tracking
from maxdeeplab.platform.config import load_experiment

ROOT = Path(__file__).resolve().parents[2]
ARGV = ["maxdeeplab", "train", "my exp.yaml", "train.steps=10"]


def test_runs_and_new_experiments_carry_provenance(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("sys.argv", ARGV)
    cfg = load_experiment(None, [f"work_dir={tmp_path / 'runs'}", "tracking.experiment=prov"])
    run_id = tracking.create_run(cfg, "a-run", tags={"note": "mine"})
    sweep_yaml = tmp_path / "sweep.yaml"
    sweep_yaml.write_text("name: prov\n")
    sweep_id = tracking.create_sweep_run(cfg, "a-sweep", sweep_yaml, {"train.steps": [1, 2]})

    client = MlflowClient(tracking_uri=tracking.tracking_uri(cfg))
    if (ROOT / ".git").exists():  # the tests' own checkout
        assert re.fullmatch(r"[0-9a-f]{40}", provenance.git_commit(ROOT) or "")
    # The package's: its checkout's commit, or none when it is installed (CI ends with the wheel).
    expected_commit = provenance.git_commit()
    for rid in (run_id, sweep_id):
        tags = client.get_run(rid).data.tags
        assert tags[provenance.VERSION_TAG] == metadata.version("maxdeeplab")
        assert tags[provenance.COMMAND_TAG] == "maxdeeplab train 'my exp.yaml' train.steps=10"
        assert tags.get(provenance.GIT_COMMIT_TAG) == expected_commit
    assert client.get_run(run_id).data.tags["note"] == "mine"
    assert client.get_run(sweep_id).data.tags["sweep"] == "a-sweep"
    experiment = client.get_experiment_by_name("prov")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_commit_tag_name_is_mlflows_own():
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    assert provenance.GIT_COMMIT_TAG == MLFLOW_GIT_COMMIT


def test_no_commit_outside_a_checkout(tmp_path):
    assert provenance.git_commit(tmp_path) is None
    # An installed copy is no checkout, even in an environment kept inside one.
    installed = ROOT / ".venv" / "lib" / "python3.11" / "site-packages" / "maxdeeplab"
    assert provenance.git_commit(installed) is None


@pytest.mark.parametrize(
    "error", [FileNotFoundError("git"), subprocess.TimeoutExpired("git", provenance.GIT_TIMEOUT_S)]
)
def test_no_commit_when_git_is_missing_or_hangs(monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(subprocess, "run", fail)
    assert provenance.git_commit(ROOT) is None
    assert provenance.GIT_COMMIT_TAG not in provenance.run_tags(["maxdeeplab"])
