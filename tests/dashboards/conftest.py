"""One MLflow store for the dashboard tests: creating a sqlite store runs MLflow's schema
migrations (seconds on 2 cores), so the test modules share it, each in its own experiment."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tracking_work_dir(tmp_path_factory) -> Path:
    """A work dir whose `mlflow.db` is the default store (MLFLOW_TRACKING_URI is unset for it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield tmp_path_factory.mktemp("dashboards") / "runs"
