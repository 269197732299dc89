"""``sparsewise bench nm``: packed N:M linear layers vs torch's F.linear on real layer shapes.

Shapes are nn.Linear weights (out_features, in_features) of Llama-2-7B and SmolLM2-135M, filled
with random normal values (the shapes are real, the values synthetic: speed does not depend on
them). Each measurement cycles through enough copies of the layer that the weights read exceed
twice the last-level cache, as the layers of a real model do during decode. Baseline: ``torch.nn.functional.linear`` with the same dtype and thread count, timed
interleaved with the candidate by :func:`sparsewise.bench.compare`.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bench import compare, write_results
from .functional import nm_linear
from .linear import SparseLinear
from .tensor import NMTensor

__all__ = ["SHAPES", "BATCHES", "measure", "run", "format_table"]

SHAPES = {
    "llama2-7b mlp up (11008x4096)": (11008, 4096),
    "llama2-7b mlp down (4096x11008)": (4096, 11008),
    "llama2-7b attn (4096x4096)": (4096, 4096),
    "smollm2 mlp up (1536x576)": (1536, 576),
    "smollm2 mlp down (576x1536)": (576, 1536),
    "smollm2 attn (576x576)": (576, 576),
}
BATCHES = (1, 8, 32, 256)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _cycle(pool):
    it = itertools.cycle(pool)
    return lambda: next(it)


def measure(shapes=None, batches=BATCHES, dtypes=("fp32", "bf16"), *, pairs: int = 5, progress=None) -> list[dict]:
    """Measure kernel and SparseLinear vs F.linear for every (shape, dtype, batch); return rows."""
    from ..advisor.probe import ReadMeter, cached_probe

    shapes = shapes or SHAPES
    meter = ReadMeter()  # the read bandwidth of each cell, measured around its timings
    rows = []
    todo = [(name, dt, b) for name in shapes for dt in dtypes for b in batches]
    bar = progress(total=len(todo)) if progress else None
    gen = torch.Generator().manual_seed(0)
    llc = cached_probe()["machine"].get("llc_bytes") or 32 << 20
    for name, dt in itertools.product(shapes, dtypes):
        o, k = shapes[name]
        dtype = DTYPES[dt]
        # As in a real model, every call reads weights that are not in cache: cycle through enough
        # copies (both sides) that their packed bytes exceed twice the last-level cache.
        one_packed = o * k // 2 * (4 if dt == "fp32" else 2) + o * k // 16
        copies = min(64, max(1, -(-2 * llc // one_packed)))
        packed_l, lin_l, layer_l, dense_l = [], [], [], []
        for _ in range(copies):
            dense = torch.randn(o, k, generator=gen).to(dtype)  # real values: no zero pages
            packed = NMTensor.from_dense(dense, 2, 4)
            lin = nn.Linear(k, o, bias=False, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(packed.to_dense())
            packed_l.append(packed)
            lin_l.append(lin)
            dense_l.append(lin.weight.detach())
            layer_l.append(SparseLinear.from_dense(lin))
            del dense
        layer = layer_l[0]
        for b in batches:
            if bar:
                bar.set_postfix_str(f"{name.split(' (')[0]} {dt} b{b}")
            pool = [torch.randn(b, k, generator=gen).to(dtype) for _ in range(3)]
            xa, xb = _cycle(pool), _cycle(pool)
            pk, dn, sl, ln = _cycle(packed_l), _cycle(dense_l), _cycle(layer_l), _cycle(lin_l)
            # the baseline multiplies by the same pruned weight, stored dense (what users run today)
            bw = meter.gbs()
            with torch.inference_mode():
                for copy_layer, copy_lin in zip(layer_l, lin_l):  # one-time work (dispatch, caches) untimed
                    copy_layer(pool[0])
                    copy_lin(pool[0])
                rk = compare(lambda: nm_linear(xa(), pk()), lambda: F.linear(xb(), dn()), pairs=pairs,
                             name=f"kernel {name} {dt} b{b}")
                # the module against the module it replaces (both pay nn.Module call overhead)
                rl = compare(lambda: sl()(xa()), lambda: ln()(xb()), pairs=pairs,
                             name=f"SparseLinear {name} {dt} b{b}")
            bw = max(bw, meter.gbs())  # a limit is the best the machine sustained meanwhile
            moved = packed.nbytes + b * (k + o) * 4
            rows.append({
                "shape": name, "out_features": o, "in_features": k, "dtype": dt, "batch": b,
                "kernel_ratio": rk.ratio, "kernel_ratio_min": rk.ratio_min, "kernel_ratio_max": rk.ratio_max,
                "sparselinear_ratio": rl.ratio, "sparselinear_ratio_min": rl.ratio_min,
                "kernel_ms": rk.candidate_s * 1e3, "dense_ms": rk.baseline_s * 1e3,
                "kernel_gbs": moved / rk.candidate_s / 1e9,
                "kernel_pct_read_bw": 100.0 * moved / rk.candidate_s / 1e9 / bw, "read_gbs": bw,
                "dense_weight_bytes": o * k * torch.tensor([], dtype=dtype).element_size(),
                "packed_bytes": packed.nbytes, "weight_copies": copies, "pairs": rk.pairs, "threads": rk.threads,
                "sparselinear_path": layer.cpu_path(b),
            })
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return rows


TABLE_HEADER = ("layer (out x in)", "dtype", "batch", "kernel vs F.linear", "SparseLinear vs nn.Linear (path)",
                "kernel ms", "% read BW")


def table_rows(rows: list[dict]) -> list[tuple[str, ...]]:
    """One display row per measurement (ratios > 1: faster than the dense baseline)."""
    return [(r["shape"], r["dtype"], str(r["batch"]), f"{r['kernel_ratio']:.2f}x",
             f"{r['sparselinear_ratio']:.2f}x ({r['sparselinear_path']})", f"{r['kernel_ms']:.3f}",
             f"{r['kernel_pct_read_bw']:.0f}%") for r in rows]


def format_table(rows: list[dict]) -> str:
    """Markdown table of measured rows."""
    out = ["| " + " | ".join(TABLE_HEADER) + " |", "|---|---|---:|---:|---:|---:|---:|"]
    out += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(out)


def run(args) -> Path:
    """Entry point of ``sparsewise bench nm``."""
    from tqdm.auto import tqdm

    from .._util import atomic_write_text, threads
    from ..advisor.probe import cached_probe

    with threads(args.threads):
        batches = (1, 8, 32) if args.quick else BATCHES
        rows = measure(batches=batches, pairs=3 if args.quick else 5, progress=lambda total: tqdm(total=total, desc="bench nm"))
        table = format_table(rows)
        out = Path(args.out)
        path = write_results(out / "nm.json", "nm", rows, machine=cached_probe(),
                             extra={"baseline": "torch.nn.functional.linear, same dtype and threads",
                                    "weights": "random normal values in real layer shapes (synthetic values)"})
        atomic_write_text(out / "nm.md", table + "\n")
    print(table)
    return path
