"""Export a pruned model and prove its speed-up on the exported artefact.

Formats:

* ``onnx``: exported with torch's exporter with a dynamic ``batch`` axis (any batch size runs), loaded in
  ONNX Runtime and its outputs compared with torch's within a tolerance, at the example inputs' batch size
  and at another one (an :class:`ExportError` otherwise);
* ``safetensors`` (+ ``plan.json``): the pruned weights and the plan; :func:`load_pruned` rebuilds the model
  by re-applying the plan to the base model and loading the weights (no pickle, no Python class needed
  beyond the base architecture);
* ``pt2``: a ``torch.export`` program, loadable without the model's class.

A pruned HuggingFace model can also be written with its own ``save_pretrained``: its config carries what each
layer kept (``autoprune_layout``, written when the plan was applied), and :func:`load_pretrained_pruned` rebuilds
those shapes before loading ``model.safetensors``. ``from_pretrained`` alone cannot: a config has one head count
and one FFN width for all layers, so it builds the unpruned shapes and the pruned weights do not fit them.

:func:`export_model` re-measures the exported ONNX model against the exported unpruned model, interleaved in
the same window, and reports the speed-up with its protocol.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoprune.cost import eval_mode
from autoprune.data import as_output_tensor
from autoprune.errors import CorruptFileError, ExportError, InvalidConfigError, InvalidModelError
from autoprune.inputs import Inputs, call_model, cycled, is_named, tensors
from autoprune.latency import Latency, LatencyConfig, Meter, batched
from autoprune.models.weights import load_weights, weights_to_bytes
from autoprune.plan import Plan
from autoprune.pruning import apply_plan
from autoprune.pruning.heads import LAYOUT_KEY, set_heads
from autoprune.runtime import onnx_bytes, onnx_has_dynamic_batch, ort_feed, ort_session

FORMATS = ("onnx", "safetensors", "pt2")


@dataclass(frozen=True)
class ExportReport:
    """What was written, how it was verified and how fast it runs."""

    files: dict[str, str]
    """Format -> path of the written file."""
    max_abs_diff: float | None = None
    """Largest |ONNX Runtime - torch| over the verification inputs."""
    latency: Latency | None = None
    """The exported ONNX model timed in ONNX Runtime, interleaved with the exported unpruned model."""
    base_latency_ms: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        return self.latency.speedup if self.latency is not None else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["speedup"] = self.speedup
        return data


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _other_batch(example_inputs: Inputs, batch_size: int) -> Inputs:
    """``batch_size`` samples cycled from the example inputs. Values are not perturbed: inputs may encode
    token ids or other values a model only accepts as they are."""
    return cycled(example_inputs, batch_size)


def _torch_output(model: nn.Module, inputs: Inputs) -> np.ndarray:
    with eval_mode(model), torch.no_grad():
        out = call_model(model, inputs)
    out_t = as_output_tensor(out)
    return out_t.detach().cpu().numpy()


def _compare(session: Any, expected: np.ndarray, inputs: Inputs, atol: float) -> float:
    got = session.run(None, ort_feed(session, inputs))[0]
    if got.shape != expected.shape:
        raise ExportError(f"ONNX Runtime output has shape {got.shape}, torch's {expected.shape}")
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    scale = float(np.max(np.abs(got))) if got.size else 0.0
    if not np.isfinite(diff) or diff > atol * max(1.0, scale):
        raise ExportError(f"ONNX Runtime output differs from torch by {diff:.3g} (tolerance {atol:g})")
    return diff


def verify_onnx(
    model: nn.Module, model_bytes: bytes, example_inputs: Inputs, *, atol: float = 1e-4, other_batch: int = 3
) -> float:
    """Run the ONNX model in ONNX Runtime and compare with torch; returns the max abs difference.

    A file with a dynamic batch axis is also checked at ``other_batch`` samples (0 skips it), which catches a
    batch size baked into the graph by tracing; skipped if the torch model itself does not run at that size."""
    session = ort_session(model_bytes, threads=1)
    diff = _compare(session, _torch_output(model, example_inputs), example_inputs, atol)
    if other_batch and onnx_has_dynamic_batch(session):
        inputs = _other_batch(example_inputs, other_batch)
        try:
            expected = _torch_output(model, inputs)
        except Exception:  # the first dimension is not a batch for the model itself: nothing to compare with
            return diff
        try:
            diff = max(diff, _compare(session, expected, inputs, atol))
        except ExportError as exc:
            raise ExportError(f"at batch size {other_batch}: {exc}") from exc
        except Exception as exc:  # ONNX Runtime rejects shapes baked into the graph with its own errors
            raise ExportError(f"ONNX Runtime cannot run the model at batch size {other_batch}: {exc}") from exc
    return diff


def export_onnx(
    model: nn.Module, example_inputs: Inputs, *, atol: float = 1e-4, dynamo: bool = True, dynamic_batch: bool = True
) -> tuple[bytes, float]:
    """ONNX bytes of ``model`` (by default with a dynamic batch axis), verified in ONNX Runtime."""
    data = onnx_bytes(model, example_inputs, dynamo=dynamo, dynamic_batch=dynamic_batch)
    return data, verify_onnx(model, data, example_inputs, atol=atol)


def export_pt2(model: nn.Module, example_inputs: Inputs, path: Path) -> None:
    try:
        with eval_mode(model):
            if is_named(example_inputs):  # keyword inputs stay keyword arguments of the program
                program = torch.export.export(model, (), kwargs=dict(example_inputs))  # type: ignore[arg-type]
            else:
                program = torch.export.export(model, tensors(example_inputs))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(path))
    except Exception as exc:
        raise ExportError(f".pt2 export failed: {type(exc).__name__}: {exc}") from exc


def save_pruned(
    model: nn.Module, plan: Plan, directory: str | os.PathLike[str], *, stem: str = "model"
) -> dict[str, str]:
    """Write ``<stem>.safetensors`` and ``<stem>.plan.json``; :func:`load_pruned` reads them back."""
    out = Path(directory)
    weights = out / f"{stem}.safetensors"
    plan_path = out / f"{stem}.plan.json"
    _atomic_write(weights, weights_to_bytes(model, metadata={"autoprune_plan": json.dumps(plan.to_json())}))
    _atomic_write(plan_path, json.dumps(plan.to_json(), indent=2).encode())
    return {"safetensors": str(weights), "plan": str(plan_path)}


def load_pruned(
    base: nn.Module,
    example_inputs: Inputs,
    plan: Plan | str | os.PathLike[str],
    weights: str | os.PathLike[str] | bytes,
) -> nn.Module:
    """Rebuild a pruned model: apply ``plan`` to ``base`` (shapes), then load the pruned weights."""
    if not isinstance(plan, Plan):
        plan = Plan.from_json(Path(plan).read_text(encoding="utf-8"))
    model = apply_plan(base, plan, example_inputs)
    source = weights if isinstance(weights, bytes) else str(weights)
    return load_weights(model, source).eval()


def load_pretrained_pruned(model_class: Any, directory: str | os.PathLike[str]) -> nn.Module:
    """Reload a pruned HuggingFace model written by ``save_pretrained`` (``config.json`` + ``model.safetensors``).

    ``model_class`` is the transformers class (``BertModel``, ``BertForSequenceClassification``...). The model is
    built from the config at its unpruned size, every linear layer the config's ``autoprune_layout`` lists is
    replaced by one of the recorded ``[in, out]`` size, head counts are set, then the weights are loaded (all
    keys, all shapes checked). Only head and FFN (linear) pruning is recorded: a model whose hidden size was
    pruned (``prune_hidden=True``) is rebuilt with :func:`load_pruned` from its base model and plan instead.
    Sharded checkpoints are not read.
    """
    path = Path(directory)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CorruptFileError(f"{path} has no model.safetensors (a sharded or .bin checkpoint is not supported)")
    config = model_class.config_class.from_pretrained(str(path))
    model: nn.Module = model_class(config)
    record = getattr(config, LAYOUT_KEY, None) or {}
    try:
        for name, (fan_in, fan_out) in dict(record.get("linear", {})).items():
            old = model.get_submodule(name)
            if not isinstance(old, nn.Linear):
                raise InvalidModelError(f"{LAYOUT_KEY} lists {name!r}, which is a {type(old).__name__}, not a Linear")
            parent, _, leaf = name.rpartition(".")
            new = nn.Linear(int(fan_in), int(fan_out), bias=old.bias is not None, dtype=old.weight.dtype)
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
        for name, heads in dict(record.get("heads", {})).items():
            set_heads(model.get_submodule(name), int(heads))
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidModelError(f"{path}/config.json: {LAYOUT_KEY} does not fit {model_class.__name__}: {exc}") from exc
    return load_weights(model, weights).eval()


def export_model(
    model: nn.Module,
    example_inputs: Inputs,
    directory: str | os.PathLike[str],
    *,
    plan: Plan | None = None,
    base: nn.Module | None = None,
    formats: tuple[str, ...] = FORMATS,
    stem: str = "model",
    latency: LatencyConfig | None = None,
    atol: float = 1e-4,
) -> ExportReport:
    """Write ``model`` in the given formats under ``directory``, verify the ONNX file, and (with ``base``)
    re-measure the exported model against the exported unpruned model."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise InvalidConfigError(f"unknown export format(s) {unknown}; choose from {', '.join(FORMATS)}")
    if "safetensors" in formats and plan is None:
        raise InvalidConfigError("safetensors export needs the plan (weights are reloaded by re-applying it)")
    out = Path(directory)
    files: dict[str, str] = {}
    diff: float | None = None
    measured: Latency | None = None
    base_ms: float | None = None
    notes: list[str] = []
    if "onnx" in formats:
        data, diff = export_onnx(model, example_inputs, atol=atol)
        _atomic_write(out / f"{stem}.onnx", data)
        files["onnx"] = str(out / f"{stem}.onnx")
        if not onnx_has_dynamic_batch(ort_session(data, 1)):
            notes.append(f"{stem}.onnx has a fixed batch size: the model did not export with a dynamic one")
        if base is not None:
            cfg = latency or LatencyConfig(runtime="onnxruntime")
            if cfg.runtime != "onnxruntime":
                cfg = LatencyConfig(**{**asdict(cfg), "runtime": "onnxruntime"})
            # exported the same way as the candidate, so that both files are timed on equal terms
            base_bytes = onnx_bytes(base, example_inputs, dynamo=True, dynamic_batch=True)
            inputs = batched(example_inputs, cfg.batch_size)
            cand = ort_session(data, cfg.threads)
            ref = ort_session(base_bytes, cfg.threads)
            cand_feed, ref_feed = ort_feed(cand, inputs), ort_feed(ref, inputs)
            measured = Meter(cfg).measure_runners(lambda: cand.run(None, cand_feed), lambda: ref.run(None, ref_feed))
            base_ms = measured.reference_median_ms
    if "safetensors" in formats:
        assert plan is not None
        files.update(save_pruned(model, plan, out, stem=stem))
    if "pt2" in formats:
        export_pt2(model, example_inputs, out / f"{stem}.pt2")
        files["pt2"] = str(out / f"{stem}.pt2")
    return ExportReport(files=files, max_abs_diff=diff, latency=measured, base_latency_ms=base_ms, notes=notes)
