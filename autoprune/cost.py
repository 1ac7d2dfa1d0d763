"""Static costs of a model: MACs, parameters, serialized size.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2), which sees the real matmuls and
convolutions a forward runs, including those inside recurrent layers (Torch-Pruning's counter over-counts
LSTMs ~65x). The fused fast path of ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` hides its
matmuls from the counter, so it is disabled while counting (it is not while measuring latency).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Cost:
    """Static cost of a model for one example input batch."""

    macs: int
    """Multiply-accumulates of one forward over the example inputs."""
    params: int
    """Number of parameters (dense)."""
    nonzero_params: int
    """Parameters that are not exactly zero (differs from ``params`` after unstructured pruning)."""
    size_bytes: int
    """Size of the weights serialized as safetensors."""
    compressed_bytes: int
    """Size of that file after zlib compression: what unstructured sparsity really saves on disk."""

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_params / self.params if self.params else 0.0


def _mkldnn_rnn_layer_flop(
    input_shape: Sequence[int],
    weight_ih_shape: Sequence[int],
    weight_hh_shape: Sequence[int],
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    """FLOPs (2 per MAC) of one ``aten.mkldnn_rnn_layer`` call: one layer, one direction, all steps."""
    steps = math.prod(input_shape[:-1])  # (T, B, I) or (B, T, I): T * B
    return 2 * steps * (math.prod(weight_ih_shape) + math.prod(weight_hh_shape))


FLOP_FORMULAS: dict[Any, Any] = {torch.ops.aten.mkldnn_rnn_layer: _mkldnn_rnn_layer_flop}
"""Formulas for ops FlopCounterMode does not know: oneDNN runs CPU LSTMs as ``aten.mkldnn_rnn_layer``."""


@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    backend = getattr(torch.backends, "mha", None)
    if backend is None or not hasattr(backend, "set_fastpath_enabled"):
        yield
        return
    previous = backend.get_fastpath_enabled()
    backend.set_fastpath_enabled(False)
    try:
        yield
    finally:
        backend.set_fastpath_enabled(previous)


def as_tuple(example_inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore each module's own previous mode after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


def count_macs(model: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[int, dict[str, int]]:
    """MACs of one forward, in total and per module (qualified names, ``""`` is the whole model)."""
    # oneDNN runs CPU LSTMs as aten.mkldnn_rnn_layer, which has no flop formula of its own (it would count 0);
    # imported here because autoprune.pruning imports this module.
    from autoprune.pruning.recurrent import recurrent_flop_formulas

    counter = FlopCounterMode(display=False, custom_mapping=recurrent_flop_formulas())
    with eval_mode(model), torch.no_grad(), _mha_fastpath_disabled(), counter:
        model(*as_tuple(example_inputs))
    per_module: dict[str, int] = {}
    root = type(model).__name__
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = "" if key == root else key.split(".", 1)[1] if key.startswith(root + ".") else key
        per_module[name] = int(sum(ops.values())) // 2
    return int(counter.get_total_flops()) // 2, per_module


def serialize_weights(model: nn.Module) -> bytes:
    """The model's state dict as safetensors bytes (shared tensors are copied apart)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    try:
        return safetensors_save(state)
    except (RuntimeError, ValueError):  # tensors sharing memory must be written as separate copies
        return safetensors_save({k: v.clone() for k, v in state.items()})


def measure_cost(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    macs: int | None = None,
    compress: bool = True,
) -> Cost:
    """Static cost of ``model``. Pass ``macs`` if already counted; ``compress=False`` skips the zlib pass
    (``compressed_bytes`` is then the plain size: dense weights do not compress much)."""
    if macs is None:
        macs, _ = count_macs(model, example_inputs)
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    blob = serialize_weights(model)
    return Cost(
        macs=macs,
        params=params,
        nonzero_params=nonzero,
        size_bytes=len(blob),
        compressed_bytes=len(zlib.compress(blob, 1)) if compress else len(blob),
    )
