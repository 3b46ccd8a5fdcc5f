"""Where a run came from: the tags `platform/tracking.py` puts on every run and new experiment.

A run carries the installed package version, the git commit when the package is imported from a
checkout, and the command line that started it (docs/architecture.md#tracking). An experiment is
marked as model training, so that MLflow 3's UI opens it on the runs table rather than on its
GenAI overview.

Pure: this module builds tag dictionaries; every MLflow call stays in `platform/tracking.py`.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

PACKAGE = "maxdeeplab"
VERSION_TAG = "maxdeeplab.version"
COMMAND_TAG = "maxdeeplab.command"
# MLflow's own tag for a run's source commit (`mlflow.utils.mlflow_tags.MLFLOW_GIT_COMMIT`): the
# UI shows it on the run page. Spelled out so that building tags does not import MLflow.
GIT_COMMIT_TAG = "mlflow.source.git.commit"
# The experiment tag MLflow 3's UI reads to choose an experiment's view, and its value for model
# training (the `ExperimentKind` enum of the UI, mlflow/server/js; MLflow has no Python constant).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"
GIT_TIMEOUT_S = 2.0
MAX_TAG_LENGTH = 5000  # under MLflow's limit on a tag value (8000 characters)
# A package installed into an environment is not a checkout, even inside one (a venv in a repo).
_INSTALLED_PARTS = frozenset({"site-packages", "dist-packages"})


def package_version() -> str:
    """The installed distribution's version ('unknown' when run from a tree never installed)."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


def source_dir() -> Path:
    """The package's source directory: the folder holding `platform/` (the repository root in a
    checkout, `site-packages/maxdeeplab` in an installed copy)."""
    return Path(__file__).resolve().parent.parent


def git_commit(directory: str | Path | None = None, timeout_s: float = GIT_TIMEOUT_S) -> str | None:
    """`git rev-parse HEAD` in `directory` (default: the package's source dir).

    Returns None when that is not a git checkout, an installed copy, git is missing, or git does
    not answer within `timeout_s`: provenance never stops a run.
    """
    path = Path(directory) if directory is not None else source_dir()
    if _INSTALLED_PARTS & set(path.resolve().parts):
        return None
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def run_tags(argv: Sequence[str] | None = None) -> dict[str, str]:
    """The provenance tags of a new run.

    Args:
        argv: the command line (default: `sys.argv`).

    Returns:
        {`maxdeeplab.version`, `maxdeeplab.command`, and `mlflow.source.git.commit` when the
        package is a checkout}.
    """
    command = shlex.join(sys.argv if argv is None else argv)
    tags = {VERSION_TAG: package_version(), COMMAND_TAG: command[:MAX_TAG_LENGTH]}
    commit = git_commit()
    if commit is not None:
        tags[GIT_COMMIT_TAG] = commit
    return tags


def experiment_tags() -> dict[str, str]:
    """The tags of a new experiment: MLflow 3's UI opens it on the model-training view."""
    return {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND_TRAINING}
