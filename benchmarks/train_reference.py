"""Train the reference workloads whose weights ship in autoprune/assets (run once; deterministic).

.venv/bin/python benchmarks/train_reference.py
"""

from __future__ import annotations

import torch

from autoprune.models.weights import save_weights
from autoprune.quality import Accuracy
from autoprune.workloads import WORKLOADS, asset_path, load_workload

if __name__ == "__main__":
    torch.set_num_threads(2)
    for name in WORKLOADS:
        workload = load_workload(name, train_if_missing=True) if not asset_path(name).is_file() else None
        if workload is None:
            print(f"{name}: weights already shipped at {asset_path(name)}")
            continue
        save_weights(workload.model, str(asset_path(name)))
        print(f"{name}: val accuracy {Accuracy()(workload.model, workload.dataset):.4f} -> {asset_path(name)}")
