"""``sparsewise bench embedding``: the engine vs nn.EmbeddingBag (and FBGEMM when installed).

Forward: 8 tables x 1M rows x dim 128 (4 GB in fp32: 128 times the last-level cache), batch 8192,
32 ids per bag, ids uniform and Zipf(1.05), Zipf(1.15); rows stored fp32, bf16, int8. Baseline:
one ``nn.EmbeddingBag(mode="sum")`` per table holding the same fp32 values (how users write it),
its outputs not even concatenated. Training: one 1M x 128 table, batch 4096 x 32 uniform ids,
forward + backward + optimizer; baseline ``nn.EmbeddingBag(sparse=True)`` + ``torch.optim.Adagrad``,
and FBGEMM's CPU table-batched embedding with fused exact row-wise Adagrad when the ``peers``
extra is installed. Table values are random (``normal``); ids are synthetic (uniform / Zipf).
Every ratio is measured interleaved in one process by :func:`sparsewise.bench.compare`, cycling
through 3 different id batches so no call re-reads the previous call's rows from cache.
"""
from __future__ import annotations

import functools
import gc
import itertools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..bench import compare, timeit, write_results
from .collection import EmbeddingBagCollection
from .config import Adagrad, RowwiseAdagrad, TableConfig
from .data import zipf_ids
from .functional import KernelChooser
from .jagged import KeyedJagged

__all__ = ["forward_rows", "training_rows", "dlrm_rows", "run", "format_table", "fbgemm_available", "lines_per_row",
           "rmw_rows", "floor_step"]

DISTS = {"uniform": 0.0, "zipf1.05": 1.05, "zipf1.15": 1.15}


def fbgemm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("fbgemm_gpu") is not None


def lines_per_row(row_bytes: int) -> float:
    """Cache lines a random row of ``row_bytes`` spans, averaged over rows of a table whose base is
    64 B aligned (rows at a multiple of ``row_bytes``): 8 for 512 B fp32 rows, 4 for 256 B bf16,
    3 for the 136 B of an int8 row of dim 128."""
    if row_bytes <= 0:
        raise ValueError(f"row_bytes must be positive, got {row_bytes}")
    period = 64 // math.gcd(row_bytes, 64)
    return sum((r * row_bytes + row_bytes - 1) // 64 - (r * row_bytes) // 64 + 1 for r in range(period)) / period


@functools.lru_cache(maxsize=None)
def rmw_rows():
    """A jitted ``rmw(tab, rows, dist)``: read, modify and write back each row of ``rows`` (sorted
    distinct row ids) of the fp32 table ``tab`` once, ``row <- 0.999 * row + 1e-3``, rows split in
    contiguous chunks over the threads, prefetching the row ``dist`` ahead into L2: the least
    memory traffic a fused sparse update needs (no sort, gradient or optimizer state)."""
    import numba

    from .._intrinsics import prefetch_row

    pf = prefetch_row()

    @numba.njit(parallel=True, fastmath=True)
    def rmw(tab, rows, dist):
        n = rows.size
        nt = numba.get_num_threads()
        per = (n + nt - 1) // nt
        base = tab.ctypes.data
        rb = tab.shape[1] * 4
        for t in numba.prange(nt):
            lo, hi = t * per, min(n, (t + 1) * per)
            for i in range(lo, hi):
                if dist > 0 and i + dist < hi:
                    pf(base + rows[i + dist] * rb, rb)
                r = rows[i]
                for j in range(tab.shape[1]):
                    tab[r, j] = tab[r, j] * np.float32(0.999) + np.float32(1e-3)

    return rmw


def floor_step(N: int, D: int, pool: list, *, dists=(0, 4, 8, 16, 32)):
    """A callable doing the least memory work of one fused training step on one (N, D) fp32 table
    for the batches of ``pool`` (cycled): gather every id's row with the best simple reader
    (:func:`sparsewise.advisor.probe.gather_limit`'s choice of prefetch distance and reading), then
    read-modify-write each distinct row once (:func:`rmw_rows`, the best prefetch distance of
    ``dists``). No sort, gradient or optimizer arithmetic: timing it against a baseline bounds the
    ratio any implementation of the step can reach on this machine. Its table is its own (huge
    pages, real values), as the engine's is."""
    from ..advisor.probe import gather_limit, gather_reader
    from .storage import alloc_rows

    tab_t = alloc_rows(N, D, "fp32")
    tab_t.normal_()  # real values: untouched pages would all map the shared zero page
    tab = tab_t.numpy()
    ids = [kj.values.numpy() for kj in pool]
    distinct = [np.unique(i) for i in ids]
    lim = gather_limit(tab, ids[0].size, repeats=2)
    read, _, _ = gather_reader(tab)
    gd, pl = lim["prefetch_ids"], lim["per_line"]
    rmw = rmw_rows()
    best = {}
    for d in dists:  # each call on the next batch's rows, so none is still cached from the last
        nxt = itertools.cycle(distinct)
        best[d] = timeit(lambda: rmw(tab, next(nxt), d), repeats=len(pool), min_time=0.0)["min_s"]
    rd = min(best, key=best.get)
    cyc = itertools.cycle(range(len(pool)))

    def step():
        k = next(cyc)
        read(ids[k], gd, pl)
        rmw(tab, distinct[k], rd)

    step.table = tab_t  # keeps the table alive with the callable
    return step


def _batches(T, N, B, L, alpha, count, seed):
    gen = np.random.default_rng(seed)
    perms = [gen.permutation(N) for _ in range(T)]
    out = []
    for _ in range(count):
        vals = np.concatenate([zipf_ids(B * L, N, alpha, gen, perms[t]) for t in range(T)])
        out.append(KeyedJagged([f"f{t}" for t in range(T)], torch.from_numpy(vals), lengths=torch.full((T * B,), L)))
    return out


def forward_rows(*, T=8, N=1_000_000, D=128, B=8192, L=32, dists=tuple(DISTS), dtypes=("fp32", "bf16", "int8"),
                 variants=("kernel", "auto", "dedup"), pairs=5, progress=None) -> list[dict]:
    """Forward lookups: every (distribution, dtype, variant) against one nn.EmbeddingBag per table.
    Variants: "kernel" (our prefetching gather), "dedup" (our sorted gather), "auto" (what a user
    gets by default: the faster of ours and torch's kernel, chosen on the first live batches)."""
    from ..advisor.probe import cached_probe, gather_limit, gather_reader

    probe = cached_probe()
    bw = probe["bandwidth"]["read_gbs_all"]
    limits = {}  # dtype -> gather_limit on that engine's own T tables (picks the prefetch distance)
    ebc = EmbeddingBagCollection([TableConfig(f"t{t}", N, D, (f"f{t}",), init="normal", seed=t) for t in range(T)]).eval()
    bags = []
    for t in range(T):
        eb = nn.EmbeddingBag(N, D, mode="sum")
        with torch.no_grad():
            eb.weight.copy_(ebc.weights()[t])
        bags.append(eb)
    offsets = torch.arange(0, B * L, L)
    # the ceiling: each dtype's best simple reader (every line of every row, no arithmetic) on
    # that dtype's own tables against the baseline in the same pairs (until session 27 it was the
    # fp32 reader's ratio scaled by lines per row: short rows do not keep the line rate)
    rows, todo = [], [(d, dt, v) for d in dists for dt in dtypes for v in variants]
    bar = progress(total=len(todo)) if progress else None
    engines = {"fp32": ebc}
    for dist in dists:
        pool = _batches(T, N, B, L, DISTS[dist], 3, seed=1)
        for dt, variant in itertools.product(dtypes, variants):
            if dt not in engines:
                engines[dt] = ebc.quantize(dt)
            eng = engines[dt]
            tabs = [eng.embedding_tables[f"t{t}"].weight for t in range(T)]
            if dt not in limits:  # same memory, page size, row bytes and footprint as the lookups read
                limits[dt] = gather_limit(tabs, 1 << 20)
            eng.dedup = variant == "dedup"
            eng.backend = "auto" if variant == "auto" else "kernel"
            eng.chooser = KernelChooser()
            if bar:
                bar.set_postfix_str(f"{dist} {dt} {variant}")
            if variant == "auto":  # let it decide on live batches before the timed pairs
                with torch.inference_mode():
                    for kj in pool * 3:
                        eng(kj)
            ca, cb = itertools.cycle(pool), itertools.cycle(pool)

            def ours():
                return eng(next(ca)).values

            def base():
                v = next(cb).values
                return [bags[t](v[t * B * L:(t + 1) * B * L], offsets) for t in range(T)]

            with torch.inference_mode():
                r = compare(ours, base, pairs=pairs, name=f"forward {dist} {dt} {variant}")
            lim = ceil = None
            if dist == "uniform" and variant == "kernel":
                # the gather limit on the same ids, tables and memory, interleaved with ours (the
                # batch's values hold feature t's ids in segment t, and feature t reads table t)
                read, _, _ = gather_reader(tabs)
                ids_pool = itertools.cycle([kj.values.numpy() for kj in pool])
                cl = itertools.cycle(pool)
                d, pl = limits[dt]["prefetch_ids"], limits[dt]["per_line"]
                with torch.inference_mode():
                    lim = compare(lambda: read(next(ids_pool), d, pl), lambda: eng(next(cl)).values, pairs=pairs,
                                  name=f"gather limit {dt}")
                    ceil = compare(lambda: read(next(ids_pool), d, pl), base, pairs=pairs,
                                   name=f"gather limit {dt} vs baseline").ratio
            picked = (next(iter(eng.chooser.decisions().values()), None) or "kernel") if variant == "auto" else None
            nnz = T * B * L
            row_b = eng.tables[0].row_bytes
            gbs = nnz * row_b / r.candidate_s / 1e9
            lines = lines_per_row(row_b)
            rows.append({
                "kind": "forward", "ids": dist, "dtype": dt, "variant": variant, "auto_picked": picked, "tables": T, "rows": N, "dim": D, "batch": B, "ids_per_bag": L,
                "ratio": r.ratio, "ratio_min": r.ratio_min, "ratio_max": r.ratio_max,
                "ms": r.candidate_s * 1e3, "baseline_ms": r.baseline_s * 1e3, "baseline": "nn.EmbeddingBag fp32 per table",
                "row_bytes": row_b, "gbs": gbs, "baseline_gbs": nnz * 4 * D / r.baseline_s / 1e9,
                # uniform ids, our kernel: % of the gather limit timed in the same pairs (GB/s of
                # the limit read there); skewed ids hit in cache, where a DRAM limit says nothing
                "gather_limit_probe": limits[dt],
                "gather_limit_gbs": None if lim is None else nnz * row_b / lim.candidate_s / 1e9,
                "pct_gather_limit": None if lim is None else 100 * lim.candidate_s / lim.baseline_s,
                "pct_read_bw": 100 * gbs / bw,
                # uniform ids: this dtype's best simple reader against the baseline (what a lookup
                # reading its rows at that rate, with no time for arithmetic, would reach)
                "lines_per_row": lines, "lines_per_s": nnz * lines / r.candidate_s,
                "gather_limit_lines_per_s": None if lim is None else nnz * lines / lim.candidate_s,
                "ceiling_ratio": ceil,
                "table_bytes": T * N * row_b, "pairs": r.pairs, "threads": r.threads})
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    del engines, ebc, bags
    gc.collect()
    return rows


def training_rows(*, N=1_000_000, D=128, B=4096, L=32, pairs=5, progress=None) -> list[dict]:
    """One training step (forward, backward, optimizer) on one table, uniform ids, against each
    baseline, and against the step's floor (:func:`floor_step`) timed beside it: ``of_floor`` is
    floor time / step time in the same rounds (1.0: the step does no more than its memory floor)."""
    pool = _batches(1, N, B, L, 0.0, 3, seed=2)
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(B, D, generator=gen)
    offsets = torch.arange(0, B * L, L)
    init = torch.randn(N, D, generator=gen) * 0.01
    baselines = {}

    eb = nn.EmbeddingBag(N, D, mode="sum", sparse=True)
    with torch.no_grad():
        eb.weight.copy_(init)
    opt = torch.optim.Adagrad(eb.parameters(), lr=0.01)
    cb = itertools.cycle(pool)

    def torch_step():
        opt.zero_grad(set_to_none=True)
        eb(next(cb).values, offsets).backward(grad)
        opt.step()

    baselines["nn.EmbeddingBag(sparse=True) + torch.optim.Adagrad"] = torch_step
    if fbgemm_available():
        baselines["FBGEMM TBE CPU, fused exact row-wise Adagrad"] = _fbgemm_step(N, D, init, pool, grad)
    rows = []
    cases = [(o, b) for o in ("RowwiseAdagrad", "Adagrad") for b in baselines]
    bar = progress(total=len(cases) + len(baselines)) if progress else None
    # the ceiling: the step's least memory work (floor_step) against each baseline, interleaved
    floor = floor_step(N, D, pool)
    ceilings = {}
    for base_name, base in baselines.items():
        if bar:
            bar.set_postfix_str(f"floor vs {base_name.split(' ')[0]}")
        c = compare(floor, base, pairs=pairs, name=f"train floor vs {base_name}")
        ceilings[base_name] = {"ceiling_ratio": c.ratio, "floor_ms": c.candidate_s * 1e3,
                               "floor_baseline_ms": c.baseline_s * 1e3}
        if bar:
            bar.update(1)
    for opt_name, base_name in cases:
        optim = RowwiseAdagrad(lr=0.01) if opt_name == "RowwiseAdagrad" else Adagrad(lr=0.01)
        ebc = EmbeddingBagCollection([TableConfig("t", N, D, ("f0",), init=lambda w: w.copy_(init))], optimizer=optim)
        ca = itertools.cycle(pool)

        def ours():
            ebc(next(ca)).values.backward(grad)

        if bar:
            bar.set_postfix_str(f"{opt_name} vs {base_name.split(' ')[0]}")
        r = compare(ours, baselines[base_name], pairs=pairs, name=f"train {opt_name} vs {base_name}")
        # and against the floor, interleaved too: how far the step is from its least memory work
        # in the same minutes (the machine's memory speed drifts between the compares above)
        f = compare(ours, floor, pairs=pairs, name=f"train {opt_name} vs its floor")
        rows.append({"kind": "train", "optimizer": opt_name, "baseline": base_name, "rows": N, "dim": D, "batch": B,
                     "ids_per_bag": L, "ratio": r.ratio, "ratio_min": r.ratio_min, "ratio_max": r.ratio_max,
                     "ms": r.candidate_s * 1e3, "baseline_ms": r.baseline_s * 1e3, "pairs": r.pairs, "threads": r.threads,
                     **ceilings[base_name], "of_floor": f.ratio, "floor_beside_ms": f.baseline_s * 1e3,
                     "ours_beside_floor_ms": f.candidate_s * 1e3})
        del ebc
        gc.collect()
        if bar:
            bar.update(1)
    del floor
    gc.collect()
    if bar:
        bar.close()
    return rows


def dlrm_rows(*, batch_size=1024, pairs=7) -> list[dict]:
    """One DLRM training step (forward, backward, fused embedding Adagrad, dense Adam) against the
    same model written with nn.EmbeddingBag(sparse=True) + torch.optim.Adagrad, interleaved, on
    MovieLens-100k batches (synthetic Criteo-like batches when recbole is not installed)."""
    from .data import movielens_100k, synthetic_criteo
    from .dlrm import DLRM, TorchDLRM

    try:
        data, _ = movielens_100k()
    except FileNotFoundError:
        data = synthetic_criteo(40 * batch_size, scale=1e-2)
    model = DLRM.for_data(data, dim=16, lr=0.1)
    base = TorchDLRM.from_dlrm(model)
    loss_fn = nn.BCEWithLogitsLoss()
    batches = [data.batch(lo, lo + batch_size) for lo in range(0, len(data) - batch_size + 1, batch_size)][:16]

    def stepper(m):
        dense_opt = torch.optim.Adam(m.dense_parameters(), lr=3e-3)
        sparse_opt = torch.optim.Adagrad(list(m.bags.parameters()), lr=0.1) if isinstance(m, TorchDLRM) else None
        cyc = itertools.cycle(batches)

        def step():
            x, kj, y = next(cyc)
            dense_opt.zero_grad(set_to_none=True)
            if sparse_opt is not None:
                sparse_opt.zero_grad(set_to_none=True)
            loss_fn(m(x, kj), y).backward()
            dense_opt.step()
            if sparse_opt is not None:
                sparse_opt.step()

        return step

    r = compare(stepper(model), stepper(base), pairs=pairs, name="dlrm train step")
    return [{"kind": "dlrm", "data": data.name, "batch": batch_size, "tables": len(model.ebc.tables),
             "rows": sum(t.num_rows for t in model.ebc.tables), "ratio": r.ratio, "ratio_min": r.ratio_min,
             "ratio_max": r.ratio_max, "ms": r.candidate_s * 1e3, "baseline_ms": r.baseline_s * 1e3,
             "baseline": "same DLRM with nn.EmbeddingBag(sparse=True) + torch.optim.Adagrad", "pairs": r.pairs,
             "threads": r.threads}]


def _fbgemm_step(N, D, init, pool, grad):
    """FBGEMM's CPU table-batched embedding bag with the optimizer fused into backward."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                         SplitTableBatchedEmbeddingBagsCodegen)

    tbe = SplitTableBatchedEmbeddingBagsCodegen([(N, D, EmbeddingLocation.HOST, ComputeDevice.CPU)],
                                                optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.01,
                                                eps=1e-8)
    with torch.no_grad():
        tbe.split_embedding_weights()[0].copy_(init)
    cyc = itertools.cycle(pool)

    def step():
        kj = next(cyc)
        tbe(kj.values, kj.offsets).backward(grad)

    return step


def _variant(r: dict) -> str:
    v = r.get("variant", "kernel")
    return {"kernel": "ours (prefetch)", "dedup": "ours (dedup)"}.get(v, f"auto: {r.get('auto_picked')}")


def _ceiling(r: dict) -> str:
    return "-" if r.get("ceiling_ratio") is None else f"{r['ceiling_ratio']:.2f}x"


def _pct(r: dict) -> str:
    if r.get("of_floor") is not None:  # a training step: the floor timed beside it
        return f"floor {r['floor_beside_ms']:.1f} ms: {100 * r['of_floor']:.0f}%"
    if r.get("pct_gather_limit") is None:
        return "-"
    return f"{r['pct_gather_limit']:.0f}% of {r['gather_limit_gbs']:.1f}"


TABLE_HEADER = ("workload", "ids", "rows", "kernel", "ratio vs baseline", "ms", "baseline ms", "GB/s",
                "% of gather limit (GB/s)", "ceiling vs baseline")


def format_table(rows: list[dict]) -> str:
    out = ["| " + " | ".join(TABLE_HEADER) + " |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == "forward":
            out.append(f"| lookup {r['tables']}x{r['rows'] // 1000}k x{r['dim']}, B {r['batch']} x {r['ids_per_bag']} "
                       f"| {r['ids']} | {r['dtype']} | {_variant(r)} | {r['ratio']:.2f}x "
                       f"| {r['ms']:.1f} | {r['baseline_ms']:.1f} | {r['gbs']:.1f} | {_pct(r)} | {_ceiling(r)} |")
        elif r["kind"] == "dlrm":
            out.append(f"| DLRM train step, {r['data']}, batch {r['batch']} | real | fp32 | fused | {r['ratio']:.2f}x "
                       f"| {r['ms']:.2f} | {r['baseline_ms']:.2f} | | | |")
        else:
            out.append(f"| train step {r['rows'] // 1000}k x{r['dim']}, B {r['batch']} x {r['ids_per_bag']}: "
                       f"{r['optimizer']} vs {r['baseline']} | uniform | fp32 | fused | {r['ratio']:.2f}x | {r['ms']:.1f} "
                       f"| {r['baseline_ms']:.1f} | | {_pct(r)} | {_ceiling(r)} |")
    return "\n".join(out)


def run(args) -> Path:
    """Entry point of ``sparsewise bench embedding``."""
    from tqdm.auto import tqdm

    from .._util import atomic_write_text, threads
    from ..advisor.probe import cached_probe

    quick = bool(getattr(args, "quick", False))
    with threads(args.threads):
        if quick:
            fwd = forward_rows(T=2, B=4096, dists=("uniform", "zipf1.15"), variants=("kernel", "auto"), pairs=3,
                               progress=lambda total: tqdm(total=total, desc="bench embedding forward"))
            trn = training_rows(pairs=3, progress=lambda total: tqdm(total=total, desc="bench embedding train"))
        else:
            fwd = forward_rows(progress=lambda total: tqdm(total=total, desc="bench embedding forward"))
            trn = training_rows(progress=lambda total: tqdm(total=total, desc="bench embedding train"))
        trn += dlrm_rows(pairs=3 if quick else 7)
    rows = fwd + trn
    table = format_table(rows)
    out = Path(args.out)
    path = write_results(out / "embedding.json", "embedding", rows, machine=cached_probe(),
                         extra={"baselines": "nn.EmbeddingBag per table (forward); nn.EmbeddingBag(sparse=True) + "
                                             "torch.optim.Adagrad and FBGEMM TBE when installed (training)",
                                "data": "random normal table values, synthetic uniform / Zipf ids", "quick": quick})
    atomic_write_text(out / "embedding.md", table + "\n")
    print(table)
    return path
