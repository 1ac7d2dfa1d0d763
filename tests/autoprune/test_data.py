from __future__ import annotations

import io
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import save as save_torch_bytes
from torch import nn

from autoprune.data import (
    Dataset,
    builtin_datasets,
    check_compatible,
    load_dataset,
    load_dataset_bytes,
)
from autoprune.errors import CorruptFileError, DatasetError, InvalidConfigError, ShapeMismatchError


def _blobs(n: int = 60, d: int = 5, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    x = rng.normal(size=(n, d)).astype(np.float64) + y[:, None]
    return x, y


# --- built-in datasets -------------------------------------------------------------------------------------


def test_builtin_names() -> None:
    assert builtin_datasets() == ["digits", "mnist1d"]


def test_digits_shapes_scaling_and_split() -> None:
    ds = load_dataset("DIGITS")
    assert ds.name == "digits"
    assert ds.input_shape == (1, 8, 8)
    assert ds.x_train.dtype == torch.float32 and ds.y_train is not None and ds.y_train.dtype == torch.int64
    assert ds.num_classes == 10 and ds.has_labels
    assert ds.num_train + ds.num_val + ds.num_test == 1797
    assert ds.num_val + ds.num_test == round(1797 * 0.2) and ds.num_test == round(round(1797 * 0.2) / 2)
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    assert set(ds.y_val.tolist()) == set(range(10))  # type: ignore[union-attr]


def test_digits_split_is_deterministic_and_seeded() -> None:
    a, b = load_dataset("digits", seed=3), load_dataset("digits", seed=3)
    c = load_dataset("digits", seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)  # type: ignore[arg-type]
    assert not torch.equal(a.x_train, c.x_train)
    assert load_dataset("digits", val_fraction=0.5, test_fraction=None).num_val == round(1797 * 0.5)


def test_mnist1d_uses_its_own_split_and_leaves_global_rng_alone() -> None:
    random.seed(123)
    np.random.seed(123)
    expected_py, expected_np = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(123)
    ds = load_dataset("mnist1d")
    assert (random.random(), np.random.rand()) == (expected_py, expected_np)
    assert ds.input_shape == (1, 40)
    assert (ds.num_train, ds.num_val, ds.num_test, ds.num_classes) == (4000, 500, 500, 10)
    whole = load_dataset("mnist1d", test_fraction=None)
    assert whole.num_val == 1000 and torch.equal(whole.x_val, load_dataset("mnist1d", seed=9, test_fraction=None).x_val)


def test_batches_are_deterministic_and_cover_the_split() -> None:
    ds = load_dataset("digits").subset(50, 20)
    first = [y for _, y in ds.train_batches(16, seed=1)]
    again = [y for _, y in ds.train_batches(16, seed=1)]
    other = [y for _, y in ds.train_batches(16, seed=2)]
    assert [len(y) for y in first] == [16, 16, 16, 2]  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # type: ignore[arg-type]
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))  # type: ignore[arg-type]
    assert sorted(torch.cat(first).tolist()) == sorted(ds.y_train.tolist())  # type: ignore[arg-type, union-attr]
    # max_batches crosses epochs; drop_last never yields a short batch
    sizes = [len(x) for x, _ in ds.train_batches(16, seed=1, max_batches=7, drop_last=True)]
    assert sizes == [16] * 7
    val = torch.cat([x for x, _ in ds.val_batches(7)])
    assert torch.equal(val, ds.x_val)


def test_subset_is_seeded_and_keeps_classes() -> None:
    ds = load_dataset("digits")
    a, b = ds.subset(30, 10, seed=5), ds.subset(30, 10, seed=5)
    assert (a.num_train, a.num_val, a.num_classes) == (30, 10, 10)
    assert torch.equal(a.x_test, ds.x_test)  # type: ignore[arg-type]  # a quick run keeps the whole test split
    assert torch.equal(a.x_train, b.x_train)
    assert ds.subset(10_000).num_train == ds.num_train
    with pytest.raises(InvalidConfigError):
        ds.subset(1)


# --- files ----------------------------------------------------------------------------------------------


def test_npz_with_x_y_is_split_deterministically(tmp_path: Path) -> None:
    x, y = _blobs(n=50)
    path = tmp_path / "blobs.npz"
    np.savez(path, x=x, y=y, notes=np.arange(3))
    a = load_dataset(path, val_fraction=0.2, seed=1)
    b = load_dataset(str(path), val_fraction=0.2, seed=1)
    assert a.name == "blobs" and a.input_shape == (5,) and a.x_train.dtype == torch.float32
    assert (a.num_train, a.num_val, a.num_test, a.num_classes) == (40, 5, 5, 3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)  # type: ignore[arg-type]
    assert not torch.equal(a.y_train, load_dataset(path, seed=2).y_train)  # type: ignore[arg-type]
    # the split is a partition of the original rows
    rows = torch.cat([a.x_train, a.x_val, a.x_test]).double()  # type: ignore[list-item]
    assert torch.allclose(rows.sort(dim=0).values, torch.tensor(x).float().double().sort(dim=0).values)


def test_npz_with_explicit_splits_and_int_inputs(tmp_path: Path) -> None:
    path = tmp_path / "split.npz"
    np.savez(
        path,
        x_train=np.arange(24, dtype=np.uint8).reshape(6, 1, 4),
        y_train=np.array([0, 1, 2, 0, 1, 2], dtype=np.int32),
        x_val=np.ones((3, 1, 4), dtype=np.int64),
        y_val=np.array([4, 0, 1]),
    )
    ds = load_dataset(path)
    assert ds.x_train.dtype == torch.float32 and float(ds.x_train.max()) == 23.0  # cast, not rescaled
    assert ds.num_classes == 5  # max over both splits + 1
    assert torch.equal(ds.y_train, torch.tensor([0, 1, 2, 0, 1, 2]))  # type: ignore[arg-type]


def test_safetensors_arrays(tmp_path: Path) -> None:
    x, y = _blobs(n=20, d=4)
    path = tmp_path / "data.safetensors"
    save_file({"x": x.astype(np.float32), "y": y.astype(np.int64)}, str(path))
    ds = load_dataset(path, val_fraction=0.25)
    assert (ds.num_train, ds.num_val + ds.num_test, ds.input_shape) == (15, 5, (4,))
    # the same arrays from bytes, as the service will receive them
    blob = save_torch_bytes({"x_train": torch.rand(6, 2, 3), "x_val": torch.rand(4, 2, 3)})
    up = load_dataset_bytes(blob, "upload.safetensors")
    assert up.name == "upload" and not up.has_labels and up.input_shape == (2, 3)


def test_label_free_npz_and_file_object(tmp_path: Path) -> None:
    buf = io.BytesIO()
    np.savez(buf, x=np.random.default_rng(0).normal(size=(30, 3, 8)).astype(np.float32))
    ds = load_dataset(io.BytesIO(buf.getvalue()), format="npz", name="feats")
    assert ds.name == "feats" and not ds.has_labels and ds.num_classes is None
    assert ds.y_train is None and ds.y_val is None and ds.y_test is None
    assert (ds.num_train, ds.num_val, ds.num_test) == (24, 3, 3)
    assert all(y is None for _, y in ds.train_batches(8, seed=0))
    with pytest.raises(InvalidConfigError):
        load_dataset(buf.getvalue())  # bytes need a format


def test_test_split_is_held_out_of_validation_and_seeded(tmp_path: Path) -> None:
    whole = load_dataset("digits", test_fraction=None)
    ds = load_dataset("digits")
    assert not whole.has_test and ds.has_test
    assert torch.equal(ds.x_train, whole.x_train)  # the training split (the shipped weights' one) is untouched
    held = {tuple(r.tolist()) for r in whole.x_val.flatten(1)}
    val = {tuple(r.tolist()) for r in ds.x_val.flatten(1)}
    test = {tuple(r.tolist()) for r in ds.x_test.flatten(1)}  # type: ignore[union-attr]
    assert val | test <= held and not (val & test)
    assert torch.equal(ds.x_test, load_dataset("digits").x_test)  # type: ignore[arg-type]
    assert not torch.equal(ds.x_test, load_dataset("digits", seed=1).x_test)  # type: ignore[arg-type]
    view = ds.test_view()
    assert torch.equal(view.x_val, ds.x_test) and torch.equal(view.y_val, ds.y_test)  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="no test split"):
        whole.test_view()
    with pytest.raises(InvalidConfigError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.0)


def test_npz_with_its_own_test_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "three.npz"
    np.savez(
        path,
        x_train=rng.normal(size=(8, 3)),
        y_train=np.array([0, 1] * 4),
        x_val=rng.normal(size=(4, 3)),
        y_val=np.array([0, 1, 0, 1]),
        x_test=rng.normal(size=(5, 3)),
        y_test=np.array([0, 1, 2, 0, 1]),
    )
    ds = load_dataset(path)
    assert (ds.num_train, ds.num_val, ds.num_test, ds.num_classes) == (8, 4, 5, 3)  # the file's split is kept
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=rng.normal(size=(8, 3)), y_train=np.zeros(8, int), x_val=rng.normal(size=(4, 3)),
             y_val=np.zeros(4, int), x_test=rng.normal(size=(5, 3)))  # fmt: skip
    with pytest.raises(DatasetError, match="y_test"):
        load_dataset(bad)
    with pytest.raises(DatasetError, match="same sample shape"):
        Dataset("d", torch.rand(4, 3), None, torch.rand(4, 3), None, x_test=torch.rand(4, 2))


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": np.array([[0.0, np.nan]] * 10), "y": np.zeros(10, dtype=np.int64)}, "NaN"),
        ({"x": np.array([[0.0, np.inf]] * 10)}, "infinite"),
        ({"x": np.zeros((10, 2)), "y": np.zeros(9, dtype=np.int64)}, "9 labels"),
        ({"x": np.zeros((10, 2)), "y": np.array([0, 1, -1, 0, 1, 0, 1, 0, 1, 0])}, "negative"),
        ({"x": np.zeros((10, 2)), "y": np.zeros(10)}, "integers"),
        ({"x": np.zeros((10, 2)), "y": np.zeros((10, 2), dtype=np.int64)}, "1-D"),
        ({"x": np.zeros((3, 2))}, "cannot be split"),
        ({"x_train": np.zeros((5, 2)), "x_val": np.zeros((1, 2))}, "at least 2"),
        ({"x_train": np.zeros((5, 2)), "x_val": np.zeros((3, 3))}, "same sample shape"),
        ({"x_train": np.zeros((5, 2)), "y_train": np.zeros(5, int), "x_val": np.zeros((3, 2))}, "one split"),
        ({"x": np.zeros((10, 2)), "x_train": np.zeros((10, 2))}, "mixes"),
        ({"features": np.zeros((10, 2))}, "no known arrays"),
        ({"x": np.array(["a", "b", "c", "d"])}, "numeric"),
        ({"x": np.zeros(10)}, "batch dimension"),
        ({"x_train": np.zeros((0, 2)), "x_val": np.zeros((4, 2))}, "holds no samples"),
        ({"x": np.zeros((10, 2)), "y": np.full(10, 10**9)}, "more than the 100000"),
    ],
)
def test_invalid_contents_raise_dataset_error(arrays: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        load_dataset_bytes(_npz_bytes(**arrays), "bad.npz")


def test_corrupt_files_raise_corrupt_file_error(tmp_path: Path) -> None:
    good = _npz_bytes(x=np.zeros((10, 2)))
    (tmp_path / "trunc.npz").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01not safetensors at all")
    (tmp_path / "text.npz").write_bytes(b"hello, I am not a zip")
    np.save(tmp_path / "single.npy", np.zeros((10, 2)))
    (tmp_path / "single.npz").write_bytes((tmp_path / "single.npy").read_bytes())
    for name in ("trunc.npz", "junk.safetensors", "text.npz", "single.npz"):
        with pytest.raises(CorruptFileError):
            load_dataset(tmp_path / name)
    with pytest.raises(DatasetError, match="cannot tell the format"):
        load_dataset(tmp_path / "single.npy")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset(tmp_path / "missing.npz")


class _Boom:
    """Unpickling this object would flip a flag: the loader must never do it."""

    triggered = False

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_Boom._trigger, ())

    @staticmethod
    def _trigger() -> None:
        _Boom.triggered = True


def test_pickled_object_arrays_are_refused_never_unpickled(tmp_path: Path) -> None:
    obj = np.empty(10, dtype=object)
    obj[:] = [_Boom() for _ in range(10)]
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.zeros((10, 2)), y=obj)
    assert b"'descr': '|O'" in path.read_bytes()  # the archive really holds a pickled object array
    with pytest.raises(CorruptFileError, match="unpickling"):
        load_dataset(path)
    raw = io.BytesIO()
    pickle.dump({"x": np.zeros((10, 2))}, raw)  # a bare pickle named .npz
    with pytest.raises(CorruptFileError):
        load_dataset_bytes(raw.getvalue(), "evil.npz")
    assert _Boom.triggered is False


def test_dataset_built_by_hand_is_validated() -> None:
    ds = Dataset("hand", np.zeros((4, 3)), np.array([0, 1, 1, 0]), torch.zeros(2, 3), torch.tensor([1, 0]))  # type: ignore[arg-type]
    assert ds.x_train.dtype == torch.float32 and ds.num_classes == 2
    assert "hand" in repr(ds) and "2 classes" in repr(ds)
    with pytest.raises(DatasetError, match="both splits"):
        Dataset("half", torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(2, 3), None)
    with pytest.raises(DatasetError, match="num_classes"):
        Dataset("few", torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]), torch.zeros(2, 3), torch.tensor([0, 1]), 3)


# --- compatibility ----------------------------------------------------------------------------------------


def _conv_net(in_channels: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, classes))


def test_check_compatible_accepts_a_fitting_model_and_restores_mode() -> None:
    ds = load_dataset("digits")
    model = _conv_net(1, 10).train()
    check_compatible(model, ds)
    assert model.training


def test_check_compatible_rejects_wrong_input_shape() -> None:
    ds = load_dataset("digits")
    with pytest.raises(ShapeMismatchError, match=r"in_channels=3.*\(N, 1, 8, 8\)"):
        check_compatible(_conv_net(3, 10), ds)
    seq = load_dataset("mnist1d")
    with pytest.raises(ShapeMismatchError, match="model expects"):
        check_compatible(_conv_net(1, 10), seq)


def test_check_compatible_rejects_too_few_outputs_or_non_logits() -> None:
    ds = load_dataset("digits")
    with pytest.raises(DatasetError, match=r"10 classes.*5 logits"):
        check_compatible(_conv_net(1, 5), ds)
    with pytest.raises(DatasetError, match=r"\(B, K\)"):
        check_compatible(nn.Conv2d(1, 10, 3), ds)
    unlabelled = Dataset("feats", ds.x_train, None, ds.x_val, None)
    check_compatible(nn.Conv2d(1, 10, 3), unlabelled)  # any output is fine without labels
