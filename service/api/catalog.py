"""Names the API validates against without importing torch.

``autoprune.models.registry`` imports torch, so the built-in architecture names are repeated here (a test
checks them against ``list_architectures()`` in a subprocess); architectures that operators add through the
``autoprune.architectures`` entry-point group are listed from package metadata, without loading them.
"""

from __future__ import annotations

from importlib import metadata

from autoprune.names import EXPORT_FORMATS  # noqa: F401  (re-exported: the catalog lists them)

BUILTIN_ARCHITECTURES = (
    "cnn1d",
    "gru",
    "lstm",
    "mlp",
    "mobilenetv2",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "transformer",
    "vgg",
)
BUILTIN_DATASETS = ("digits", "mnist1d")
ENTRY_POINT_GROUP = "autoprune.architectures"


def architectures() -> list[str]:
    """Built-in names and the entry-point names (lower-cased), sorted; nothing is imported."""
    names = set(BUILTIN_ARCHITECTURES)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        names.add(ep.name.strip().lower())
    return sorted(names)


def normalise_architecture(name: str) -> str | None:
    """The canonical name of a known architecture, or None."""
    key = name.strip().lower() if isinstance(name, str) else ""
    return key if key and key in architectures() else None
