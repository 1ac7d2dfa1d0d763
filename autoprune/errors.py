"""Typed exceptions raised by the library.

Every error a user can cause derives from :class:`AutopruneError`, so callers (the CLI, the service) can turn
any of them into a one-line message or an RFC 9457 problem without catching unrelated bugs.
"""

from __future__ import annotations


class AutopruneError(Exception):
    """Base class of every error caused by the user's input or environment."""


class UnknownArchitectureError(AutopruneError, KeyError):
    """An architecture name that is neither built in nor registered through an entry point."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class InvalidModelError(AutopruneError):
    """A model that cannot be used: wrong kwargs, weights that do not fit, a forward that fails."""


class CorruptFileError(AutopruneError):
    """A file that cannot be read as what it claims to be (safetensors, .pt2, .npz)."""


class UnsupportedOperatorError(AutopruneError):
    """A graph operator that cannot be converted back into a prunable module."""


class ShapeMismatchError(AutopruneError):
    """Inputs or outputs whose shapes do not fit the model or the data."""


class DatasetError(AutopruneError):
    """A dataset that cannot be loaded or does not match the model (e.g. labels vs. outputs)."""


class InvalidPlanError(AutopruneError):
    """A pruning plan naming groups that do not exist, or with ratios out of range."""


class PruningError(AutopruneError):
    """Pruning produced a model that does not run (e.g. coupling Torch-Pruning could not resolve)."""


class ExportError(AutopruneError):
    """An export that failed or whose artefact does not reproduce the model's outputs."""


class InvalidConfigError(AutopruneError, ValueError):
    """A configuration value out of range or unknown (metric name, reward form, meter settings...)."""


class DataRequiredError(InvalidConfigError):
    """Something that needs data (fine-tuning, BatchNorm re-estimation without calibration batches, a data
    metric, a final fine-tune) was asked for where there is none."""
