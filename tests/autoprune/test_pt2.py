"""Intake of ``torch.export`` programs (``.pt2``) without their Python class, and the safety of reading them.

Models are defined here only to produce the files; every check loads them back through ``load_pt2`` alone.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.export import Dim

from autoprune.errors import CorruptFileError, UnsupportedOperatorError
from autoprune.models.pt2 import load_pt2, module_from_exported_program
from autoprune.models.registry import build_model, example_inputs

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


# --- models (only used to write the files) -------------------------------------------------------------------


def _randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    return model


class ResNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        z = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(y)))))
        y = F.relu(y + z)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 16, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(16)
        self.conv2 = nn.Conv1d(16, 16, 3, padding="same")
        self.gn = nn.GroupNorm(4, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.gn(self.conv2(y)))
        return self.head(y.mean(-1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.fc2(F.relu(self.norm(self.fc1(x))))))


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(self.emb(tokens).mean(1))))


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(a.mean(1))


class ScaledNet(nn.Module):
    """A parameter used by an elementwise op: no module can own it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.full((8,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


@torch.library.custom_op("autoprune_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class CustomOpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.autoprune_test.twice(self.fc(x))


# name: (factory, input, expected modules {name: (type, weight shape)}, final layer name)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, Any], str]] = {
    "resnetish": (
        ResNetish,
        lambda: torch.randn(2, 3, 8, 8),
        {
            "stem.0": (nn.Conv2d, (8, 3, 3, 3)),
            "stem.1": (nn.BatchNorm2d, (8,)),
            "conv1": (nn.Conv2d, (8, 8, 3, 3)),
            "bn2": (nn.BatchNorm2d, (8,)),
            "head": (nn.Linear, (10, 8)),
        },
        "head",
    ),
    "conv1d": (
        Conv1dNet,
        lambda: torch.randn(2, 4, 24),
        {
            "conv1": (nn.Conv1d, (16, 4, 5)),
            "bn1": (nn.BatchNorm1d, (16,)),
            "conv2": (nn.Conv1d, (16, 16, 3)),
            "gn": (nn.GroupNorm, (16,)),
            "head": (nn.Linear, (5, 16)),
        },
        "head",
    ),
    "mlp": (
        MLP,
        lambda: torch.randn(4, 16),
        {
            "fc1": (nn.Linear, (32, 16)),
            "norm": (nn.LayerNorm, (32,)),
            "fc2": (nn.Linear, (32, 32)),
            "head": (nn.Linear, (4, 32)),
        },
        "head",
    ),
    "embedding": (
        EmbeddingNet,
        lambda: torch.randint(0, 50, (2, 7)),
        {"emb": (nn.Embedding, (50, 16)), "fc": (nn.Linear, (12, 16)), "head": (nn.Linear, (3, 12))},
        "head",
    ),
}


def _export(model: nn.Module, args: tuple[Any, ...], path: Path, **kwargs: Any) -> Path:
    ep = torch.export.export(model, args, **kwargs)
    torch.export.save(ep, str(path))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, torch.Tensor, Path]]:
    """Each case exported once: (original model, its input, the .pt2 path)."""
    folder = tmp_path_factory.mktemp("pt2")
    out = {}
    for name, (factory, make_input, _, _) in CASES.items():
        torch.manual_seed(0)
        model = _randomize_bn(factory()).eval()
        x = make_input()
        out[name] = (model, x, _export(model, (x,), folder / f"{name}.pt2"))
    return out


# --- rebuilding ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_rebuilt_module_matches_and_holds_real_layers(case: str, saved: dict[str, Any]) -> None:
    model, x, path = saved[case]
    rebuilt, example = load_pt2(path)

    assert not rebuilt.training
    assert len(example) == 1 and example[0].shape == x.shape and example[0].dtype == x.dtype
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(rebuilt(*example), model(*example), atol=1e-5, rtol=0)

    modules = dict(rebuilt.named_modules())
    for name, (kind, shape) in CASES[case][2].items():
        assert type(modules[name]) is kind, name
        assert tuple(modules[name].weight.shape) == shape, name
        assert isinstance(modules[name].weight, nn.Parameter)
    # every parameter lives in a real layer, none is left to the functional graph
    assert not any(n.op == "get_attr" and "weight" in str(n.target) for n in rebuilt.graph.nodes)
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in model.parameters())


def test_batchnorm_state_and_train_mode(saved: dict[str, Any]) -> None:
    model, _, path = saved["resnetish"]
    rebuilt, _ = load_pt2(path)
    bn = rebuilt.get_submodule("bn1")
    torch.testing.assert_close(bn.running_mean, model.bn1.running_mean)
    torch.testing.assert_close(bn.running_var, model.bn1.running_var)
    assert int(bn.num_batches_tracked) == 7

    rebuilt.train()  # BN recalibration: batch statistics, running stats updated
    before = bn.running_mean.clone()
    with torch.no_grad():
        rebuilt(torch.randn(4, 3, 8, 8))
    assert not torch.equal(before, bn.running_mean)
    rebuilt.eval()


def test_deepcopy_and_example_inputs_are_deterministic(saved: dict[str, Any]) -> None:
    _, _, path = saved["resnetish"]
    rebuilt, example = load_pt2(path)
    clone = copy.deepcopy(rebuilt)
    with torch.no_grad():
        torch.testing.assert_close(clone(*example), rebuilt(*example))
    clone.get_submodule("head").weight.data.zero_()
    assert rebuilt.get_submodule("head").weight.abs().sum() > 0

    _, again = load_pt2(path)
    assert torch.equal(example[0], again[0])

    _, tokens = load_pt2(saved["embedding"][2])
    assert tokens[0].dtype == torch.int64 and tokens[0].shape == (2, 7)


def test_sources_path_bytes_and_file_object(saved: dict[str, Any]) -> None:
    model, x, path = saved["mlp"]
    data = Path(path).read_bytes()
    for source in (path, str(path), data, io.BytesIO(data)):
        rebuilt, _ = load_pt2(source)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x), model(x), atol=1e-5, rtol=0)


def test_torch_export_load_is_never_called(saved: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.export.load must not be used on uploads")

    monkeypatch.setattr(torch.export, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    rebuilt, example = load_pt2(saved["resnetish"][2])
    assert rebuilt(*example).shape == (2, 10)


@pytest.mark.parametrize("case", list(CASES))
def test_torch_pruning_prunes_the_rebuilt_module(case: str, saved: dict[str, Any]) -> None:
    _, _, path = saved[case]
    rebuilt, example = load_pt2(path)
    with torch.no_grad():
        out_shape = rebuilt(*example).shape
    final = rebuilt.get_submodule(CASES[case][3])

    graph = tp.DependencyGraph().build_dependency(rebuilt, example_inputs=example)
    groups = list(graph.get_all_groups(ignored_layers=[final], root_module_types=[nn.Conv1d, nn.Conv2d, nn.Linear]))
    assert groups

    before = sum(p.numel() for p in rebuilt.parameters())
    pruner = tp.pruner.BasePruner(
        rebuilt,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[final],
    )
    pruner.step()
    assert sum(p.numel() for p in rebuilt.parameters()) < before
    with torch.no_grad():
        assert rebuilt(*example).shape == out_shape
    assert final.out_features == out_shape[-1]


def test_in_memory_program_is_copied() -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(3, 16)
    ep = torch.export.export(model, (x,))
    rebuilt = module_from_exported_program(ep)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=1e-5, rtol=0)
        rebuilt.get_submodule("fc1").weight.zero_()
    assert ep.state_dict["fc1.weight"].abs().sum() > 0


def test_dynamic_batch_and_export_asserts(tmp_path: Path) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3)
            self.bn = nn.BatchNorm2d(6)
            self.fc = nn.Linear(6 * 4 * 4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x.to(torch.float32)))  # .to() adds aten._assert_tensor_metadata
            return self.fc(y.view(y.size(0), -1))  # y.size(0) becomes aten.sym_size

    torch.manual_seed(0)
    model = _randomize_bn(Net()).eval()
    path = _export(model, (torch.randn(2, 3, 6, 6),), tmp_path / "dyn.pt2", dynamic_shapes=({0: Dim("batch")},))
    rebuilt, example = load_pt2(path)
    assert example[0].shape == (2, 3, 6, 6)
    assert not any("_assert" in str(n.target) for n in rebuilt.graph.nodes)
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=1e-5, rtol=0)


def test_decomposed_program_converts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(ResNetish()).eval()
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(model, (x,)).run_decompositions()  # aten.convolution, addmm, ..._no_training
    torch.export.save(ep, str(tmp_path / "core.pt2"))
    rebuilt, _ = load_pt2(tmp_path / "core.pt2")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=1e-5, rtol=0)
    assert isinstance(rebuilt.get_submodule("bn1"), nn.BatchNorm2d)
    assert isinstance(rebuilt.get_submodule("head"), nn.Linear)


def test_multihead_attention_converts_and_runs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AttentionNet().eval()
    tokens = torch.randint(0, 20, (2, 5))
    rebuilt, _ = load_pt2(_export(model, (tokens,), tmp_path / "attn.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(tokens), model(tokens), atol=1e-5, rtol=0)
    assert tuple(rebuilt.get_submodule("attn.in_proj").weight.shape) == (48, 16)
    assert isinstance(rebuilt.get_submodule("attn.out_proj"), nn.Linear)


def test_exported_attention_projections_are_locked_and_the_rest_stays_prunable(tmp_path: Path) -> None:
    # torch.export bakes the head split into literal reshapes: pruning the projections can never run, so those
    # groups are kept intact (with the reason) while the other layers remain prunable
    from autoprune.plan import Plan
    from autoprune.pruning.structured import PruningContext

    torch.manual_seed(0)
    model = build_model("transformer").eval()
    x = example_inputs(model, batch_size=1)
    rebuilt, _ = load_pt2(_export(model, (x,), tmp_path / "transformer.pt2"))
    ctx = PruningContext(rebuilt, x)
    locked = dict(ctx.structure.locked)
    assert {"encoder.layers.0.self_attn.in_proj", "encoder.layers.1.self_attn.in_proj"} <= set(locked)
    assert all("no longer runs" in reason for reason in locked.values())
    assert ctx.structure.names == ("encoder.layers.0.linear1", "encoder.layers.1.linear1")
    pruned = ctx.apply(Plan.uniform(ctx.structure.names, 0.5))
    assert pruned.get_submodule("encoder.layers.0.linear1").weight.shape[0] == 64
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape


def test_parameterless_norms_become_prunable_modules(tmp_path: Path) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(8, 16)
            self.ln = nn.LayerNorm(16, elementwise_affine=False)
            self.bn = nn.BatchNorm1d(16, momentum=None)  # exported as momentum=0.0
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.bn(self.ln(self.fc1(x))))

    torch.manual_seed(0)
    model = _randomize_bn(Net()).eval()
    rebuilt, example = load_pt2(_export(model, (torch.randn(4, 8),), tmp_path / "norms.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(*example), model(*example), atol=1e-5, rtol=0)
    assert isinstance(rebuilt.get_submodule("layer_norm"), nn.LayerNorm)
    assert rebuilt.get_submodule("bn").momentum is None  # recalibration still updates the stats

    head = rebuilt.get_submodule("head")
    tp.pruner.BasePruner(
        rebuilt, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5, ignored_layers=[head]
    ).step()
    assert rebuilt.get_submodule("layer_norm").normalized_shape == (8,)
    assert rebuilt(*example).shape == (4, 3)


# --- refusals ------------------------------------------------------------------------------------------------


def test_parameter_in_unconvertible_op_is_refused(tmp_path: Path) -> None:
    path = _export(ScaledNet().eval(), (torch.randn(2, 8),), tmp_path / "scaled.pt2")
    with pytest.raises(UnsupportedOperatorError, match=r"aten\.mul\.Tensor") as info:
        load_pt2(path)
    assert "scale" in str(info.value) and "\n" not in str(info.value)


def test_custom_operator_is_refused(tmp_path: Path) -> None:
    path = _export(CustomOpNet().eval(), (torch.randn(2, 4),), tmp_path / "custom.pt2")
    with pytest.raises(UnsupportedOperatorError, match=r"autoprune_test\.twice\.default"):
        load_pt2(path)


def _zip_of(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _corrupt_sources(path: Path) -> dict[str, bytes]:
    data = path.read_bytes()
    checkpoint = io.BytesIO()
    torch.save({"weight": torch.ones(2)}, checkpoint)
    return {
        "empty": b"",
        "random": os.urandom(4096),
        "text": b"this is not a model\n",
        "truncated": data[: len(data) // 2],
        "torch_save_checkpoint": checkpoint.getvalue(),
        "zip_without_program": _zip_of({"archive/archive_version": b"0", "archive/byteorder": b"little"}),
    }


@pytest.mark.parametrize(
    "kind", ["empty", "random", "text", "truncated", "torch_save_checkpoint", "zip_without_program"]
)
def test_corrupt_files_are_refused(kind: str, saved: dict[str, Any]) -> None:
    source = _corrupt_sources(saved["mlp"][2])[kind]
    with pytest.raises(CorruptFileError) as info:
        load_pt2(source)
    assert "\n" not in str(info.value) and str(info.value)


# --- never unpickle what a user sends ------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``path`` (``open(path, "w")``): a harmless stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _live_payload(marker: Path, tmp_path: Path) -> bytes:
    """A pickle that creates ``marker``; proven live by unpickling a twin that targets another file."""
    proof = tmp_path / "proof_that_the_payload_runs"
    pickle.loads(pickle.dumps(_Payload(proof))).close()
    assert proof.exists()
    payload = pickle.dumps(_Payload(marker))
    assert not marker.exists()
    return payload


def _rewrite(src: Path, dst: Path, change: dict[str, Callable[[bytes], bytes] | bytes]) -> Path:
    """Copy a .pt2 archive, replacing (or adding) entries named relative to its top-level folder."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        prefix = zin.namelist()[0].split("/", 1)[0] + "/"
        seen = set()
        for info in zin.infolist():
            rel = info.filename[len(prefix) :]
            data = zin.read(info)
            if rel in change:
                seen.add(rel)
                new = change[rel]
                data = new(data) if callable(new) else new
            zout.writestr(info.filename, data)
        for rel, new in change.items():
            if rel not in seen:
                assert not callable(new)
                zout.writestr(prefix + rel, new)
    return dst


def _edit_json(edit: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def apply(data: bytes) -> bytes:
        doc = json.loads(data)
        edit(doc)
        return json.dumps(doc).encode()

    return apply


@pytest.mark.parametrize("rel", ["extra/../../escape", "extra/./x", "models/..json/../model.json", "extra//x"])
def test_entry_names_that_climb_are_refused(saved: dict[str, Any], tmp_path: Path, rel: str) -> None:
    from autoprune.errors import CorruptFileError

    _, _, path = saved["resnetish"]
    bad = _rewrite(path, tmp_path / "climb.pt2", {rel: b"{}"})
    with pytest.raises(CorruptFileError, match="unsafe entry name"):
        load_pt2(bad)


def test_pickle_in_sample_inputs_is_never_loaded(saved: dict[str, Any], tmp_path: Path) -> None:
    # torch.export.load would run this: it retries torch.load(weights_only=False) on the sample inputs
    model, x, path = saved["resnetish"]
    marker = tmp_path / "pwned_sample_inputs"
    bad = _rewrite(path, tmp_path / "bad.pt2", {"data/sample_inputs/model.pt": _live_payload(marker, tmp_path)})
    rebuilt, _ = load_pt2(bad)  # the entry is ignored, never read
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=1e-5, rtol=0)
    assert not marker.exists()


def test_pickled_weight_is_refused(saved: dict[str, Any], tmp_path: Path) -> None:
    marker = tmp_path / "pwned_weight"

    def flag_pickle(doc: dict[str, Any]) -> None:
        for meta in doc["config"].values():
            if meta["path_name"] == "weight_0":
                meta["use_pickle"] = True

    bad = _rewrite(
        saved["resnetish"][2],
        tmp_path / "bad.pt2",
        {
            "data/weights/weight_0": _live_payload(marker, tmp_path),
            "data/weights/model_weights_config.json": _edit_json(flag_pickle),
        },
    )
    with pytest.raises(CorruptFileError, match="pickle"):
        load_pt2(bad)
    assert not marker.exists()


def test_weight_bytes_replaced_by_a_pickle_are_refused(saved: dict[str, Any], tmp_path: Path) -> None:
    marker = tmp_path / "pwned_raw_weight"
    bad = _rewrite(
        saved["resnetish"][2], tmp_path / "bad.pt2", {"data/weights/weight_0": _live_payload(marker, tmp_path)}
    )
    with pytest.raises(CorruptFileError):
        load_pt2(bad)
    assert not marker.exists()


def test_pickled_custom_object_is_refused(saved: dict[str, Any], tmp_path: Path) -> None:
    marker = tmp_path / "pwned_opaque"

    def add_object(doc: dict[str, Any]) -> None:
        doc["config"]["obj"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True}

    bad = _rewrite(
        saved["resnetish"][2],
        tmp_path / "bad.pt2",
        {
            "data/constants/opaque_obj_0": _live_payload(marker, tmp_path),
            "data/constants/model_constants_config.json": _edit_json(add_object),
        },
    )
    with pytest.raises(CorruptFileError, match="pickle"):
        load_pt2(bad)
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["data/aotinductor/model/model.so", "data/weights/model.pt", "archive/data.pkl"])
def test_native_code_and_legacy_pickles_are_refused(entry: str, saved: dict[str, Any], tmp_path: Path) -> None:
    marker = tmp_path / "pwned_entry"
    bad = _rewrite(saved["mlp"][2], tmp_path / "bad.pt2", {entry: _live_payload(marker, tmp_path)})
    with pytest.raises(CorruptFileError, match="refusing"):
        load_pt2(bad)
    assert not marker.exists()


def test_guard_code_is_never_executed(saved: dict[str, Any], tmp_path: Path) -> None:
    # torch's ep.module() pastes guards_code into Python source and exec()s it on every call
    model, x, path = saved["mlp"]
    marker = tmp_path / "pwned_guard"

    def add_guard(doc: dict[str, Any]) -> None:
        doc["guards_code"] = [f"open({str(marker)!r}, 'w') is not None"]

    rebuilt, _ = load_pt2(_rewrite(path, tmp_path / "bad.pt2", {"models/model.json": _edit_json(add_guard)}))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=1e-5, rtol=0)
    assert not marker.exists()


def test_symbolic_expression_injection_is_refused(saved: dict[str, Any], tmp_path: Path) -> None:
    # sympy.sympify (used by torch's deserializer) evaluates expression strings with eval()
    marker = tmp_path / "pwned_sympy"

    def inject(doc: dict[str, Any]) -> None:
        meta = doc["graph_module"]["graph"]["tensor_values"]["x"]
        meta["sizes"][0] = {"as_expr": {"expr_str": f"__import__('builtins').open({str(marker)!r}, 'w')"}}

    bad = _rewrite(saved["mlp"][2], tmp_path / "bad.pt2", {"models/model.json": _edit_json(inject)})
    with pytest.raises(CorruptFileError, match="symbolic"):
        load_pt2(bad)
    assert not marker.exists()


def test_injected_python_target_is_refused(saved: dict[str, Any], tmp_path: Path) -> None:
    # the deserializer resolves targets by getattr from the torch module: "torch.os.system" is os.system
    def retarget(doc: dict[str, Any]) -> None:
        for node in doc["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.relu.default":
                node["target"] = "torch.os.system"

    bad = _rewrite(saved["mlp"][2], tmp_path / "bad.pt2", {"models/model.json": _edit_json(retarget)})
    with pytest.raises(UnsupportedOperatorError, match=r"os\.system"):
        load_pt2(bad)
