"""Shared test setup: markers, and small configs that keep the default run fast on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes minutes; excluded from `make test`")


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    # Tests run beside server threads and child processes on small machines.
    torch.set_num_threads(1)
