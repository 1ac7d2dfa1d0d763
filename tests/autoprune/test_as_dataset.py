"""``autoprune.as_dataset``: tensors, arrays, ``(x, y)`` pairs, dicts, DataLoaders and explicit splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import autoprune
from autoprune.data import Dataset, as_dataset, load_dataset
from autoprune.errors import DatasetError, InvalidConfigError


def _xy(n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 4, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def test_top_level_exports() -> None:
    assert autoprune.Dataset is Dataset and autoprune.as_dataset is as_dataset


def test_one_tensor_is_label_free_and_split_80_10_10_with_a_seed() -> None:
    x, _ = _xy()
    ds = as_dataset(x)
    assert (ds.num_train, ds.num_val, ds.num_test) == (80, 10, 10) and not ds.has_labels
    again, other = as_dataset(x), as_dataset(x, seed=1)
    assert torch.equal(ds.x_val, again.x_val)  # type: ignore[arg-type]
    assert not torch.equal(ds.x_val, other.x_val)  # type: ignore[arg-type]
    rows = {tuple(r.flatten().tolist()) for part in (ds.x_train, ds.x_val, ds.x_test) for r in part}  # type: ignore[union-attr]
    assert len(rows) == 100  # a partition: nothing lost, nothing twice
    assert as_dataset(x, test_fraction=None).num_val == 20


def test_xy_pairs_of_tensors_or_arrays_are_labelled() -> None:
    x, y = _xy()
    ds = as_dataset((x, y))
    assert ds.has_labels and ds.num_classes == 5 and ds.num_train == 80
    from_numpy = as_dataset((x.numpy(), y.numpy().astype(np.int32)))
    assert torch.equal(from_numpy.y_val, ds.y_val)  # type: ignore[arg-type]
    assert torch.equal(from_numpy.x_train, ds.x_train)  # type: ignore[arg-type]
    assert as_dataset((x, y), num_classes=7).num_classes == 7
    assert as_dataset([(x[:50], y[:50]), (x[50:], y[50:])]).num_train == 80  # a list: batches


def test_a_dataloader_gives_the_same_dataset_as_its_tensors() -> None:
    x, y = _xy()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    ds, ref = as_dataset(loader), as_dataset((x, y))
    assert torch.equal(ds.x_train, ref.x_train) and torch.equal(ds.y_test, ref.y_test)  # type: ignore[arg-type]
    unlabelled = as_dataset(DataLoader(x, batch_size=30))
    assert not unlabelled.has_labels and unlabelled.num_train == 80


def test_dicts_and_batch_encodings_are_keyword_inputs() -> None:
    ids = torch.randint(0, 100, (50, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ds = as_dataset({"input_ids": ids, "attention_mask": mask})
    assert ds.named_inputs and ds.num_train == 40 and ds.x_val["input_ids"].dtype == torch.int64  # type: ignore[index]
    labelled = as_dataset(({"input_ids": ids, "attention_mask": mask}, ids[:, 0] % 2))
    assert labelled.has_labels and labelled.num_classes == 2
    transformers = pytest.importorskip("transformers")
    enc = transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})
    assert torch.equal(as_dataset(enc).x_val["input_ids"], ds.x_val["input_ids"])  # type: ignore[index]


def test_dict_batches_with_labels_as_a_huggingface_collator_writes_them() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, 9, (10, 4), generator=gen), "labels": torch.tensor([0, 1] * 5)} for _ in range(4)
    ]
    ds = as_dataset(batches)
    assert ds.has_labels and ds.named_inputs and list(ds.x_train) == ["input_ids"]  # type: ignore[arg-type]
    assert ds.num_train + ds.num_val + ds.num_test == 40


def test_explicit_splits_and_file_layouts() -> None:
    x, y = _xy()
    ds = as_dataset((x[:60], y[:60]), (x[60:80], y[60:80]), (x[80:], y[80:]))
    assert (ds.num_train, ds.num_val, ds.num_test) == (60, 20, 20) and torch.equal(ds.x_test, x[80:])  # type: ignore[arg-type]
    carved = as_dataset((x[:60], y[:60]), (x[60:], y[60:]))
    assert (carved.num_val, carved.num_test) == (20, 20) and torch.equal(carved.x_train, x[:60])
    layout = as_dataset({"x_train": x[:60], "y_train": y[:60], "x_val": x[60:], "y_val": y[60:]})
    assert layout.num_train == 60 and layout.num_val == 20
    assert as_dataset("digits").num_val == load_dataset("digits").num_val == 179


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        ((torch.zeros(10, 2), torch.zeros(10, dtype=torch.int64), torch.zeros(10)), DatasetError, "3 items"),
        ([torch.zeros(4, 3), torch.zeros(4, 5)], DatasetError, "same length"),  # batches padded differently
        (iter([]), DatasetError, "no batches"),
        (3.5, DatasetError, "DataLoader"),
        ((torch.zeros(10, 2), torch.zeros(10)), DatasetError, "labels must be integers"),
    ],
)
def test_bad_data_is_a_typed_error(data: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        as_dataset(data)


def test_a_dataset_brings_its_own_splits() -> None:
    x, y = _xy()
    ds = as_dataset((x, y))
    assert as_dataset(ds) is ds
    with pytest.raises(InvalidConfigError, match="already has its splits"):
        as_dataset(ds, (x, y))
    with pytest.raises(InvalidConfigError, match="give val with test"):
        as_dataset((x, y), test=(x, y))
