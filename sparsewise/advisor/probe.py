"""Measure this machine's limits: memory read bandwidth, random row gathers, dense GEMM/GEMV.

Every benchmark and the advisor quote "% of this limit" from these numbers, so they are measured
the way the kernels run: numba kernels for streaming reads and gathers, torch (MKL / oneDNN) for
dense matrix work, all at the thread count in use.

Legend for the kernels below: N = float32 elements streamed, R = table rows, D = floats per row,
K = ids gathered.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .._util import atomic_write_json, cache_dir, num_threads, threads as _threads
from ..bench import timeit

__all__ = ["probe", "machine_info", "cached_probe", "format_probe", "gather_limit", "gather_reader", "ReadMeter", "slice_reader",
           "PROBE_SCHEMA",
           "FLAGS_OF_INTEREST", "PREFETCH_DISTS"]

PROBE_SCHEMA = "sparsewise.probe/2"  # /2: prefetched gather limits on huge pages
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                     "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
_MB = 1 << 20


# ---------------------------------------------------------------- machine description (no timing)

def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def _llc_bytes() -> int | None:
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    best = None
    for idx in sorted(base.glob("index*")):
        try:
            level = int((idx / "level").read_text())
            size = (idx / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        value = int(size.rstrip("KMG")) * mult
        if best is None or level >= best[0]:
            best = (level, value)
    return best[1] if best else None


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """What this machine is, without timing anything (cheap; used in every result file)."""
    import numba
    import torch

    model, flags = _cpuinfo()
    return {
        "cpu_model": model,
        "arch": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "threads_used": num_threads(),
        "flags": {f: (f in flags) for f in FLAGS_OF_INTEREST},
        "llc_bytes": _llc_bytes(),
        "mem_total_bytes": _mem_total(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "numba": numba.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cuda": bool(torch.cuda.is_available()),
    }


# ---------------------------------------------------------------- numba kernels

@functools.lru_cache(maxsize=None)
def _xor_rows(row_bytes: int):
    """An intrinsic ``xor_rows(ids, lo, hi, base, stride, dist) -> uint32`` for rows of
    ``row_bytes`` (>= 64, a multiple of 4; ``stride == row_bytes``): the xor of every 32-bit word
    of the rows ``ids[lo:hi]`` (row r at ``base + r * stride``), read with 64 B vector loads into
    one vector register (the last load of a row ends at its last byte, overlapping the one before
    when the row is not a multiple of 64 B), prefetching every line of the row ``dist`` ids ahead
    (words read twice cancel: the value only keeps the loads alive). The loads and prefetches of a
    row are unrolled for its size: with loops of a run-time trip count per row this reader gathered
    256 B rows at less than half the rate (Zen 5: 26 ms against 11.6 ms for 8 x 262144 random
    rows), and the embedding kernels, which unroll, beat that version by 60%. numba keeps array accumulators
    in memory; this is the register-resident loop the embedding kernels use, without their
    arithmetic."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from .._intrinsics import emit_prefetch_l2

    i32, i64 = ir.IntType(32), ir.IntType(64)
    v16i = ir.VectorType(i32, 16)
    loads = list(range(0, row_bytes - 63, 64))
    if row_bytes % 64:
        loads.append(row_bytes - 64)
    # a row starting anywhere spans its lines from base & ~63 to (base + row_bytes - 1) & ~63: the
    # addresses base + 64 k and its last byte cover them all
    pf_offsets = list(range(0, row_bytes, 64))
    if row_bytes % 64:
        pf_offsets.append(row_bytes - 1)

    @intrinsic
    def xor_rows(typingctx, ids, lo, hi, base, stride, dist):
        sig = types.uint32(ids, types.int64, types.int64, types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            ids_ = args[0]
            lo_, hi_, base_, stride_, dist_ = (context.cast(builder, v, t, types.int64)
                                               for v, t in zip(args[1:], signature.args[1:]))
            idp = context.make_array(signature.args[0])(context, builder, ids_).data
            acc = cgutils.alloca_once_value(builder, ir.Constant(v16i, [0] * 16))
            with cgutils.for_range_slice(builder, lo_, hi_, ir.Constant(i64, 1), inc=True) as (i, _):
                ip = builder.add(i, dist_)
                go = builder.and_(builder.icmp_signed(">", dist_, ir.Constant(i64, 0)), builder.icmp_signed("<", ip, hi_))
                with builder.if_then(go, likely=True):
                    rowp = builder.add(base_, builder.mul(builder.load(builder.gep(idp, [ip])), stride_))
                    for off in pf_offsets:
                        emit_prefetch_l2(builder, builder.add(rowp, ir.Constant(i64, off)))
                row = builder.add(base_, builder.mul(builder.load(builder.gep(idp, [i])), stride_))
                v = builder.load(acc)
                for off in loads:
                    ptr = builder.inttoptr(builder.add(row, ir.Constant(i64, off)), v16i.as_pointer())
                    v = builder.xor(v, builder.load(ptr, align=4))
                builder.store(v, acc)
            v = builder.load(acc)
            out = builder.extract_element(v, ir.Constant(i32, 0))
            for k in range(1, 16):
                out = builder.xor(out, builder.extract_element(v, ir.Constant(i32, k)))
            return out

        return sig, codegen

    return xor_rows


@functools.lru_cache(maxsize=None)
def _kernels():
    # compiled on first use so that importing the probe costs nothing
    import numba

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def stream_sum(a, chunks):
        # a: (N // 64, 64) float32 -> float64; reads every byte once. The 64-wide accumulator
        # lets LLVM vectorise: a scalar running sum is latency-bound at ~5 GB/s, not memory-bound.
        n = a.shape[0]
        step = (n + chunks - 1) // chunks
        part = np.zeros(chunks, np.float64)
        for c in numba.prange(chunks):
            lo = c * step
            hi = min(n, lo + step)
            acc = np.zeros(64, np.float32)
            for i in range(lo, hi):
                for j in range(64):
                    acc[j] += a[i, j]
            part[c] = acc.sum()
        return part.sum()

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def gather_sum(table, ids, chunks):
        # table: (R, D) float32, ids: (K,) int64 in [0, R) -> float64; one random row per id
        k = ids.shape[0]
        d = table.shape[1]
        step = (k + chunks - 1) // chunks
        part = np.zeros(chunks, np.float64)
        for c in numba.prange(chunks):
            lo = c * step
            hi = min(k, lo + step)
            acc = np.zeros(d, np.float32)
            for i in range(lo, hi):
                row = ids[i]
                for j in range(d):
                    acc[j] += table[row, j]
            part[c] = acc.sum()
        return part.sum()

    return stream_sum, gather_sum


@functools.lru_cache(maxsize=None)
def _segment_sum():
    import numba

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def segment_sum(a, starts, ends, workers):
        # a (N, 64) float32 -> float64; reads rows [starts[i], ends[i]) of a, the concatenation
        # cut into `workers` equal runs in order (one per thread, one parallel region). The read
        # meter keeps its own stream_sum: over a whole array this one read 1.5-5% slower (paired),
        # so a kernel's % of a slice_reader read can come out up to that much high.
        tot = 0
        for i in range(starts.shape[0]):
            tot += ends[i] - starts[i]
        part = np.zeros(workers, np.float64)
        for w in numba.prange(workers):
            lo = w * tot // workers
            hi = (w + 1) * tot // workers
            acc = np.zeros(64, np.float32)
            pos = 0
            for i in range(starts.shape[0]):
                n = ends[i] - starts[i]
                for r in range(max(lo, pos), min(hi, pos + n)):
                    row = starts[i] + r - pos
                    for j in range(64):
                        acc[j] += a[row, j]
                pos += n
            part[w] = acc.sum()
        return part.sum()

    return segment_sum


def slice_reader(parts: list[tuple[np.ndarray, list[tuple[int, int]]]], threads: int | None = None) -> Callable[[], float]:
    """A callable that reads exactly the given byte ranges, for a kernel's bandwidth limit: the
    time of a plain read of the same bytes, timed beside the kernel, is the best that memory
    gives for them now (cache state, the host's current read rate and all). ``parts``: (array,
    [(start_byte, end_byte), ...]) per array, read in that order, one parallel region per array
    cut into ``threads`` runs (default: the current count); ranges are cut to whole 256-byte rows."""
    segment_sum = _segment_sum()
    workers = num_threads(threads)
    jobs = []
    for arr, ranges in parts:
        if not arr.flags.c_contiguous:
            raise ValueError("slice_reader reads arrays in place: pass C-contiguous arrays (a copy is other memory)")
        flat = arr.reshape(-1).view(np.uint8)
        rows = flat.size // 256
        if not rows:
            continue
        base = flat[: rows * 256].view(np.float32).reshape(rows, 64)
        st = np.array([min(rows, a // 256) for a, _ in ranges], np.int64)
        en = np.array([min(rows, max(a // 256, b // 256)) for a, b in ranges], np.int64)
        jobs.append((base, st, en))

    def read() -> float:  # on the caller's thread setting (numba's), like the kernel it is timed with
        return sum(segment_sum(b, s, e, workers) for b, s, e in jobs)

    read()  # compiled (or loaded from its cache) here, not in the first timed call
    return read


@functools.lru_cache(maxsize=None)
def _gather_words(row_bytes: int):
    """``gather_words(tables, ids, chunks_per_table, dist, per_line)`` for tables of
    ``row_bytes`` rows, compiled on first use (one per row size: the whole-row reader unrolls)."""
    import numba

    from .._intrinsics import prefetch_row as _prefetch_row

    prefetch_row = _prefetch_row()

    xor_rows = _xor_rows(max(64, row_bytes))  # rows under 64 B take the loop below

    @numba.njit(parallel=True, fastmath=True, nogil=True)
    def gather_words(tables, ids, chunks_per_table, dist, per_line):
        # tables: T (R_t, W) uint32 word tables (a table's raw rows: any dtype, any row layout);
        # ids: (T * S,) int64, segment t in [0, R_t) read from table t -> int: every byte of one
        # random row per id, with a software prefetch of the row ``dist`` ids ahead (0: none), as
        # the embedding kernels gather. Rows of 64 B or more are read by xor_rows (64 B vector
        # loads in registers, as the embedding kernels load rows); per_line reads one word per
        # cache line instead (the same lines, fewer instructions). A chunk stays within one
        # table's segment.
        ntab = len(tables)
        seg = ids.shape[0] // ntab
        step = (seg + chunks_per_table - 1) // chunks_per_table
        part = np.zeros(ntab * chunks_per_table, np.uint32)
        for c in numba.prange(ntab * chunks_per_table):
            rows = tables[c // chunks_per_table]
            w = rows.shape[1]
            base = rows.ctypes.data
            stride = w * 4
            first = (c // chunks_per_table) * seg
            lo = first + (c % chunks_per_table) * step
            hi = min(first + seg, lo + step)
            if stride >= 64 and not per_line:  # stride == row_bytes: one row size per table set
                part[c] = xor_rows(ids, lo, hi, base, stride, dist)
                continue
            acc = np.uint32(0)
            for i in range(lo, hi):
                if dist > 0 and i + dist < hi:
                    prefetch_row(base + ids[i + dist] * stride, stride)
                row = ids[i]
                if per_line:
                    a = base + row * stride
                    acc ^= rows[row, 0]
                    line = (a & ~np.int64(63)) + 64
                    while line < a + stride:
                        acc ^= rows[row, (line - a) >> 2]
                        line += 64
                else:
                    for j in range(w):
                        acc ^= rows[row, j]
            part[c] = acc
        out = np.uint32(0)
        for c in range(ntab * chunks_per_table):
            out ^= part[c]
        return out

    return gather_words


PREFETCH_DISTS = (0, 8, 16, 32, 64)  # ids ahead tried by gather_limit (0: no software prefetch)


def gather_limit(rows, n_ids: int = 1 << 20, *, threads: int | None = None, repeats: int = 3,
                 dists=PREFETCH_DISTS, seed: int = 0) -> dict:
    """The fastest random row gather this machine sustains on ``rows``: a (R, row_bytes) table in
    its own memory, or a list of such tables (same row bytes) read in equal shares, as a
    multi-table lookup reads them. Pass the real storage: its page size, row size and total
    footprint (TLB reach) are part of the limit. Fetches every cache line of ``n_ids``
    uniformly random rows, ``threads`` threads, with software prefetch ``d`` ids ahead for each
    d in ``dists``, reading each row whole or one word per cache line (``per_line``: fewer
    instructions; which is faster depends on the row size); returns the best (rows/s, GB/s, the
    distance, the reading) and every distance's best GB/s. It is the best simple reader, not a
    proof (skewed ids hit in cache). Until its whole-row reading was unrolled per row size, the
    embedding kernels beat it on short rows (by 50-60% on 256 B bf16 and 136 B int8 rows). The
    probe's plain ``gather_sum`` figures are what unprefetched code gets.
    ``row_bytes`` must be a multiple of 4."""
    read, row_bytes, nrows = gather_reader(rows)
    nrows = [nrows] if isinstance(nrows, int) else nrows
    per = max(1, n_ids // len(nrows))
    gen = np.random.default_rng(seed)
    ids = np.concatenate([gen.integers(0, r, per, dtype=np.int64) for r in nrows])
    nthreads = num_threads(threads)
    by_dist, by_style = {}, {}
    with _threads(nthreads):
        for d in dists:
            for per_line in (False, True):
                tm = timeit(lambda: read(ids, d, per_line), repeats=repeats, warmup=1, min_time=0.0)
                gbs = ids.size * row_bytes / tm["min_s"] / 1e9
                if gbs > by_dist.get(int(d), 0.0):
                    by_dist[int(d)], by_style[int(d)] = gbs, per_line
    best = max(by_dist, key=by_dist.get)
    return {"gbs": by_dist[best], "rows_per_s": by_dist[best] * 1e9 / row_bytes, "prefetch_ids": best,
            "per_line": by_style[best], "row_bytes": int(row_bytes), "tables": len(nrows),
            "table_bytes": int(sum(nrows) * row_bytes), "gbs_by_prefetch": by_dist}


def gather_reader(rows) -> tuple[Callable[[np.ndarray, int], int], int, int | list[int]]:
    """``(read, row_bytes, num_rows)`` for a contiguous 2-D table, or ``(read, row_bytes,
    [num_rows per table])`` for a list of them with equal row bytes: ``read(ids, dist, per_line)``
    fetches every cache line of the rows ``ids`` (int64 numpy, trusted to be in range; with T tables, T
    equal consecutive segments, segment t holding rows of table t, as a KeyedJagged batch lays out one
    feature per table) on the current thread count, prefetching ``dist`` ids ahead, reading whole
    rows or (``per_line``) one word per cache line: the kernel of
    :func:`gather_limit`, for benchmarks that time the limit interleaved with their own kernels
    (the machine's memory speed drifts over minutes)."""
    import numba
    import torch

    many = isinstance(rows, (list, tuple))
    tabs = [torch.as_tensor(r) for r in (rows if many else [rows])]
    if not tabs:
        raise ValueError("rows must hold at least one table")
    row_bytes = None
    words = numba.typed.List()
    for t in tabs:
        if t.dim() != 2 or not t.is_contiguous():
            raise ValueError(f"rows must be a contiguous 2-D table, got shape {tuple(t.shape)}")
        rb = t.shape[1] * t.element_size()
        if rb % 4 or t.shape[0] == 0:
            raise ValueError(f"rows must be non-empty with a multiple of 4 bytes per row, got {rb}")
        if row_bytes is not None and rb != row_bytes:
            raise ValueError(f"tables must have equal row bytes, got {row_bytes} and {rb}")
        row_bytes = rb
        words.append(t.view(torch.uint8).view(torch.int32).numpy().view(np.uint32))
    gather_words = _gather_words(int(row_bytes))
    ntab = len(tabs)

    def read(ids: np.ndarray, dist: int, per_line: bool = False) -> int:
        if ids.size % ntab:
            raise ValueError(f"{ids.size} ids do not split into {ntab} equal per-table segments")
        return int(gather_words(words, ids, 16 * num_threads(None), int(dist), bool(per_line)))

    nrows = [int(t.shape[0]) for t in tabs]
    return read, int(row_bytes), (nrows if many else nrows[0])


# ---------------------------------------------------------------- measurements

def _read_bandwidth(a: np.ndarray, threads: int, repeats: int) -> float:
    # a: (N // 256, 64) float32, written before (so every page is real memory)
    stream_sum, _ = _kernels()
    chunks = 64 * max(1, threads)
    with _threads(threads):
        t = timeit(lambda: stream_sum(a, chunks), repeats=repeats, warmup=1, min_time=0.0)
    return a.nbytes / t["min_s"] / 1e9  # a limit is the best the machine sustains


class ReadMeter:
    """The memory read bandwidth now, for benchmarks: a "% of read bandwidth" compares a kernel
    with the stream read measured in the same run, seconds apart, not with the cached probe from
    hours before (on a shared host the read rate moved 28 -> 86 GB/s between such probes).

    >>> meter = ReadMeter()                          # doctest: +SKIP
    >>> meter.gbs() > 1                              # doctest: +SKIP
    True
    """

    def __init__(self, threads: int | None = None):
        llc = _llc_bytes() or 32 * _MB
        self.threads = num_threads(threads)
        self._buf = np.ones((max(256 * _MB, 8 * llc) // 256, 64), np.float32)  # written: real pages

    @property
    def nbytes(self) -> int:
        return int(self._buf.nbytes)

    def gbs(self, repeats: int = 3, threads: int | None = None) -> float:
        """Best of ``repeats`` full reads of a buffer 8x the last-level cache (at least 256 MB),
        in GB/s, on ``threads`` threads (default: the meter's)."""
        return _read_bandwidth(self._buf, threads or self.threads, repeats)


def _gather_rate(row_bytes: int, table_bytes: int, n_ids: int, threads: int, repeats: int) -> dict:
    _, gather_sum = _kernels()
    d = row_bytes // 4
    rows = table_bytes // row_bytes
    rng = np.random.default_rng(0)
    table = rng.standard_normal((rows, d), dtype=np.float32)
    ids = rng.integers(0, rows, n_ids, dtype=np.int64)
    chunks = 16 * max(1, threads)
    with _threads(threads):
        t = timeit(lambda: gather_sum(table, ids, chunks), repeats=repeats, warmup=1, min_time=0.0)
    rate = n_ids / t["min_s"]
    return {"rows_per_s": rate, "gbs": rate * row_bytes / 1e9, "table_bytes": int(table.nbytes)}


def _gemm_size(dtype, n: int, budget_s: float = 0.25) -> int:
    """The largest power-of-two size up to ``n`` whose (size)^3 matmul takes under ``budget_s``,
    extrapolated from the one below. Without native bf16 arithmetic (AVX2 CPUs) torch's bf16 mm
    ran at a few GFLOP/s, so one 2048^3 call took tens of seconds."""
    import torch

    m = 256
    while m < n:
        a = torch.randn(m, m).to(dtype)
        if timeit(lambda: torch.mm(a, a), repeats=1, warmup=1, min_time=0.0)["min_s"] * 8 > budget_s:
            break
        m *= 2
    return m


def _gemm_gflops(dtype, n: int, repeats: int) -> tuple[float, int]:
    """(GFLOP/s of an n x n matmul, n), n lowered by :func:`_gemm_size` where the dtype is slow."""
    import torch

    n = _gemm_size(dtype, n)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    t = timeit(lambda: torch.mm(a, b), repeats=repeats, warmup=1, min_time=0.05)
    return 2.0 * n ** 3 / t["min_s"] / 1e9, n


def _gemv_gbs(dtype, out_f: int, in_f: int, repeats: int) -> float:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    x = torch.randn(1, in_f, generator=g).to(dtype)
    t = timeit(lambda: F.linear(x, w), repeats=repeats, warmup=2, min_time=0.05)
    return w.numel() * w.element_size() / t["min_s"] / 1e9


def probe(*, quick: bool = False, threads: int | None = None,
          progress: Callable[[str], None] | None = None) -> dict:
    """Measure this machine and return a JSON-able dict (schema ``sparsewise.probe/2``).

    ``quick`` uses fewer repeats (same sizes: a smaller table would fit in cache and lie).

    >>> from sparsewise.advisor.probe import probe
    >>> p = probe(quick=True)                       # doctest: +SKIP
    >>> p["bandwidth"]["read_gbs_all"] > 1          # doctest: +SKIP
    True
    """
    import torch

    nthreads = num_threads(threads)
    repeats = 3 if quick else 7
    step = progress or (lambda _msg: None)
    info = machine_info()
    info["threads_used"] = nthreads
    llc = info["llc_bytes"] or 32 * _MB
    table_bytes = max(256 * _MB, 4 * llc)
    t0 = time.perf_counter()
    with _threads(nthreads):
        step("memory read bandwidth")
        meter = ReadMeter(nthreads)
        bw1 = meter.gbs(repeats, threads=1)
        bwn = meter.gbs(repeats) if nthreads > 1 else bw1
        step("random row gathers")
        g64 = _gather_rate(64, table_bytes, 1 << 22, nthreads, repeats)
        g512 = _gather_rate(512, table_bytes, 1 << 20, nthreads, repeats)
        # the limit a prefetching kernel reaches: huge-page tables, software prefetch ahead
        from ..embedding.storage import alloc_rows

        for g, rb, n_ids in ((g64, 64, 1 << 22), (g512, 512, 1 << 20)):
            table = alloc_rows(table_bytes // rb, rb // 4, "fp32")
            table.fill_(1.0)  # real pages
            g["prefetched"] = gather_limit(table, n_ids, threads=nthreads, repeats=repeats)
            del table
        # read again after the gathers and keep the best: a limit is the best the machine
        # sustains, and on a shared host a neighbour's burst can halve one reading for seconds
        # (a CI run read 15 GB/s here, then gathered 48 GB/s a few seconds later)
        bw1 = max(bw1, meter.gbs(repeats, threads=1))
        bwn = max(bwn, meter.gbs(repeats)) if nthreads > 1 else bw1
        stream_bytes = meter.nbytes
        del meter
        step("dense GEMM")
        (f32, n32), (b16, n16) = _gemm_gflops(torch.float32, 2048, repeats), _gemm_gflops(torch.bfloat16, 2048, repeats)
        gemm = {"fp32_gflops": f32, "bf16_gflops": b16, "n": n32, "bf16_n": n16}
        step("dense GEMV")
        gemv = {"fp32_gbs": _gemv_gbs(torch.float32, 11008, 4096, repeats),
                "bf16_gbs": _gemv_gbs(torch.bfloat16, 11008, 4096, repeats),
                "shape": [11008, 4096]}
    return {
        "schema": PROBE_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": quick,
        "seconds": round(time.perf_counter() - t0, 2),
        "machine": info,
        "bandwidth": {"read_gbs_1t": bw1, "read_gbs_all": bwn, "bytes": stream_bytes},
        "gather": {"row64": g64, "row512": g512},
        "gemm": gemm,
        "gemv": gemv,
    }


def _fingerprint(info: dict) -> str:
    return f"{info['cpu_model']}|{info['logical_cpus']}|{info['threads_used']}|{info['torch']}"


def cached_probe(*, max_age_s: float = 7 * 24 * 3600, threads: int | None = None) -> dict:
    """The last probe of this machine (same CPU, thread count and torch), measuring if none.

    Benchmarks call this to express their numbers as a percentage of the machine's limits.
    """
    info = machine_info()
    info["threads_used"] = num_threads(threads)
    path = cache_dir() / "probe.json"
    try:
        doc = json.loads(path.read_text())
        fresh = time.time() - path.stat().st_mtime < max_age_s
        if doc.get("schema") == PROBE_SCHEMA and fresh and _fingerprint(doc["machine"]) == _fingerprint(info):
            return doc
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or damaged cache: measure again
    doc = probe(quick=True, threads=threads)
    save_probe(doc)
    return doc


def save_probe(doc: dict, path: str | Path | None = None) -> Path:
    """Store a probe result (atomically); with no path, in the cache used by :func:`cached_probe`."""
    return atomic_write_json(path or cache_dir() / "probe.json", doc)


def format_probe(doc: dict) -> str:
    """A terminal table of a probe result."""
    m = doc["machine"]
    flags = " ".join(f for f, on in m["flags"].items() if on) or "none"
    llc = f"{m['llc_bytes'] / _MB:.0f} MB" if m.get("llc_bytes") else "unknown"
    rows = [
        ("cpu", m["cpu_model"]),
        ("logical cpus / threads used", f"{m['logical_cpus']} / {m['threads_used']}"),
        ("flags", flags),
        ("last-level cache", llc),
        ("memory read, 1 thread", f"{doc['bandwidth']['read_gbs_1t']:.1f} GB/s"),
        (f"memory read, {m['threads_used']} threads", f"{doc['bandwidth']['read_gbs_all']:.1f} GB/s"),
        ("random gather, 64 B rows",
         f"{doc['gather']['row64']['rows_per_s'] / 1e6:.0f} M rows/s ({doc['gather']['row64']['gbs']:.1f} GB/s)"),
        ("random gather, 512 B rows",
         f"{doc['gather']['row512']['rows_per_s'] / 1e6:.0f} M rows/s ({doc['gather']['row512']['gbs']:.1f} GB/s)"),
        *[(f"random gather, {rb} B rows, prefetched, huge pages",
           f"{g['rows_per_s'] / 1e6:.0f} M rows/s ({g['gbs']:.1f} GB/s, {g['prefetch_ids']} ids ahead)")
          for rb, g in ((64, doc["gather"]["row64"].get("prefetched")), (512, doc["gather"]["row512"].get("prefetched")))
          if g],
        ("GEMM fp32 / bf16 (torch)", f"{doc['gemm']['fp32_gflops']:.0f} / {doc['gemm']['bf16_gflops']:.0f} GFLOP/s"),
        ("GEMV fp32 / bf16 (torch)", f"{doc['gemv']['fp32_gbs']:.1f} / {doc['gemv']['bf16_gbs']:.1f} GB/s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
