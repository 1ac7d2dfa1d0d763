"""Static costs of a model: MACs, parameters, serialized size.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2), which sees the real matmuls and
convolutions a forward runs, including those inside recurrent layers (Torch-Pruning's counter over-counts
LSTMs ~65x). The fused fast path of ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` hides its
matmuls from the counter, so it is disabled while counting (it is not while measuring latency).

Counting runs a forward under the counter, which costs several times the forward itself. For the many pruned
candidates of one base model, :class:`MacProfile` gives the same figure without any forward when every MAC of
the base model is done by plain convolution / linear layers (whose MACs are proportional to their weight's
size at fixed input and spatial size, which channel pruning does not change); the safetensors size is
likewise computed from the tensors' shapes (:func:`weights_size`) instead of serializing the weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autoprune.inputs import Inputs, call_model, tensors


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


def as_tuple(example_inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """The tensors of ``example_inputs`` in order (see :func:`autoprune.inputs.tensors`)."""
    return tensors(example_inputs)


def ensure_eval(model: nn.Module) -> nn.Module:
    """``model.eval()``, skipped when every module is already in eval mode (checking is cheaper than the walk)."""
    if any(m.training for m in model.modules()):
        model.eval()
    return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore each module's own previous mode after.

    A model already in eval mode throughout (the common case on the evaluation path) is left alone: walking
    and restoring every module's flag costs more than a small model's forward pass."""
    modules = list(model.modules())
    modes = [m.training for m in modules]
    if any(modes):
        model.eval()
    try:
        yield model
    finally:
        for m, mode in zip(modules, modes, strict=True):
            if m.training != mode:  # nn.Module.__setattr__ is slow: only touch what changed
                m.training = mode


def count_macs(model: nn.Module, example_inputs: Inputs) -> tuple[int, dict[str, int]]:
    """MACs of one forward, in total and per module (qualified names, ``""`` is the whole model)."""
    # oneDNN runs CPU LSTMs as aten.mkldnn_rnn_layer, which has no flop formula of its own (it would count 0)
    counter = FlopCounterMode(display=False, custom_mapping=dict(FLOP_FORMULAS))
    with eval_mode(model), torch.no_grad(), _mha_fastpath_disabled(), counter:
        call_model(model, example_inputs)
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


_SAFETENSORS_DTYPES: dict[torch.dtype, tuple[str, int]] = {
    dtype: (name, rank)
    for rank, (dtype, name) in enumerate(
        [
            (torch.bool, "BOOL"),
            (torch.uint8, "U8"),
            (torch.int8, "I8"),
            (torch.float8_e5m2, "F8_E5M2"),
            (torch.float8_e4m3fn, "F8_E4M3"),
            (torch.int16, "I16"),
            (torch.uint16, "U16"),
            (torch.float16, "F16"),
            (torch.bfloat16, "BF16"),
            (torch.int32, "I32"),
            (torch.uint32, "U32"),
            (torch.float32, "F32"),
            (torch.complex64, "C64"),
            (torch.float64, "F64"),
            (torch.int64, "I64"),
            (torch.uint64, "U64"),
        ]
    )
}
"""Torch dtype -> (safetensors dtype name, rank in safetensors' ``Dtype`` order, which sorts the header)."""


def weights_size(model: nn.Module) -> int:
    """``len(serialize_weights(model))`` computed from the state dict's shapes, without copying any data.

    A safetensors file is an 8-byte length, a JSON header padded with spaces to a multiple of 8, then the
    tensors' bytes; the header lists the tensors by descending dtype then name, each with its byte offsets.
    Falls back to serializing for anything unusual (a dtype not in the table, a value that is not a dense
    tensor). ``tests/autoprune/test_objective.py`` checks the two agree.
    """
    entries: list[tuple[int, str, str, list[int], int]] = []
    for name, value in model.state_dict().items():
        known = isinstance(value, torch.Tensor) and value.layout == torch.strided
        spec = _SAFETENSORS_DTYPES.get(value.dtype) if known else None
        if spec is None:
            return len(serialize_weights(model))
        entries.append((-spec[1], name, spec[0], list(value.shape), value.numel() * value.element_size()))
    entries.sort(key=lambda e: (e[0], e[1]))
    header: dict[str, Any] = {}
    offset = 0
    for _, name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + text + (-text) % 8 + offset


_PROPORTIONAL_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
"""Exact layer types whose MACs are ``weight.numel()`` times a factor that channel pruning does not change
(batch x output positions for convolutions and linear layers, input positions for transposed ones)."""


@dataclass(frozen=True)
class MacProfile:
    """MACs of pruned variants of one base model, derived from the base model's count without a forward.

    Valid only when plain conv / linear layers (exact types) account for every MAC the counter saw in the base
    model: the pruned model's MACs are then each layer's base MACs scaled by its weight's new size. Build it
    with :meth:`of`, which returns ``None`` for models it cannot describe (attention, recurrent layers, matmuls
    in a custom forward), and count those with :func:`count_macs`.
    """

    layers: tuple[tuple[str, int, int], ...]
    """``(qualified name, base MACs, base weight numel)`` of every layer that does MACs."""

    @classmethod
    def of(cls, model: nn.Module, total: int, per_module: Mapping[str, int]) -> MacProfile | None:
        """The profile of ``model`` from its :func:`count_macs` result, or ``None`` if it does not apply."""
        modules = dict(model.named_modules())
        layers = []
        for name, macs in per_module.items():
            module = modules.get(name)
            if macs and module is not None and type(module) in _PROPORTIONAL_LAYERS:
                numel = module.weight.numel()
                if not numel or macs % numel:
                    return None
                layers.append((name, macs, numel))
        if not layers or sum(macs for _, macs, _ in layers) != total:
            return None
        return cls(tuple(layers))

    def macs(self, model: nn.Module) -> int | None:
        """MACs of ``model`` (a pruned copy of the base model), or ``None`` if its layers do not match."""
        modules = dict(model.named_modules())
        total = 0
        for name, macs, numel in self.layers:
            module = modules.get(name)
            weight = getattr(module, "weight", None) if type(module) in _PROPORTIONAL_LAYERS else None
            if not isinstance(weight, torch.Tensor):
                return None
            total += macs // numel * weight.numel()
        return total


def measure_cost(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    macs: int | None = None,
    compress: bool = True,
) -> Cost:
    """Static cost of ``model``. Pass ``macs`` if already counted; ``compress=False`` skips serializing and the
    zlib pass (``compressed_bytes`` is then the plain size: dense weights do not compress much)."""
    if macs is None:
        macs, _ = count_macs(model, example_inputs)
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    if compress:
        blob = serialize_weights(model)
        size, compressed = len(blob), len(zlib.compress(blob, 1))
    else:
        size = compressed = weights_size(model)
    return Cost(macs=macs, params=params, nonzero_params=nonzero, size_bytes=size, compressed_bytes=compressed)
