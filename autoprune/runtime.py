"""Runtimes that execute a model: torch eager and ONNX Runtime (CPU), with pinned thread counts.

A *runner* is a zero-argument callable that runs one forward pass of a model on fixed inputs; the latency
meter times runners, the exporter compares their outputs.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from autoprune.cost import ensure_eval
from autoprune.errors import ExportError, InvalidConfigError
from autoprune.inputs import Inputs, KeywordsAsPositional, call_model, input_names, is_named, tensors
from autoprune.names import RUNTIMES

Runner = Callable[[], Any]


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Pin torch's intra-op thread pool to ``threads`` for the block, then restore it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def onnx_bytes(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    dynamo: bool,
    dynamic_batch: bool = False,
) -> bytes:
    """Export ``model`` to an in-memory ONNX model.

    ``dynamo=False`` uses the TorchScript exporter (~0.2 s a small model, used inside the search loop);
    ``dynamo=True`` the torch.export-based one (2-5 s, used for the exported artefact). If the preferred
    exporter fails the other one is tried before giving up.

    ``dynamic_batch=True`` names the first dimension of every input and of the output ``batch`` so that the
    file runs at any batch size. The model is then traced at batch 2 (torch.export specialises a batch of 1
    to a constant, and tracing at another size than the example's lets a verification at the example's size
    catch a batch size baked into the graph). If neither exporter manages a dynamic batch, a fixed-batch
    export is returned: check with :func:`onnx_has_dynamic_batch`.

    Keyword inputs (a mapping) are exported through :class:`~autoprune.inputs.KeywordsAsPositional`: the graph's
    inputs are named after the mapping's keys (an input the model ignores may be left out of the graph).
    """
    args = tensors(example_inputs)
    names = input_names(example_inputs)
    if is_named(example_inputs):
        model = KeywordsAsPositional(model, names)
    attempts = [(dynamo, True), (not dynamo, True)] if dynamic_batch else []
    attempts += [(dynamo, False), (not dynamo, False)]
    errors: list[str] = []
    for use_dynamo, dynamic in attempts:
        traced = tuple(t[:1].expand(2, *t.shape[1:]).contiguous() for t in args) if dynamic else args
        try:
            with warnings.catch_warnings(), _quiet_onnx_logs(), torch.no_grad():
                warnings.simplefilter("ignore")
                if use_dynamo:
                    batch = torch.export.Dim("batch")
                    program = torch.onnx.export(
                        model.eval(),
                        traced,
                        dynamo=True,
                        input_names=names,
                        output_names=["output"],
                        dynamic_shapes=tuple({0: batch} for _ in traced) if dynamic else None,
                        verbose=False,
                    )
                    assert program is not None
                    return bytes(program.model_proto.SerializeToString())
                buffer = io.BytesIO()
                torch.onnx.export(  # the TorchScript exporter writes to file objects too
                    model.eval(),
                    traced,
                    buffer,  # type: ignore[arg-type]
                    dynamo=False,
                    input_names=names,
                    output_names=["output"],
                    dynamic_axes={n: {0: "batch"} for n in [*names, "output"]} if dynamic else None,
                )
                return buffer.getvalue()
        except Exception as exc:  # exporters raise a variety of internal errors
            kind = ("dynamo" if use_dynamo else "torchscript") + (" (dynamic batch)" if dynamic else "")
            errors.append(f"{kind}: {type(exc).__name__}: {exc}")
    raise ExportError("ONNX export failed: " + " | ".join(e.splitlines()[0] for e in errors))


def onnx_has_dynamic_batch(session: Any) -> bool:
    """Whether every input of an ONNX Runtime session takes any batch size (a named or unknown first axis)."""
    return all(spec.shape and not isinstance(spec.shape[0], int) for spec in session.get_inputs())


@contextlib.contextmanager
def _quiet_onnx_logs() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    redirect = io.StringIO()
    try:
        with contextlib.redirect_stdout(redirect):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def ort_session(model_bytes: bytes, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load the model: {exc}") from exc


def ort_feed(session: Any, example_inputs: Inputs) -> dict[str, np.ndarray]:
    """The session's feed: keyword inputs by name (the graph may have dropped inputs the model ignores),
    positional inputs in order."""
    specs = session.get_inputs()
    if isinstance(example_inputs, Mapping):
        missing = [spec.name for spec in specs if spec.name not in example_inputs]
        if missing:
            raise ExportError(
                f"the ONNX model takes inputs {[s.name for s in specs]}; none given for {missing} "
                f"(given: {list(example_inputs)})"
            )
        return {spec.name: example_inputs[spec.name].detach().cpu().numpy() for spec in specs}
    return {spec.name: t.detach().cpu().numpy() for spec, t in zip(specs, tensors(example_inputs), strict=True)}


def make_runner(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    runtime: str = "torch",
    threads: int = 1,
    onnx_model: bytes | None = None,
) -> Runner:
    """A callable running one forward of ``model`` on ``example_inputs`` in the given runtime."""
    if runtime == "torch":
        ensure_eval(model)

        def run_torch() -> Any:
            with torch.inference_mode():
                return call_model(model, example_inputs)

        return run_torch
    if runtime == "onnxruntime":
        session = ort_session(onnx_model or onnx_bytes(model, example_inputs, dynamo=False), threads)
        feed = ort_feed(session, example_inputs)

        def run_ort() -> Any:
            return session.run(None, feed)

        return run_ort
    raise InvalidConfigError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")


@functools.cache
def _versions() -> tuple[tuple[str, str], ...]:
    versions: dict[str, str] = {"torch": str(torch.__version__)}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover - a hard dependency, but keep the protocol readable without it
        pass
    return tuple(versions.items())


def runtime_versions() -> dict[str, str]:
    """Versions of torch and ONNX Runtime, recorded with every latency figure."""
    return dict(_versions())
