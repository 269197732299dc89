"""One paired A/B timing harness used by every benchmark and by the report.

Machines are shared and noisy, so a lone absolute time means little. :func:`compare` runs a
candidate and its baseline interleaved (A B, B A, A B, ...) after a warm-up and reports the
median of the per-pair ratios ``baseline_time / candidate_time`` (> 1: the candidate is faster)
with its min and max, the thread count and a machine record.

>>> from sparsewise.bench import compare
>>> r = compare(lambda: sum(range(1000)), lambda: sum(range(2000)), pairs=5)   # doctest: +SKIP
>>> r.ratio > 1                                                                  # doctest: +SKIP
True
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .._util import atomic_write_json, num_threads, threads as _threads

__all__ = ["PairedResult", "compare", "timeit", "write_results", "RESULTS_SCHEMA"]

RESULTS_SCHEMA = "sparsewise.bench/1"


@dataclass(frozen=True)
class PairedResult:
    """Outcome of one paired comparison. Times are seconds per call (medians)."""

    name: str
    ratio: float  # median over pairs of baseline_s / candidate_s; > 1 means candidate is faster
    ratio_min: float
    ratio_max: float
    candidate_s: float
    baseline_s: float
    pairs: int
    inner: int  # calls per timed sample, chosen so one sample lasts >= min_time
    threads: int
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:  # one line for terminals and logs
        return (
            f"{self.name}: {self.ratio:.2f}x (min {self.ratio_min:.2f}, max {self.ratio_max:.2f}; "
            f"{self.candidate_s * 1e3:.3f} ms vs {self.baseline_s * 1e3:.3f} ms, "
            f"{self.pairs} pairs x {self.inner}, {self.threads} threads)"
        )


def _time_block(fn: Callable[[], Any], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _check_callable(fn: Any, what: str) -> None:
    if not callable(fn):
        raise TypeError(f"{what} must be a callable taking no arguments, got {type(fn).__name__}")


def timeit(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1, min_time: float = 0.02) -> dict:
    """Time one function: median, min and max seconds per call over ``repeats`` samples.

    For machine limits (the probe), where there is no baseline to pair with. Benchmarks that
    compare two things use :func:`compare`.
    """
    _check_callable(fn, "fn")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(max(0, warmup)):
        fn()
    one = _time_block(fn, 1)
    inner = max(1, math.ceil(min_time / max(one, 1e-9)))
    samples = [_time_block(fn, inner) for _ in range(repeats)]
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "repeats": repeats, "inner": inner}


def compare(
    candidate: Callable[[], Any],
    baseline: Callable[[], Any],
    *,
    name: str = "",
    pairs: int = 7,
    warmup: int = 2,
    min_time: float = 0.02,
    threads: int | None = None,
    meta: dict | None = None,
) -> PairedResult:
    """Time ``candidate`` against ``baseline`` interleaved; return the median per-pair ratio.

    Each sample runs a function ``inner`` times back to back, with ``inner`` chosen after the
    warm-up so that a sample lasts at least ``min_time`` seconds. The order alternates
    (A B, then B A) so that neither side always runs on a cache or clock warmed by the other.
    To vary inputs between calls (so a repeated call does not measure the cache), let the
    callables cycle through a pool of inputs.
    """
    _check_callable(candidate, "candidate")
    _check_callable(baseline, "baseline")
    if not isinstance(pairs, int) or pairs < 1:
        raise ValueError(f"pairs must be a positive integer, got {pairs!r}")
    if min_time <= 0:
        raise ValueError(f"min_time must be > 0, got {min_time!r}")
    with _threads(threads) as nthreads:
        for _ in range(max(0, warmup)):
            candidate()
            baseline()
        slowest = max(_time_block(candidate, 1), _time_block(baseline, 1))
        inner = max(1, math.ceil(min_time / max(slowest, 1e-9)))
        ratios, tc, tb = [], [], []
        for p in range(pairs):
            if p % 2 == 0:
                a = _time_block(candidate, inner)
                b = _time_block(baseline, inner)
            else:
                b = _time_block(baseline, inner)
                a = _time_block(candidate, inner)
            tc.append(a)
            tb.append(b)
            ratios.append(b / max(a, 1e-12))
    return PairedResult(
        name=name,
        ratio=statistics.median(ratios),
        ratio_min=min(ratios),
        ratio_max=max(ratios),
        candidate_s=statistics.median(tc),
        baseline_s=statistics.median(tb),
        pairs=pairs,
        inner=inner,
        threads=nthreads,
        meta=dict(meta or {}),
    )


def write_results(path: str | Path, suite: str, results: Sequence[PairedResult | dict],
                  machine: dict | None = None, extra: dict | None = None) -> Path:
    """Write a benchmark suite's results as JSON (atomically) with the machine record.

    ``machine`` defaults to :func:`sparsewise.advisor.probe.machine_info` plus the cached probe
    limits, so every result file says which machine and which limits its percentages refer to.
    """
    if machine is None:
        from ..advisor.probe import cached_probe

        machine = cached_probe()
    doc = {
        "schema": RESULTS_SCHEMA,
        "suite": suite,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "threads": num_threads(),
        "machine": machine,
        "results": [r.to_dict() if isinstance(r, PairedResult) else dict(r) for r in results],
    }
    if extra:
        doc.update(extra)
    return atomic_write_json(path, doc)
