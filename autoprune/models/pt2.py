"""Intake of a ``torch.export`` program (``.pt2``) uploaded without its Python class.

A user exports their model with ``torch.export.export(model, (x,))`` and ``torch.export.save(ep, path)``. We
rebuild a :class:`torch.fx.GraphModule` from the graph in which every layer whose weight is a parameter becomes a
real ``nn`` module holding the parameters, so Torch-Pruning's ``DependencyGraph`` (which recognises layers through
module forward hooks) prunes it like any other model. Everything else (relu, add, cat, flatten, pooling,
view/reshape, mean, attention...) stays a functional ``aten`` node of the graph.

Converted (aten op → module): ``conv1d/2d/3d`` (also the ``padding="same"`` overloads), ``convolution`` and
``conv_transpose1d/2d/3d`` → ``nn.Conv*d`` / ``nn.ConvTranspose*d``; ``linear`` (and decomposed ``addmm``/``mm``
with a transposed 2-D weight) → ``nn.Linear``; ``batch_norm`` / ``_native_batch_norm_legit_no_training`` →
``nn.BatchNorm1d/2d/3d`` (by input rank, running stats and ``num_batches_tracked`` included); ``instance_norm`` →
``nn.InstanceNorm*d``; ``layer_norm`` / ``native_layer_norm`` → ``nn.LayerNorm`` (also without affine parameters,
so ``normalized_shape`` follows pruning); ``group_norm`` / ``native_group_norm`` → ``nn.GroupNorm``; ``rms_norm`` →
``nn.RMSNorm`` (Torch-Pruning 1.6 has no pruner for it: pass one or ignore it); ``embedding`` → ``nn.Embedding``;
``prelu`` → ``nn.PReLU``. One weight used by several calls with the same settings gives one shared module; weights
tied across layers stay one ``nn.Parameter``. A parameter used by any other op (``x * self.scale``, a ViT
``pos_embed`` added with ``aten.add``...) raises :class:`UnsupportedOperatorError` naming the op; buffers and
constants used by functional ops stay buffers of the rebuilt module.

Safety: why this module does not call ``torch.export.load``
------------------------------------------------------------
We read the sources of torch 2.13 (``torch/export/__init__.py``, ``torch/export/pt2_archive/_package.py``,
``torch/_export/serde/serialize.py``, ``torch/export/_unlift.py``, ``torch/utils/_pytree.py``). Its own docstring
warns "uses pickle under the hood ... never load data from an untrusted source", and indeed a crafted ``.pt2`` can
run code in at least these ways:

1. ``data/sample_inputs/<model>.pt`` is a ``torch.save`` pickle, read by ``deserialize_torch_artifact``, which tries
   ``torch.load(weights_only=True)`` and, on *any* failure, retries with ``torch.load(weights_only=False)``: a
   malicious pickle there executes while loading (we verified it: the payload ran although the load then failed).
2. Weights and constants whose payload config says ``"use_pickle": true`` are read with
   ``torch.load(..., weights_only=False)``.
3. Constants named ``custom_obj_*`` go through ``torch._C._pickle_load_obj`` (TorchScript unpickler, torchbind
   classes) and ``opaque_obj_*`` through plain ``pickle.loads``.
4. Legacy ``data/weights/<model>.pt`` / ``data/constants/<model>.pt`` entries and the pre-2.8 zip layout
   (``serialized_state_dict.pt``...) go through ``deserialize_torch_artifact`` (same fallback as 1.).
5. ``data/aotinductor/...`` makes ``torch.export.pt2_archive`` load compiled shared libraries (native code).
6. The JSON graph itself is not inert: ``guards_code`` strings are pasted into Python source and ``exec``'d by
   ``ep.module()`` (we verified that a crafted guard runs when the unlifted module is called); symbolic shape
   strings (``expr_str``) go through ``sympy.sympify``, which uses ``eval``; node targets are resolved by
   ``getattr`` chains from the ``torch``/``operator``/``math`` modules (``"torch.os.system"`` resolves to
   :func:`os.system`), and such callables are later run when the graph is executed or retraced
   (``ep.module()``, ``run_decompositions``); pytree specs in ``module_call_graph`` may ``importlib.import_module``
   arbitrary module names (``defaultdict`` contexts, enums); node metadata (``source_fn_stack``) resolves names
   the same way.

So :func:`load_pt2` reads the archive itself, with an allow-list, and never unpickles anything:

* the zip must hold one top-level folder with only the entries ``torch.export.save`` writes; AOTInductor
  binaries, pickled or custom-object payloads, legacy ``.pt`` weight files and any unknown entry are refused
  (:class:`CorruptFileError`); sample inputs and extra files are ignored, never read;
* tensors are rebuilt from raw bytes with :func:`torch.frombuffer` using the JSON payload config (dtype, sizes,
  strides and offset checked against the entry's length);
* the graph JSON is parsed into torch's schema dataclasses (plain data), then sanitised before torch's
  deserializer sees it: ``guards_code``, ``module_call_graph``, node and module metadata are dropped (we do not
  need them), every node target must be an ``aten`` operator or an allow-listed Python scalar operator, every
  symbolic expression must consist of symbol names, numbers, arithmetic and a fixed list of function names,
  graph/custom-object/operator arguments are refused;
* the sample inputs are never read: example inputs are built from the graph's tensor metadata;
* the sanitised program goes to ``ExportedProgramDeserializer`` with in-memory tensors and no example inputs, and
  the rebuilt module is built from its graph directly (``ep.module()`` and its guard code are never used).

Semantics and limits of the rebuilt module
------------------------------------------
* It is returned in eval mode; ``.train()`` works (real BatchNorm modules then use batch statistics and update
  their running stats). Ops whose mode was frozen at export (``aten.dropout(..., train=False)``) keep it; a
  BatchNorm exported in training mode becomes a normal BatchNorm (eval: running statistics).
* In-place updates whose results nothing reads are dropped with the rest of the dead code (BatchNorm's
  ``num_batches_tracked.add_`` of a program exported in training mode: the module owns that counter now).
* Inputs are the program's tensor inputs, positionally; a single output is returned as a tensor, several as a
  tuple (the original pytree structure is not restored). Parameters and buffers end up on the CPU.
* Shapes that the exporter baked into ``view``/``reshape``/``expand`` arguments stay literal: a model exported with
  a fixed batch size runs only at that batch size, and pruning channels that flow into such a literal shape (e.g.
  the heads of an attention block, ``x.view(b, c, -1)``) makes the forward fail. Flatten-style reshapes
  (``flatten``, ``view(b, -1)``) are unaffected. The pruning analysis finds such groups when the model is
  analysed and keeps them intact (``Structure.locked``, with the reason); the other groups stay prunable.
* ``nn.MultiheadAttention`` exports (default, non-decomposed IR) as ``aten.linear`` + reshapes +
  ``aten.scaled_dot_product_attention``: it converts and runs (the projections become ``nn.Linear``), but its
  projections are shape-locked as described above. ``aten._native_multi_head_attention`` (fast path; not produced by
  ``torch.export``) touches parameters and is refused with :class:`UnsupportedOperatorError`.
* Programs decomposed with ``run_decompositions()`` before saving are accepted as far as their layers stay
  recognisable: ``aten.convolution``, ``_native_batch_norm_legit_no_training``, ``native_layer_norm``,
  ``native_group_norm``, ``embedding``, and ``addmm``/``mm`` with a transposed 2-D weight (2-D inputs) convert;
  a parameter used by any other op (e.g. a 3-D linear decomposed into ``bmm``) is refused.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import keyword
import math
import operator
import os
import re
import sys
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import torch
from torch import fx, nn

from autoprune.errors import CorruptFileError, InvalidModelError, UnsupportedOperatorError
from autoprune.models.pt2_archive import archive_entries

__all__ = ["load_pt2", "module_from_exported_program"]

# Upper bound on the archive's declared uncompressed size (weights included).
_MAX_ARCHIVE_BYTES = 16 * 1024**3
# Upper bound on the number of elements of all example inputs together.
_MAX_EXAMPLE_ELEMENTS = 1 << 28
_QUANTIZED = frozenset({torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4})
# Upper bound on the length of one symbolic shape expression.
_MAX_EXPR_CHARS = 2000

# torch's graph deserializer keeps global state (``_CURRENT_DESERIALIZER``): one at a time.
_DESERIALIZE_LOCK = threading.Lock()

# --- archive entries: the allow-list lives in autoprune.models.pt2_archive (torch-free, shared with the API) ---

# --- operators -----------------------------------------------------------------------------------------------

# Python-level scalar ops that appear with symbolic shapes (they compute sizes, never touch tensors).
_PY_OPS: tuple[Callable[..., Any], ...] = (
    operator.getitem,
    operator.add,
    operator.sub,
    operator.mul,
    operator.floordiv,
    operator.truediv,
    operator.mod,
    operator.pow,
    operator.neg,
    operator.pos,
    operator.abs,
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    operator.and_,
    operator.or_,
    operator.not_,
    torch.sym_int,
    torch.sym_float,
    torch.sym_max,
    torch.sym_min,
    torch.sym_not,
    torch.sym_ite,
    math.ceil,
    math.floor,
    math.trunc,
)
_PY_OP_NAMES = {f"{fn.__module__}.{fn.__name__}" for fn in _PY_OPS}

# aten ops with effects outside their tensors.
_DENIED_ATEN = frozenset({"from_file", "_print", "set_"})

# Side-effect-only checks inserted by export; they pin shapes and must go before pruning.
_ASSERT_OPS = frozenset(
    {
        "_assert_tensor_metadata",
        "_assert_scalar",
        "_assert_async",
        "sym_constrain_range",
        "sym_constrain_range_for_size",
    }
)

# What a symbolic shape expression (``sympy.srepr`` text such as ``Mul(Integer(2), Symbol('s0', positive=True,
# integer=True))``, or plain ``2*s0``) may name: sympy classes, torch's shape functions, assumption keywords.
# Power and shift functions are left out on purpose: ``Pow(10, 999999999)`` would be evaluated while parsing.
_SYM_NAMES = frozenset(
    {
        # sympy atoms and arithmetic
        "Symbol", "Dummy", "Integer", "Rational", "Float", "Add", "Mul", "Max", "Min", "Abs", "Mod", "floor",
        "ceiling", "sqrt", "Piecewise", "ExprCondPair", "Half", "One", "Zero", "NegativeOne", "Infinity",
        "NegativeInfinity", "IntInfinity", "NegativeIntInfinity", "oo", "int_oo", "zoo", "nan", "NaN",
        # relations and logic
        "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan",
        "LessThan", "GreaterThan", "And", "Or", "Not", "BooleanTrue", "BooleanFalse", "true", "false", "True",
        "False",
        # torch.utils._sympy.functions (the deserializer's own table, minus powers and shifts)
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
        "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt",
        "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
        # keyword arguments of Symbol/Float
        "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "infinite", "zero",
        "nonzero", "even", "odd", "rational", "commutative", "extended_real", "precision",
    }
)  # fmt: skip
_SYMBOL = re.compile(r"[a-z]{1,8}\d{1,9}")
_EXPR_TOKEN = re.compile(
    r"\s+"
    r"|\d{1,18}(?:\.\d{0,20})?(?:[eE][+-]?\d{1,3})?"  # numbers of bounded size
    r"|'[A-Za-z0-9_.+\-]{0,40}'|\"[A-Za-z0-9_.+\-]{0,40}\""  # quoted symbol names and Float literals
    r"|[A-Za-z][A-Za-z0-9_]{0,63}"  # names, checked against _SYM_NAMES and _SYMBOL
    r"|[-+*/%(),<>=!&|~]"  # operators; no '.', '[', '_'-prefixed names or '**'
)


def _op_name(target: Any) -> str:
    """A readable operator name: ``aten.conv2d.default``, ``_operator.mul``, ``mylib.foo.default``."""
    if isinstance(target, str):
        return target.removeprefix("torch.ops.")
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    module = getattr(target, "__module__", None) or "?"
    return f"{module}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}"


def _aten_name(target: Any) -> str | None:
    """``conv2d`` for ``aten.conv2d.<overload>``, else None."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return str(target._schema.name).split("::", 1)[1]
    return None


def _check_runnable(target: Any) -> None:
    name = _aten_name(target)
    if name is not None:
        if name in _DENIED_ATEN:
            raise UnsupportedOperatorError(f"operator {_op_name(target)} is not allowed in an uploaded program")
        return
    if any(target is fn for fn in _PY_OPS):
        return
    raise UnsupportedOperatorError(f"operator {_op_name(target)} is not supported (only aten operators can be rebuilt)")


# --- public API ----------------------------------------------------------------------------------------------


def load_pt2(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes],
) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """Load a ``torch.export.save`` archive safely and rebuild a prunable module from it.

    ``source`` is a path, the file's bytes or a binary file object. Returns the rebuilt module (eval mode, on the
    CPU) and deterministic example inputs of the exported shapes and dtypes (seeded ``randn`` for floating
    point, zeros otherwise). Nothing in the file is unpickled (see the module docstring).

    Raises :class:`CorruptFileError` for anything that is not a plain ``.pt2`` archive of an exported program
    (including pickled payloads and compiled AOTInductor code), :class:`UnsupportedOperatorError` for operators
    that cannot be run or whose parameters cannot be given to a module, :class:`InvalidModelError` for programs
    with non-tensor inputs. A missing path raises :class:`OSError`.
    """
    ep = _load_exported_program(source)
    module = _rebuild(ep, copy_tensors=False)
    return module, _example_inputs(ep)


def module_from_exported_program(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """Rebuild a prunable :class:`torch.fx.GraphModule` (eval mode) from an in-memory exported program.

    Parameters and buffers are copied, so the program is left untouched. Use :func:`load_pt2` for files: it never
    calls ``torch.export.load``.
    """
    return _rebuild(ep, copy_tensors=True)


# --- reading the archive -------------------------------------------------------------------------------------


class _Archive:
    """The entries of a ``.pt2`` zip, relative to its single top-level folder."""

    def __init__(self, zf: zipfile.ZipFile) -> None:
        self._zf = zf
        self._infos = archive_entries(zf, _MAX_ARCHIVE_BYTES)

    def names(self) -> Iterable[str]:
        return self._infos.keys()

    def has(self, rel: str) -> bool:
        return rel in self._infos

    def read(self, rel: str) -> bytes:
        info = self._infos.get(rel)
        if info is None:
            raise CorruptFileError(f"the .pt2 archive lacks {rel!r}")
        try:
            return self._zf.read(info)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, RuntimeError) as exc:
            raise CorruptFileError(f"cannot read {rel!r} from the .pt2 archive: {_one_line(exc)}") from None

    def read_text(self, rel: str) -> str:
        try:
            return self.read(rel).decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptFileError(f"{rel!r} in the .pt2 archive is not UTF-8 text") from None

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.read_text(rel))
        except (ValueError, RecursionError):
            raise CorruptFileError(f"{rel!r} in the .pt2 archive is not valid JSON") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _open_zip(source: Any) -> zipfile.ZipFile:
    if isinstance(source, (bytes, bytearray, memoryview)):
        fileobj: Any = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        fileobj = os.fspath(source)
        if not os.path.exists(fileobj):
            raise FileNotFoundError(errno.ENOENT, "no such file", fileobj)
    elif hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("load_pt2 needs a binary file object")
        fileobj = io.BytesIO(bytes(data))
    else:
        raise TypeError(f"load_pt2 takes a path, bytes or a binary file object, not {type(source).__name__}")
    try:
        return zipfile.ZipFile(fileobj)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError):
        raise CorruptFileError("not a .pt2 archive: not a zip file") from None


def _load_exported_program(source: Any) -> torch.export.ExportedProgram:
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    with _open_zip(source) as zf:
        archive = _Archive(zf)
        if not archive.has("archive_version"):
            raise CorruptFileError("not a .pt2 archive written by torch.export.save: no archive_version")
        if archive.read_text("archive_version").strip() != "0":
            raise CorruptFileError("unsupported .pt2 archive version")
        if archive.has("archive_format") and archive.read_text("archive_format").strip() != "pt2":
            raise CorruptFileError("not a .pt2 archive: wrong archive_format")
        if archive.has("byteorder") and archive.read_text("byteorder").strip() != sys.byteorder:
            raise CorruptFileError("the .pt2 archive was written on a machine of another byte order")

        models = sorted(n[len("models/") : -len(".json")] for n in archive.names() if n.startswith("models/"))
        if not models:
            raise CorruptFileError("the .pt2 archive holds no exported program (models/*.json)")
        if "model" in models:
            name = "model"
        elif len(models) == 1:
            name = models[0]
        else:
            raise CorruptFileError(f"the .pt2 archive holds several programs ({', '.join(models)})")

        state_dict = _read_payloads(archive, f"data/weights/{name}_weights_config.json", "data/weights/", "weight_")
        const_rel = f"data/constants/{name}_constants_config.json"
        constants = _read_payloads(archive, const_rel, "data/constants/", "tensor_") if archive.has(const_rel) else {}
        raw = archive.read_json(f"models/{name}.json")

    if not isinstance(raw, dict) or "graph_module" not in raw:
        raise CorruptFileError("the exported program in the .pt2 archive is malformed")
    try:
        program = _dict_to_dataclass(schema.ExportedProgram, raw)
    except (RecursionError, MemoryError):
        raise CorruptFileError("the exported program in the .pt2 archive is malformed") from None
    except Exception as exc:
        raise CorruptFileError(f"the exported program in the .pt2 archive is malformed: {_one_line(exc)}") from None
    _sanitize_program(program)

    with _DESERIALIZE_LOCK:
        try:
            ep = ExportedProgramDeserializer().deserialize(program, state_dict, constants, None)
        except (UnsupportedOperatorError, CorruptFileError):
            raise
        except Exception as exc:
            raise CorruptFileError(f"cannot deserialize the exported program: {_one_line(exc)}") from None
    return ep


def _read_payloads(archive: _Archive, config_rel: str, folder: str, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors described by a payload config, rebuilt from raw bytes (never unpickled)."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    config = archive.read_json(config_rel)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise CorruptFileError(f"{config_rel!r} in the .pt2 archive is malformed")

    flat: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise CorruptFileError(f"{config_rel!r} in the .pt2 archive is malformed")
        if meta.get("use_pickle") is not False:
            raise CorruptFileError(f"refusing .pt2 archive: {fqn!r} is stored as a pickle")
        path = meta.get("path_name")
        if not isinstance(path, str) or not re.fullmatch(rf"{prefix}\d+", path):
            raise CorruptFileError(f"refusing .pt2 archive: {fqn!r} is not a plain tensor payload")
        tm = meta.get("tensor_meta")
        if not isinstance(tm, dict):
            raise CorruptFileError(f"{config_rel!r} in the .pt2 archive is malformed")
        try:
            dtype = _SERIALIZE_TO_TORCH_DTYPE[schema.ScalarType(tm["dtype"])]
            sizes = [_plain_int(s) for s in tm["sizes"]]
            strides = [_plain_int(s) for s in tm["strides"]]
            offset = _plain_int(tm["storage_offset"])
            layout = schema.Layout(tm.get("layout", schema.Layout.Strided))
            requires_grad = bool(tm.get("requires_grad", False))
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(f"tensor metadata of {fqn!r} in the .pt2 archive is malformed") from None
        if layout != schema.Layout.Strided or dtype in _QUANTIZED or len(sizes) != len(strides):
            raise CorruptFileError(f"tensor {fqn!r} in the .pt2 archive has an unsupported layout or dtype")
        if any(v < 0 for v in (*sizes, *strides, offset)):
            raise CorruptFileError(f"tensor metadata of {fqn!r} in the .pt2 archive is malformed")

        if path not in flat:
            data = archive.read(folder + path)
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(data) % itemsize:
                raise CorruptFileError(f"payload {path!r} in the .pt2 archive has a truncated length")
            flat[path] = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
        storage = flat[path]
        if storage.dtype != dtype:
            raise CorruptFileError(f"payload {path!r} in the .pt2 archive is shared with different dtypes")
        if math.prod(sizes) == 0:
            tensor = torch.zeros(sizes, dtype=dtype)
        else:
            last = offset + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True))
            if storage.numel() == 0 and offset == 0:
                # torch writes an empty record for an all-zero-sized storage only; be strict otherwise
                raise CorruptFileError(f"payload {path!r} in the .pt2 archive is empty")
            if last >= storage.numel():
                raise CorruptFileError(f"tensor {fqn!r} does not fit its payload in the .pt2 archive")
            tensor = torch.as_strided(storage, sizes, strides, offset)
        if meta.get("is_param"):
            out[fqn] = nn.Parameter(tensor, requires_grad=requires_grad and tensor.is_floating_point())
        else:
            out[fqn] = tensor
    return out


def _plain_int(value: Any) -> int:
    """``{"as_int": 3}`` → 3; symbolic sizes are not allowed for stored tensors."""
    if isinstance(value, dict) and set(value) == {"as_int"} and type(value["as_int"]) is int:
        return int(value["as_int"])
    raise ValueError("not a plain int")


# --- sanitising the serialized program -----------------------------------------------------------------------


def _check_serialized_target(target: str) -> None:
    if target.startswith("torch.ops.aten."):
        parts = target.split(".")
        if (
            len(parts) == 5
            and all(re.fullmatch(r"[A-Za-z0-9_]+", p) for p in parts[3:])
            and parts[3] not in _DENIED_ATEN
        ):
            return
    elif target in _PY_OP_NAMES:
        return
    raise UnsupportedOperatorError(f"operator {_op_name(target)} is not supported (only aten operators can be rebuilt)")


def _check_expr(expr: str) -> None:
    """Refuse anything but a formula: ``sympy.sympify`` evaluates its text with ``eval``."""
    bad = CorruptFileError("refusing .pt2 archive: a symbolic shape expression is not a plain formula")
    if not isinstance(expr, str) or len(expr) > _MAX_EXPR_CHARS or "**" in expr:
        raise bad
    pos = 0
    while pos < len(expr):
        m = _EXPR_TOKEN.match(expr, pos)
        if m is None:
            raise bad
        token = m.group()
        if token[0].isalpha() and token not in _SYM_NAMES and not _SYMBOL.fullmatch(token):
            raise bad
        pos = m.end()


def _walk(obj: Any) -> Iterator[Any]:
    """Every schema object (dataclass) reachable from ``obj``."""
    from torch._export.serde.union import _Union

    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, _Union):
            yield item
            stack.append(item.value)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            yield item
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())


def _sanitize_program(program: Any) -> None:
    """Drop what we do not need and refuse anything that would resolve names or evaluate strings."""
    from torch._export.serde import schema

    if program.schema_version is None:
        raise CorruptFileError("the exported program in the .pt2 archive has no schema version")
    program.guards_code = []
    for verifier in program.verifiers or []:
        if verifier not in ("", "ATEN", "TRAINING"):
            raise CorruptFileError(f"refusing .pt2 archive: unknown dialect {verifier!r}")
    for symbol in program.range_constraints:
        if not isinstance(symbol, str) or not _SYMBOL.fullmatch(symbol):
            raise CorruptFileError("refusing .pt2 archive: a range constraint names no plain symbol")
    gm = program.graph_module
    gm.module_call_graph = []
    gm.metadata = {}
    gm.treespec_namedtuple_fields = {}
    if gm.graph.custom_obj_values:
        raise UnsupportedOperatorError("programs with custom (torchbind) objects are not supported")
    for node in gm.graph.nodes:
        _check_serialized_target(node.target)
        node.metadata = {}
    for spec in gm.signature.input_specs:
        if spec.type not in ("user_input", "parameter", "buffer", "tensor_constant"):
            raise UnsupportedOperatorError(f"programs with {spec.type} inputs are not supported")
    for item in _walk(program):
        if isinstance(item, schema.Argument) and item.type in ("as_graph", "as_custom_obj", "as_operator"):
            raise UnsupportedOperatorError(
                f"programs with {item.type.removeprefix('as_')} arguments (control flow, custom objects) "
                "are not supported"
            )
        if isinstance(item, schema.SymExpr):
            _check_expr(item.expr_str)


# --- rebuilding a module -------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
    """What a placeholder of the exported graph stands for."""

    kind: str  # "input", "param", "buffer" or "const"
    fqn: str
    tensor: torch.Tensor | None = None


@dataclasses.dataclass
class _Conversion:
    """A call node to replace with a module call."""

    kind: str  # module name fallback, e.g. "conv"
    data: fx.Node  # the module's input
    make: Callable[[], nn.Module]
    key: tuple[Any, ...]  # identical keys share one module
    weight_fqn: str
    tuple_output: bool = False


def _bind(node: fx.Node) -> dict[str, Any]:
    """Arguments of an aten call by schema name, defaults filled in."""
    schema = node.target._schema  # type: ignore[union-attr]
    bound: dict[str, Any] = {}
    positional = [a for a in schema.arguments if not a.kwarg_only]
    for i, arg in enumerate(schema.arguments):
        if not arg.kwarg_only and i < len(node.args) and i < len(positional):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            bound[arg.name] = None
    return bound


def _ntuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    items = tuple(int(v) for v in value)
    return items * n if len(items) == 1 else items


class _Rebuilder:
    def __init__(self, ep: torch.export.ExportedProgram, copy_tensors: bool) -> None:
        from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

        self.ep = ep
        self.copy = copy_tensors
        self.graph = ep.graph
        self._memo: dict[int, torch.Tensor] = {}
        self._param_memo: dict[int, nn.Parameter] = {}

        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        specs = ep.graph_signature.input_specs
        if len(placeholders) != len(specs):
            raise CorruptFileError("the exported program's signature does not match its graph")
        state = ep.state_dict
        consts = ep.constants
        self.sources: dict[fx.Node, _Source] = {}
        for node, spec in zip(placeholders, specs, strict=True):
            if spec.kind == InputKind.USER_INPUT:
                if not isinstance(spec.arg, TensorArgument):
                    raise InvalidModelError(
                        f"input {getattr(spec.arg, 'name', '?')!r} of the exported program is not a tensor"
                    )
                self.sources[node] = _Source("input", spec.arg.name)
                continue
            kinds = {
                InputKind.PARAMETER: "param",
                InputKind.BUFFER: "buffer",
                InputKind.CONSTANT_TENSOR: "const",
            }
            if spec.kind not in kinds or spec.target is None:
                raise UnsupportedOperatorError(f"programs with {spec.kind.name.lower()} inputs are not supported")
            value = state.get(spec.target)
            if value is None:
                value = consts.get(spec.target)
            if not isinstance(value, torch.Tensor):
                raise CorruptFileError(f"the exported program lacks the tensor {spec.target!r}")
            self.sources[node] = _Source(kinds[spec.kind], spec.target, value)

        out_node = self.graph.output_node()
        flat = out_node.args[0]
        flat = list(flat) if isinstance(flat, (list, tuple)) else [flat]
        if len(flat) != len(ep.graph_signature.output_specs):
            raise CorruptFileError("the exported program's signature does not match its outputs")
        self.outputs: list[Any] = []
        for value, ospec in zip(flat, ep.graph_signature.output_specs, strict=True):
            if ospec.kind == OutputKind.USER_OUTPUT:
                self.outputs.append(value)
            elif ospec.kind != OutputKind.BUFFER_MUTATION:  # buffer updates are dropped: modules own them
                raise UnsupportedOperatorError(f"programs with {ospec.kind.name.lower()} outputs are not supported")

    # -- tensors -----------------------------------------------------------------------------------------

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        key = id(t)
        if key not in self._memo:
            plain = t.detach()
            self._memo[key] = plain.clone() if self.copy else plain
        return self._memo[key]

    def _param(self, node: Any) -> nn.Parameter | None:
        if node is None:
            return None
        src = self.sources[node]
        assert src.tensor is not None
        key = id(src.tensor)
        if key not in self._param_memo:
            self._param_memo[key] = nn.Parameter(self._tensor(src.tensor), requires_grad=True)
        return self._param_memo[key]

    def _buffer(self, node: Any) -> torch.Tensor | None:
        if node is None:
            return None
        src = self.sources[node]
        assert src.tensor is not None
        return self._tensor(src.tensor)

    def _is(self, value: Any, *kinds: str) -> bool:
        return isinstance(value, fx.Node) and value in self.sources and self.sources[value].kind in kinds

    def _opt(self, value: Any, *kinds: str) -> bool:
        return value is None or self._is(value, *kinds)

    def _fqn(self, node: fx.Node) -> str:
        return self.sources[node].fqn

    def _state_tensor(self, fqn: str) -> torch.Tensor | None:
        value = self.ep.state_dict.get(fqn)
        if value is None:
            value = self.ep.constants.get(fqn)
        return value if isinstance(value, torch.Tensor) else None

    # -- recognising layers ------------------------------------------------------------------------------

    def _plan(self, node: fx.Node) -> _Conversion | None:
        name = _aten_name(node.target)
        if name is None:
            return None
        a = _bind(node)
        P = ("param",)
        W = ("param", "buffer", "const")  # bias/stat tensors may be buffers
        S = ("buffer", "const")

        def rank() -> int | None:
            val = a["input"].meta.get("val") if isinstance(a.get("input"), fx.Node) else None
            return val.dim() if isinstance(val, torch.Tensor) else None

        if name in ("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
                    "conv_transpose3d"):  # fmt: skip
            w, b = a["weight"], a["bias"]
            if not (self._is(w, *P) and self._opt(b, *W) and isinstance(a["input"], fx.Node)):
                return None
            weight = self._param(w)
            assert weight is not None
            n = weight.dim() - 2
            if n not in (1, 2, 3) or (name[-2:-1].isdigit() and int(name[-2]) != n):
                return None
            transposed = name.startswith("conv_transpose") or (name == "convolution" and bool(a["transposed"]))
            groups = int(a["groups"])
            stride, dilation = _ntuple(a["stride"], n), _ntuple(a["dilation"], n)
            padding: Any = a["padding"] if isinstance(a["padding"], str) else _ntuple(a["padding"], n)
            bias = self._param(b)
            if transposed:
                out_pad = _ntuple(a["output_padding"], n)
                cls: Any = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[n - 1]
                ctor = dict(
                    in_channels=weight.shape[0],
                    out_channels=weight.shape[1] * groups,
                    kernel_size=tuple(weight.shape[2:]),
                    stride=stride,
                    padding=padding,
                    output_padding=out_pad,
                    groups=groups,
                    dilation=dilation,
                    bias=bias is not None,
                )
            else:
                if name == "convolution" and any(_ntuple(a["output_padding"], n)):
                    return None
                cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[n - 1]
                ctor = dict(
                    in_channels=weight.shape[1] * groups,
                    out_channels=weight.shape[0],
                    kernel_size=tuple(weight.shape[2:]),
                    stride=stride,
                    padding=padding,
                    dilation=dilation,
                    groups=groups,
                    bias=bias is not None,
                )
            return self._conv(cls, ctor, a["input"], w, {"weight": weight, "bias": bias}, "conv")

        if name == "linear":
            w, b = a["weight"], a["bias"]
            if not (self._is(w, *P) and self._opt(b, *W) and isinstance(a["input"], fx.Node)):
                return None
            weight, bias = self._param(w), self._param(b)
            assert weight is not None
            if weight.dim() != 2:
                return None
            ctor = dict(in_features=weight.shape[1], out_features=weight.shape[0], bias=bias is not None)
            return self._conv(nn.Linear, ctor, a["input"], w, {"weight": weight, "bias": bias}, "linear")

        if name in ("addmm", "mm"):
            # decomposed linear: addmm(bias, x, t(w)) / mm(x, t(w)) with x 2-D
            x, wt = (a["mat1"], a["mat2"]) if name == "addmm" else (a["self"], a["mat2"])
            b = a["self"] if name == "addmm" else None
            if name == "addmm" and (a["beta"] != 1 or a["alpha"] != 1):
                return None
            w = self._transposed_param(wt)
            if w is None or not self._opt(b, *W) or not isinstance(x, fx.Node):
                return None
            weight, bias = self._param(w), self._param(b)
            assert weight is not None
            if weight.dim() != 2 or (bias is not None and tuple(bias.shape) != (weight.shape[0],)):
                return None
            ctor = dict(in_features=weight.shape[1], out_features=weight.shape[0], bias=bias is not None)
            return self._conv(nn.Linear, ctor, x, w, {"weight": weight, "bias": bias}, "linear")

        if name in ("batch_norm", "_native_batch_norm_legit_no_training", "instance_norm"):
            w, b, rm, rv = a["weight"], a["bias"], a["running_mean"], a["running_var"]
            if not (self._is(w, *P) or self._is(b, *P) or self._is(rm, *S)):
                return None
            if not (self._opt(w, *W) and self._opt(b, *W) and self._opt(rm, *S) and self._opt(rv, *S)):
                return None
            if (w is None) != (b is None) or (rm is None) != (rv is None) or not isinstance(a["input"], fx.Node):
                return None
            weight, bias = self._param(w), self._param(b)
            mean, var = self._buffer(rm), self._buffer(rv)
            r = rank()
            if r is None:
                return None
            if name == "instance_norm":
                if r not in (3, 4, 5):
                    return None
                cls = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[r - 3]
            else:
                if r not in (2, 3, 4, 5):
                    return None
                cls = (nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[r - 2]
            ref = weight if weight is not None else mean
            features = ref.shape[0] if ref is not None else a["input"].meta["val"].shape[1]
            ctor = dict(
                num_features=int(features),
                eps=float(a["eps"]),
                # nn's momentum=None (cumulative average) is exported as 0.0, which would freeze recalibration
                momentum=None if not a["momentum"] else float(a["momentum"]),
                affine=weight is not None,
                track_running_stats=mean is not None,
            )
            tensors: dict[str, Any] = {
                "weight": weight,
                "bias": bias,
                "running_mean": mean,
                "running_var": var,
            }
            if mean is not None and rm is not None:
                prefix = self._fqn(rm).rpartition(".")[0]
                tracked = self._state_tensor(f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked")
                tensors["num_batches_tracked"] = (
                    self._tensor(tracked) if tracked is not None else torch.tensor(0, dtype=torch.long)
                )
            anchor = w if w is not None else rm
            kind = "instance_norm" if name == "instance_norm" else "batch_norm"
            return self._conv(cls, ctor, a["input"], anchor, tensors, kind, tuple_output=name.startswith("_"))

        if name in ("layer_norm", "native_layer_norm", "rms_norm"):
            # converted even without affine parameters: the module keeps normalized_shape prunable
            w, b = a["weight"], a.get("bias")
            if not (self._opt(w, *P) and self._opt(b, *W)) or (w is None and b is not None):
                return None
            if not isinstance(a["input"], fx.Node):
                return None
            weight, bias = self._param(w), self._param(b)
            shape = tuple(int(s) for s in a["normalized_shape"])
            if name == "rms_norm":
                eps = None if a["eps"] is None else float(a["eps"])
                ctor = dict(normalized_shape=shape, eps=eps, elementwise_affine=weight is not None)
                return self._conv(nn.RMSNorm, ctor, a["input"], w, {"weight": weight}, "rms_norm", node=node)
            ctor = dict(
                normalized_shape=shape,
                eps=float(a["eps"]),
                elementwise_affine=weight is not None,
                bias=bias is not None,
            )
            return self._conv(
                nn.LayerNorm, ctor, a["input"], w, {"weight": weight, "bias": bias}, "layer_norm",
                tuple_output=name == "native_layer_norm", node=node,
            )  # fmt: skip

        if name in ("group_norm", "native_group_norm"):
            w, b = a["weight"], a["bias"]
            if not (self._is(w, *P) and self._opt(b, *W)) or b is None or not isinstance(a["input"], fx.Node):
                return None
            weight, bias = self._param(w), self._param(b)
            assert weight is not None
            groups = int(a["num_groups"] if name == "group_norm" else a["group"])
            ctor = dict(num_groups=groups, num_channels=weight.shape[0], eps=float(a["eps"]), affine=True)
            return self._conv(
                nn.GroupNorm, ctor, a["input"], w, {"weight": weight, "bias": bias}, "group_norm",
                tuple_output=name == "native_group_norm",
            )  # fmt: skip

        if name == "embedding":
            w = a["weight"]
            if not (self._is(w, *P) and isinstance(a["indices"], fx.Node)):
                return None
            weight = self._param(w)
            assert weight is not None
            if weight.dim() != 2:
                return None
            pad = int(a["padding_idx"])
            ctor = dict(
                num_embeddings=weight.shape[0],
                embedding_dim=weight.shape[1],
                padding_idx=None if pad == -1 else pad,
                scale_grad_by_freq=bool(a["scale_grad_by_freq"]),
                sparse=bool(a["sparse"]),
            )
            return self._conv(nn.Embedding, ctor, a["indices"], w, {"weight": weight}, "embedding")

        if name in ("prelu", "_prelu_kernel"):
            w = a["weight"]
            if not (self._is(w, *P) and isinstance(a["self"], fx.Node)):
                return None
            weight = self._param(w)
            assert weight is not None
            if weight.dim() != 1:
                return None
            return self._conv(nn.PReLU, {"num_parameters": weight.numel()}, a["self"], w, {"weight": weight}, "prelu")
        return None

    def _transposed_param(self, value: Any) -> fx.Node | None:
        """``w`` if ``value`` is ``t(w)``/``permute(w, [1, 0])``/``transpose(w, 0, 1)`` of a 2-D parameter."""
        if not isinstance(value, fx.Node) or value.op != "call_function":
            return None
        name = _aten_name(value.target)
        src = value.args[0] if value.args else None
        if not self._is(src, "param"):
            return None
        if name == "t" or (name == "permute" and list(value.args[1]) == [1, 0]):  # type: ignore[arg-type]
            return src  # type: ignore[return-value]
        if name == "transpose" and sorted(int(d) % 2 for d in value.args[1:3]) == [0, 1]:  # type: ignore[arg-type]
            return src  # type: ignore[return-value]
        return None

    def _conv(
        self,
        cls: type[nn.Module],
        ctor: dict[str, Any],
        data: fx.Node,
        anchor: Any,
        tensors: dict[str, Any],
        kind: str,
        tuple_output: bool = False,
        node: fx.Node | None = None,
    ) -> _Conversion:
        def make() -> nn.Module:
            module = torch.nn.utils.skip_init(cls, **ctor)
            for attr, value in tensors.items():
                if value is not None:
                    setattr(module, attr, value)
            return module

        ids = tuple((k, id(v)) for k, v in sorted(tensors.items()) if v is not None)
        # calls of one weight with one configuration share a module; parameter-less layers never do
        key = (cls, tuple(sorted((k, repr(v)) for k, v in ctor.items())), ids or (id(node),))
        return _Conversion(kind, data, make, key, self._fqn(anchor) if anchor is not None else "", tuple_output)

    # -- building the new graph --------------------------------------------------------------------------

    def build(self) -> fx.GraphModule:
        nodes = list(self.graph.nodes)
        plans: dict[fx.Node, _Conversion] = {}
        for node in nodes:
            if node.op == "call_function":
                plan = self._plan(node)
                if plan is not None:
                    plans[node] = plan

        # liveness from the user outputs, following only the data input of converted layers
        live: set[fx.Node] = set()
        stack = list(_flat_nodes(self.outputs))
        while stack:
            node = stack.pop()
            if node in live:
                continue
            live.add(node)
            if node in plans:
                stack.append(plans[node].data)
            else:
                stack.extend(node.all_input_nodes)

        graph = fx.Graph()
        root = nn.Module()
        env: dict[fx.Node, Any] = {}
        modules: dict[tuple[Any, ...], str] = {}
        used_names: set[str] = set()
        attrs: dict[fx.Node, fx.Node] = {}

        def attr_node(src_node: fx.Node) -> fx.Node:
            if src_node not in attrs:
                src = self.sources[src_node]
                name = _unique(_sanitize(src.fqn).replace(".", "_") or "tensor", used_names)
                assert src.tensor is not None
                root.register_buffer(name, self._tensor(src.tensor), persistent=src.kind == "buffer")
                attrs[src_node] = graph.get_attr(name)
            return attrs[src_node]

        def lookup(value: fx.Node, user: fx.Node) -> Any:
            if value in env:
                return env[value]
            src = self.sources.get(value)
            if src is not None and src.kind == "param":
                raise UnsupportedOperatorError(
                    f"operator {_op_name(user.target)} uses parameter {src.fqn!r} and cannot be rebuilt as a "
                    "prunable module"
                )
            if src is not None:
                return attr_node(value)
            raise CorruptFileError(f"the exported graph uses {value.name!r} before defining it")

        for node in nodes:
            if node.op == "placeholder":
                if self.sources[node].kind == "input":
                    new = graph.placeholder(node.name)
                    new.meta = _kept_meta(node)
                    env[node] = new
                continue
            if node.op == "output":
                continue
            if node.op != "call_function":
                raise UnsupportedOperatorError(
                    f"graph node {node.name!r} ({node.op}) is not supported (control flow or submodules)"
                )
            if node not in live:
                _check_runnable(node.target)  # refuse unknown ops even when dead
                continue
            if node in plans:
                plan = plans[node]
                if plan.key not in modules:
                    base = _module_base(plan.weight_fqn) or plan.kind
                    name = _unique_module(base, used_names)
                    _install(root, name, plan.make())
                    modules[plan.key] = name
                data = lookup(plan.data, node)
                new = graph.call_module(modules[plan.key], (data,))
                new.meta = _kept_meta(node)
                env[node] = new
                continue
            if node.target is operator.getitem and node.args[0] in plans:
                parent = node.args[0]
                assert isinstance(parent, fx.Node)
                if not plans[parent].tuple_output or node.args[1] != 0:
                    raise UnsupportedOperatorError(
                        f"operator {_op_name(parent.target)}: only its main output can be rebuilt as a module"
                    )
                env[node] = env[parent]
                continue
            _check_runnable(node.target)
            if _aten_name(node.target) in _ASSERT_OPS and not node.users:
                continue
            new = graph.node_copy(node, lambda n, user=node: lookup(n, user))  # type: ignore[misc]
            new.meta = _kept_meta(node)
            env[node] = new

        outs = [fx.node.map_arg(v, lambda n: lookup(n, self.graph.output_node())) for v in self.outputs]
        graph.output(outs[0] if len(outs) == 1 else tuple(outs))
        graph.lint()
        gm = fx.GraphModule(root, graph, class_name="ExportedProgramModule")
        gm.eval()
        return gm


def _flat_nodes(values: Any) -> Iterator[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(values, lambda n: found.append(n) or n)  # type: ignore[func-returns-value]
    yield from found


def _kept_meta(node: fx.Node) -> dict[str, Any]:
    # shape metadata only: FX pastes e.g. stack traces into generated code comments
    return {k: node.meta[k] for k in ("val", "tensor_meta") if k in node.meta}


def _sanitize(fqn: str) -> str:
    """A dotted attribute path safe to paste into FX-generated code (names come from the uploaded file)."""
    parts = [re.sub(r"\W", "_", p, flags=re.ASCII) for p in fqn.split(".") if p]
    return ".".join(p if p.isdigit() or (p.isidentifier() and not keyword.iskeyword(p)) else f"m_{p}" for p in parts)


def _unique(name: str, used: set[str]) -> str:
    candidate, i = name, 1
    while candidate in used or any(u.startswith(candidate + ".") for u in used):
        candidate, i = f"{name}_{i}", i + 1
    used.add(candidate)
    return candidate


def _unique_module(name: str, used: set[str]) -> str:
    """A dotted name that neither is nor nests in/around an existing module or attribute name."""

    def clashes(candidate: str) -> bool:
        parts = candidate.split(".")
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts))}
        return candidate in used or bool(prefixes & used) or any(u.startswith(candidate + ".") for u in used)

    candidate, flat, i = name, name.replace(".", "_"), 0
    while clashes(candidate):
        candidate, i = (flat if i == 0 else f"{flat}_{i}"), i + 1
    used.add(candidate)
    return candidate


def _module_base(weight_fqn: str) -> str:
    """``layer1.0.conv1`` for ``layer1.0.conv1.weight``; ``mha.in_proj`` for ``mha.in_proj_weight``."""
    prefix, _, last = weight_fqn.rpartition(".")
    if last in ("weight", "bias", "running_mean", "running_var"):
        return _sanitize(prefix)
    for suffix in ("_weight", "_bias"):
        if last.endswith(suffix) and len(last) > len(suffix):
            last = last[: -len(suffix)]
            break
    return _sanitize(f"{prefix}.{last}" if prefix else last)


def _install(root: nn.Module, name: str, module: nn.Module) -> None:
    *parents, leaf = name.split(".")
    owner = root
    for part in parents:
        child = getattr(owner, part, None)
        if not isinstance(child, nn.Module):
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    owner.add_module(leaf, module)


def _rebuild(ep: torch.export.ExportedProgram, copy_tensors: bool) -> fx.GraphModule:
    if not isinstance(ep, torch.export.ExportedProgram):
        raise TypeError(f"expected a torch.export.ExportedProgram, not {type(ep).__name__}")
    return _Rebuilder(ep, copy_tensors).build()


# --- example inputs ------------------------------------------------------------------------------------------


def _concrete(size: Any, ep: torch.export.ExportedProgram) -> int:
    if isinstance(size, int):
        return size
    node = getattr(size, "node", None)
    hint = getattr(node, "hint", None)
    if isinstance(hint, int):
        return hint
    expr = getattr(node, "expr", None)
    vr = ep.range_constraints.get(expr) if expr is not None else None
    lower = getattr(vr, "lower", None)
    try:
        return max(2, int(lower)) if lower is not None else 2
    except (TypeError, ValueError, OverflowError):
        return 2


def _example_inputs(ep: torch.export.ExportedProgram) -> tuple[torch.Tensor, ...]:
    from torch.export.graph_signature import InputKind

    generator = torch.Generator().manual_seed(0)
    inputs: list[torch.Tensor] = []
    total = 0
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    for node, spec in zip(placeholders, ep.graph_signature.input_specs, strict=True):
        if spec.kind != InputKind.USER_INPUT:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise InvalidModelError(f"input {node.name!r} of the exported program has no tensor metadata")
        shape = [_concrete(s, ep) for s in val.shape]
        total += math.prod(shape)
        if total > _MAX_EXAMPLE_ELEMENTS:
            raise InvalidModelError("the exported program's inputs are too large for example inputs")
        if val.dtype.is_floating_point or val.dtype.is_complex:
            inputs.append(torch.randn(shape, dtype=val.dtype, generator=generator))
        else:
            inputs.append(torch.zeros(shape, dtype=val.dtype))
    return tuple(inputs)
