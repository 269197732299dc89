"""The floor under an embedding training step on this machine (issue 4's training targets).

A fused step on one 1M x 128 fp32 table with a batch of 4096 x 32 uniform ids must at least
(1) gather the batch's rows for the forward pass and (2) read and write back every distinct row
the batch touched (row-wise Adagrad also reads and writes one fp32 of state per row, ignored here).
This script measures both with the simplest fast code: (1) ``sparsewise.advisor.probe.gather_limit``
on the same table and id count, (2) a read-modify-write of each distinct row (sorted, as the
fused update visits them), two threads, software prefetch 0-32 rows ahead, best of each. Their sum
is the step's floor without any sorting, gradient or optimizer arithmetic; dividing the baselines'
measured step times by it bounds the ratio any implementation can reach here.

    .venv/bin/python benchmarks/embedding_floor.py [--json benchmarks/results/embedding_floor.json]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from sparsewise._util import atomic_write_json, num_threads
from sparsewise.advisor.probe import gather_limit
from sparsewise.embedding.bench import rmw_rows
from sparsewise.embedding.storage import alloc_rows

ROWS, DIM, BATCH, BAG = 1 << 20, 128, 4096, 32
DISTS = (0, 4, 8, 16, 32)


def measure(repeats: int = 5, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    table = alloc_rows(ROWS, DIM, "fp32")
    table.normal_()  # real values: untouched pages would all map the shared zero page
    tab = table.numpy()
    nnz = BATCH * BAG
    gen = np.random.default_rng(seed)
    ids = gen.integers(0, ROWS, nnz, dtype=np.int64)
    distinct = np.unique(ids)
    gl = gather_limit(tab, n_ids=nnz, repeats=repeats)
    gather_ms = nnz * DIM * 4 / (gl["gbs"] * 1e9) * 1e3
    rmw = rmw_rows()
    by_dist = {}
    for d in DISTS:
        rmw(tab, distinct, d)
        best = float("inf")
        for _ in range(repeats):
            # a fresh draw each time, so no rows are still cached from the previous repeat
            rows = np.unique(gen.integers(0, ROWS, nnz, dtype=np.int64))
            t0 = time.perf_counter()
            rmw(tab, rows, d)
            best = min(best, (time.perf_counter() - t0) * rows.size / distinct.size)
        by_dist[d] = best * 1e3
    d_best = min(by_dist, key=by_dist.get)
    rmw_ms = by_dist[d_best]
    moved = distinct.size * DIM * 4
    return {
        "workload": f"one {ROWS} x {DIM} fp32 table, batch {BATCH} x {BAG} uniform ids",
        "threads": num_threads(), "ids": nnz, "distinct_rows": int(distinct.size),
        "gather_ms": gather_ms, "gather_gbs": gl["gbs"],
        "rmw_ms": rmw_ms, "rmw_gbs_read_plus_write": 2 * moved / (rmw_ms / 1e3) / 1e9,
        "rmw_ms_by_prefetch": by_dist, "rmw_prefetch_rows": d_best,
        "floor_ms": gather_ms + rmw_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(num_threads())
    r = measure()
    print(json.dumps(r, indent=1))
    if args.json:
        atomic_write_json(args.json, r)


if __name__ == "__main__":
    main()
