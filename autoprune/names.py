"""The names a job, a plan or a download may use, in one place (torch-free: the API and the CLI import it).

Every other module takes its choices and bounds from here; nothing restates them.
"""

from __future__ import annotations

METRICS = ("accuracy", "agreement", "kl", "cosine")
"""Quality metrics; ``accuracy`` needs labels, the others compare with the unpruned model's outputs."""
SELECTIONS = ("reward", "latency", "quality")
"""Which front point is "best"."""
FORMS = ("mnasnet", "budget", "weighted")
"""Reward forms."""
CRITERIA = ("l1", "l2", "taylor", "bn_scale", "random")
"""Importance criteria deciding which channels or weights go."""
METHODS = ("structured", "unstructured")
"""Pruning methods: remove channels, or zero weights."""
MAX_RATIO = 0.95
"""The largest pruning ratio any group may be given."""
RUNTIMES = ("torch", "onnxruntime")
"""Runtimes latency is measured in."""
SHARED_STRATEGIES = ("optuna-tpe", "optuna-nsga2")
"""Strategies whose search state lives in a database (an Optuna study), so several workers can share a job."""
OPTIMIZERS = ("adamw", "sgd")
"""Fine-tuning optimizers."""
LR_SCHEDULES = ("constant", "cosine", "onecycle")
"""Fine-tuning learning-rate schedules."""
ITERATIVE_SCHEDULES = ("linear", "cubic")
"""How iterative pruning spreads a plan over its increments: evenly, or large cuts first (Zhu & Gupta's cubic)."""
EXPORT_FORMATS = ("onnx", "safetensors", "pt2")
"""Formats a pruned model is exported and downloaded in."""
MEDIA_TYPES = {"onnx": "application/onnx", "safetensors": "application/zip", "pt2": "application/zip"}
"""Media type of each export format's download (safetensors travel zipped with their plan; a ``.pt2`` program is
itself a zip archive)."""
SUFFIXES = {"onnx": ".onnx", "safetensors": ".zip", "pt2": ".pt2"}
"""File suffix of each export format's download."""
MIN_PER_SPLIT = 2
"""The fewest samples a dataset split (train, val, test) may hold; one unsplit array needs twice as many."""
MAX_CLASSES = 100_000
"""The most classes a labelled dataset may have (labels are class indices; a label of 10**9 is a mistake, and a
head that wide would not fit in memory)."""
MAX_BUILTIN_PARAMS = 200_000_000
"""The most parameters a built-in architecture may be built with (counted on the meta device before anything is
allocated: ``{"hidden": [10**9]}`` is refused, not an out-of-memory worker); 800 MB of float32 weights."""
MAX_BUILTIN_INPUT = 1 << 24
"""The most elements one example input of a built-in architecture may have (``image_size`` / ``seq_len`` /
``in_channels`` together: 3x2048x2048 is still allowed; the model is traced and timed on such inputs)."""
