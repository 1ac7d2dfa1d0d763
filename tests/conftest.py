"""Shared fixtures: the shipped ResNet-20 digits workload and an Objective over it (deterministic meter).

Imports of the library stay inside the fixtures: collecting the service tests must not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
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
