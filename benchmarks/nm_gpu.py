"""2:4 on a CUDA GPU: torch's semi-structured sparse linear (cuSPARSELt and CUTLASS) against dense
``F.linear``, and SparseLinear's measured dispatch against ``nn.Linear``, in the same dtype.

Run on a machine with a CUDA GPU (issue 3, deliverable 6)::

    python benchmarks/nm_gpu.py --out benchmarks/results/nm_gpu.json

Shapes are the issue's (Llama-2-7B and SmolLM2-135M layers); batches 1 to 8192; float16 and
bfloat16. Every timing cycles through enough weight copies to exceed twice the GPU's L2, as the
layers of a model would, and is the median of CUDA-event timings over many calls. Ratios are
dense time / candidate time from the same process, measured interleaved.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsewise._util import atomic_write_json, atomic_write_text  # noqa: E402
from sparsewise.nm.bench import SHAPES  # noqa: E402  (the issue's layers, as on the CPU)

BATCHES = (1, 8, 32, 256, 2048, 8192)


def _event_time(fn, calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def paired(cand, base, *, pairs: int = 7, min_time: float = 0.004) -> dict:
    """Interleaved CUDA-event timings: median of per-pair base/cand ratios."""
    for _ in range(3):
        cand(), base()
    torch.cuda.synchronize()
    one = max(_event_time(base, 3), 1e-6)
    calls = max(3, int(min_time / one))
    ratios, tc, tb = [], [], []
    for i in range(pairs):
        order = (cand, base) if i % 2 == 0 else (base, cand)
        t = {}
        for f in order:
            t[f] = _event_time(f, calls)
        tc.append(t[cand]), tb.append(t[base])
        ratios.append(t[base] / t[cand])
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "candidate_s": statistics.median(tc), "baseline_s": statistics.median(tb), "calls": calls}


def rotating(weights, fn):
    """A callable cycling through weight copies (so the weights come from HBM, not L2)."""
    state = {"i": 0}

    def call():
        i = state["i"]
        state["i"] = (i + 1) % len(weights)
        return fn(weights[i])
    return call


def markdown(out: dict) -> str:
    """The results as a markdown table (one row per layer, dtype and batch)."""
    g = out["gpu"]
    lines = [f"# 2:4 on {g['name']} (torch {g['torch']}, CUDA {g['cuda']})", "",
             "Ratios are dense time / candidate time, medians of interleaved CUDA-event timings; weights cycle",
             "through copies worth 2x the L2. cuSPARSELt = `F.linear` on `to_sparse_semi_structured` vs `F.linear`",
             "on the dense weight; SparseLinear (measured dispatch) vs `nn.Linear` with the same weight;",
             "A/A = `nn.Linear` vs itself, timed the same way (the noise floor of a cell).", "",
             "| layer | dtype | batch | dense us | dense TFLOP/s | cuSPARSELt | SparseLinear | A/A | sparse from batch |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["rows"]:
        cs = r.get("cusparselt")
        dense_s = cs["baseline_s"] if cs else r["sparselinear"]["baseline_s"]
        mb = r["sparselinear"]["min_batch"]
        lines.append(f"| {r['layer']} | {r['dtype']} | {r['batch']} | {dense_s * 1e6:.1f} | {r['dense_TFLOPs']:.0f} | "
                     f"{(format(cs['ratio'], '.2f') + 'x') if cs else 'n/a'} | {r['sparselinear']['ratio']:.2f}x | "
                     f"{(format(r['same']['ratio'], '.2f') + 'x') if 'same' in r else 'n/a'} | "
                     f"{'never' if mb >= 1 << 30 else mb} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/nm_gpu.json")
    ap.add_argument("--quick", action="store_true", help="two shapes, three batches (a smoke run)")
    ap.add_argument("--markdown", metavar="JSON", help="only render an earlier run's JSON as markdown (no GPU needed)")
    args = ap.parse_args(argv)
    if args.markdown:
        out = json.loads(Path(args.markdown).read_text())
        atomic_write_text(Path(args.markdown).with_suffix(".md"), markdown(out))
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 2
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    from sparsewise.nm import SparseLinear
    from sparsewise.nm.mask import nm_mask

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
    gpu = {"name": props.name, "sm": props.multi_processor_count, "l2_bytes": l2, "torch": torch.__version__,
           "cuda": torch.version.cuda}
    print(json.dumps(gpu))
    shapes = dict(list(SHAPES.items())[0:1] + list(SHAPES.items())[3:4]) if args.quick else SHAPES
    batches = (1, 32, 2048) if args.quick else BATCHES
    rows = []
    t0 = time.perf_counter()
    for dtype in (torch.float16, torch.bfloat16):
        for label, (o, k) in shapes.items():
            gen = torch.Generator(device=dev).manual_seed(0)
            w = torch.randn(o, k, device=dev, dtype=dtype, generator=gen)
            w = w * nm_mask(w.float().abs(), 2, 4).to(dtype)
            copies = max(2, -(-2 * l2 // (w.numel() * w.element_size())))
            dense_w = [w.clone() for _ in range(copies)]
            backends = {}
            for backend, force in (("cusparselt", False), ("cutlass", True)):
                SparseSemiStructuredTensor._FORCE_CUTLASS = force
                try:
                    sw = [to_sparse_semi_structured(d) for d in dense_w]
                    F.linear(torch.randn(8, k, device=dev, dtype=dtype), sw[0])  # CUTLASS: sm_8x only
                    backends[backend] = sw
                except (RuntimeError, ValueError, NotImplementedError) as exc:
                    print(f"{label} {dtype}: {backend} unavailable: {str(exc).splitlines()[0]}")
            SparseSemiStructuredTensor._FORCE_CUTLASS = False
            # SparseLinear as a user gets it: from an nn.Linear on the GPU, dispatch measured once
            lin = nn.Linear(k, o, bias=False, device=dev, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
            sls = [SparseLinear.from_dense(lin).to(dev) for _ in range(copies)]
            lins = []
            for d in dense_w:  # the baseline SparseLinear promises to match: nn.Linear, same weights
                lins.append(nn.Linear(k, o, bias=False, device=dev, dtype=dtype))
                with torch.no_grad():
                    lins[-1].weight.copy_(d)
            for b in batches:
                x = torch.randn(b, k, device=dev, dtype=dtype, generator=gen)
                ref = F.linear(x.float(), w.float())
                base = rotating(dense_w, lambda wt: F.linear(x, wt))
                row = {"layer": label, "out": o, "in": k, "dtype": str(dtype).replace("torch.", ""), "batch": b}
                for backend, sw in backends.items():
                    y = F.linear(x, sw[0]).float()
                    err = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
                    r = paired(rotating(sw, lambda wt: F.linear(x, wt)), base)
                    row[backend] = {**r, "rel_err": err}
                with torch.no_grad():
                    y = sls[0](x).float()
                    err = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
                    r = paired(rotating(sls, lambda m: m(x)), rotating(lins, lambda m: m(x)), pairs=15)
                    # A/A: nn.Linear against itself, measured the same way: the spread this GPU host's
                    # launch timing gives to cells of a few microseconds
                    same = paired(rotating(lins, lambda m: m(x)), rotating(lins, lambda m: m(x)), pairs=15)
                row["sparselinear"] = {**r, "rel_err": err, "min_batch": sls[0]._gpu[3], "why": sls[0]._gpu[4]}
                row["same"] = same
                moved = (w.numel() + x.numel() + o * b) * w.element_size()
                dense_s = row["cusparselt"]["baseline_s"] if "cusparselt" in row else row["sparselinear"]["baseline_s"]
                row["dense_TBps"] = moved / dense_s / 1e12
                row["dense_TFLOPs"] = 2 * o * k * b / dense_s / 1e12
                rows.append(row)
                cells = " ".join(f"{n}={row[n]['ratio']:.2f}x" for n in ("cusparselt", "cutlass", "sparselinear", "same")
                                 if n in row)
                print(f"{label:28s} {row['dtype']:8s} b{b:<5d} dense {dense_s * 1e6:8.1f} us "
                      f"{cells}", flush=True)
            del dense_w, backends, sls
            torch.cuda.empty_cache()
    out = {"schema": "sparsewise.bench/1", "suite": "nm_gpu", "gpu": gpu, "rows": rows,
           "seconds": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, out)
    atomic_write_text(Path(args.out).with_suffix(".md"), markdown(out))
    worst = min(r["sparselinear"]["ratio"] for r in rows)
    same = [r["same"]["ratio"] for r in rows]
    print(f"SparseLinear vs dense, worst cell: {worst:.3f}x (A/A spread {min(same):.3f}-{max(same):.3f}x); "
          f"{len(rows)} cells in {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
