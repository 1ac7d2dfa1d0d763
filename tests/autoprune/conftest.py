"""Shared fixtures: the shipped ResNet-20 digits workload and an Objective over it (deterministic meter).

This file lives in tests/autoprune, not tests/: a tests/conftest.py makes pytest (prepend import mode) put
tests/ on sys.path, and then ``import autoprune`` finds the directory tests/autoprune as a namespace package
before the editable install's finder, so autoprune/__init__.py never runs (no ENV_ID, env not registered).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from autoprune.data import Dataset
    from autoprune.objective import Objective
    from autoprune.workloads import Workload


@pytest.fixture(scope="session")
def digits_workload() -> Workload:
    """``load_workload("resnet20-digits")``: trained weights from autoprune/assets, the full digits dataset."""
    from autoprune.workloads import load_workload

    return load_workload("resnet20-digits")


@pytest.fixture(scope="session")
def digits_objective(digits_workload: Workload) -> Objective:
    """An Objective on the digits workload (256 train / 128 val samples) with the deterministic meter.

    Shared by several modules: do not change its settings; evaluation indices grow as tests evaluate plans.
    """
    from autoprune.latency import DeterministicMeter
    from autoprune.objective import Objective

    wl = digits_workload
    return Objective(wl.model, wl.example_inputs, wl.dataset.subset(256, 128), latency=DeterministicMeter())


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Pin torch to one intra-op thread for a module (restored after): on a loaded 2-core machine two spinning
    OpenMP threads can make small-model tests an order of magnitude slower."""
    from autoprune.runtime import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def digits_subset() -> Dataset:
    """256 training and 64 validation samples of digits (and its test split): training-time pruning tests."""
    from autoprune.data import load_dataset

    return load_dataset("digits").subset(256, 64)
