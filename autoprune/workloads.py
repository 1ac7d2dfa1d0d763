"""Reference workloads: a small model trained on a built-in dataset, ready to prune.

``resnet20-digits`` (ResNet-20 on sklearn's 8x8 digits) is the default workload of the gymnasium environment
and of the demo; ``cnn1d-mnist1d`` (1-D CNN on MNIST-1D) is the sequence workload of the benchmarks and
``resnet56-digits`` their larger model. Their
trained weights ship inside the package (``autoprune/assets``) so nothing is downloaded or retrained at run
time; :func:`train_classifier` is the deterministic recipe that made them.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.data import Dataset, as_output_tensor, load_dataset
from autoprune.errors import InvalidConfigError
from autoprune.inputs import call_model
from autoprune.models.registry import build_model, example_inputs
from autoprune.models.weights import load_weights


@dataclass(frozen=True)
class WorkloadSpec:
    """A named (architecture, dataset, training recipe)."""

    arch: str
    arch_kwargs: dict[str, Any]
    dataset: str
    epochs: int
    lr: float = 3e-3
    batch_size: int = 64
    seed: int = 0


WORKLOADS: dict[str, WorkloadSpec] = {
    "resnet20-digits": WorkloadSpec("resnet20", {"in_channels": 1, "image_size": 8}, "digits", epochs=15),
    "cnn1d-mnist1d": WorkloadSpec("cnn1d", {"in_channels": 1, "seq_len": 40}, "mnist1d", epochs=15),
    # the larger zoo model of the strategy benchmark (27 residual blocks, 0.86 M parameters)
    "resnet56-digits": WorkloadSpec("resnet56", {"in_channels": 1, "image_size": 8}, "digits", epochs=15),
}


@dataclass
class Workload:
    """A model with its example inputs and dataset."""

    name: str
    model: nn.Module
    example_inputs: torch.Tensor
    dataset: Dataset


def train_classifier(
    model: nn.Module, dataset: Dataset, *, epochs: int, lr: float, batch_size: int, seed: int
) -> nn.Module:
    """Train ``model`` with AdamW + one-cycle LR (deterministic for a seed on one thread)."""
    if not dataset.has_labels:
        raise InvalidConfigError("training a reference model needs labelled data")
    torch.manual_seed(seed)
    steps_per_epoch = -(-dataset.num_train // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
    model.train()
    for epoch in range(epochs):
        for x, y in dataset.train_batches(batch_size, seed=seed + epoch):
            opt.zero_grad(set_to_none=True)
            assert y is not None
            F.cross_entropy(as_output_tensor(call_model(model, x)), y).backward()
            opt.step()
            sched.step()
    return model.eval()


def asset_path(name: str) -> Any:
    return resources.files("autoprune") / "assets" / f"{name}.safetensors"


def load_workload(name: str = "resnet20-digits", *, train_if_missing: bool = True) -> Workload:
    """Build a reference workload; its weights come from the package (or are trained if absent)."""
    try:
        spec = WORKLOADS[name]
    except KeyError:
        raise InvalidConfigError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}") from None
    dataset = load_dataset(spec.dataset, seed=spec.seed)
    torch.manual_seed(spec.seed)
    model = build_model(spec.arch, num_classes=dataset.num_classes or 10, **spec.arch_kwargs)
    path = asset_path(name)
    if path.is_file():
        load_weights(model, path.read_bytes())
    elif train_if_missing:
        train_classifier(model, dataset, epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size, seed=spec.seed)
    else:
        raise InvalidConfigError(f"workload {name!r} has no shipped weights")
    return Workload(name=name, model=model.eval(), example_inputs=example_inputs(model), dataset=dataset)


def build_for_dataset(arch: str, dataset: Dataset | None, **kwargs: Any) -> nn.Module:
    """Build a built-in architecture sized for ``dataset`` (channels, classes, image size or sequence length).

    Keyword arguments win over what is inferred from the data.
    """
    inferred: dict[str, Any] = {}
    if dataset is not None:
        shape = dataset.input_shape
        inferred["in_channels"] = shape[0]
        if dataset.num_classes:
            inferred["num_classes"] = dataset.num_classes
        if len(shape) == 3:
            inferred["image_size"] = shape[1]
        elif len(shape) == 2:
            inferred["seq_len"] = shape[1]
    return build_model(arch, **{**inferred, **kwargs})


def shipped_workload_for(arch: str, dataset_name: str, kwargs: dict[str, Any]) -> str | None:
    """The shipped workload matching (arch, dataset) with default kwargs, if any."""
    for name, spec in WORKLOADS.items():
        if spec.arch == arch.strip().lower() and spec.dataset == dataset_name and not kwargs:
            return name
    return None
