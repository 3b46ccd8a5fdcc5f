"""Shared pytest fixtures. One Ray instance serves the whole test session."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray instance for the session (2 CPUs, dashboard on: Train V2 needs it).

    Why: docs/architecture.md#keep-the-dashboard-process.

    Tests that need Ray take this fixture and carry the `ray` marker. A test that needs a
    different cluster (e.g. a simulated multi-node one) runs it in a subprocess instead.
    """
    ray = pytest.importorskip("ray")
    from maxdeeplab.platform.training.launch import free_port

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=True,
            dashboard_port=free_port(),  # other Ray instances on the machine may hold 8265
            logging_level=logging.ERROR,
        )
    yield
    ray.shutdown()


@pytest.fixture
def assert_no_placement_groups() -> Callable[[], None]:
    """Checks Ray's placement-group table: nothing a finished run or trial created still holds
    resources. Removal is asynchronous in Ray's GCS, hence a short wait."""
    from maxdeeplab.platform.training.placement_groups import live_placement_groups

    def check() -> None:
        deadline = time.monotonic() + 10
        while (live := live_placement_groups()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not live, f"placement groups left behind: {live}"

    return check
