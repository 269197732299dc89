"""``sparsewise bench moe``: MoE blocks vs transformers' own blocks with the same weights.

Workloads (synthetic random-normal weights in these shapes; speed does not depend on values):
- "mixtral (scaled)": D=1024, H=2816, E=8, k=2, softmax top-k renormalised; baseline
  ``MixtralSparseMoeBlock``.
- "deepseek (fine-grained)": D=1024, H=512, E=64, k=6, 2 shared experts; baseline
  ``Qwen2MoeSparseMoeBlock`` (the transformers block with routed + shared experts) with
  ``shared_expert_intermediate_size`` = 2 x 512 (two shared experts of width 512 are one of
  width 1024) and its sigmoid shared-expert gate, softmax top-6 routing.

Per (workload, dtype, tokens), interleaved with :func:`sparsewise.bench.compare` in one process:
ours with dense experts (plain, the default; and with oneDNN-prepacked weight copies for the
GEMMs, ``set_prepack``: 2x weight memory) and with 2:4 experts against the fastest of transformers' experts implementations ("eager", "grouped_mm": measured against each other first), and, for
decode, against computing every expert densely on every token. Decode rows also give the bytes
of the experts actually used / time as % of the probed read bandwidth, and our time against a
plain parallel read of exactly those bytes timed beside it (:func:`same_bytes_reader`: the
limit memory sets for the cell as the host runs then); prefill rows give
FLOP/s as % of the probed GEMM peak of that dtype, and capacity mode (factor 1.25, dropped
fraction) against dropless. Every weight set exceeds the 32 MB L3.
"""
from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

from ..bench import compare, write_results
from .layer import MoE

__all__ = ["WORKLOADS", "TOKENS", "measure", "run", "format_table", "hf_block"]

WORKLOADS = {
    "mixtral (scaled)": dict(kind="mixtral", d=1024, h=2816, e=8, k=2, shared=0),
    "deepseek (fine-grained)": dict(kind="qwen2_moe", d=1024, h=512, e=64, k=6, shared=2),
}
TOKENS = (1, 16, 128, 2048)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DECODE_MAX = 16
CAPACITY_FACTOR = 1.25


def hf_block(w: dict, dtype: torch.dtype, seed: int = 0):
    """transformers' block for a workload, filled with real random values (no zero pages)."""
    from .layer import hf_available

    if not hf_available():
        raise NotImplementedError("the MoE benchmark compares against transformers: pip install 'sparsewise[hf]'")
    if w["kind"] == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=w["d"], intermediate_size=w["h"], num_local_experts=w["e"],
                            num_experts_per_tok=w["k"])
        cls = MixtralSparseMoeBlock
    else:
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        cfg = Qwen2MoeConfig(hidden_size=w["d"], moe_intermediate_size=w["h"], num_experts=w["e"],
                             num_experts_per_tok=w["k"], shared_expert_intermediate_size=w["shared"] * w["h"],
                             norm_topk_prob=True)
        cls = Qwen2MoeSparseMoeBlock
    cfg._experts_implementation = "eager"
    block = cls(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return block.to(dtype)


def _all_dense(moe: MoE):
    # the "no routing sparsity" baseline: every expert on every token, weighted by the router
    gu, dn = moe.experts.gate_up, moe.experts.down

    def fn(x):
        x2 = x.reshape(-1, x.shape[-1])
        plan = moe.router(x2)
        w = torch.zeros(x2.shape[0], moe.config.num_experts, dtype=x2.dtype)
        w.scatter_(1, plan.expert_ids, plan.weights.to(x2.dtype))
        h = torch.einsum("td,erd->etr", x2, gu)
        g, u = h.chunk(2, dim=-1)
        y = torch.einsum("eth,edh->etd", torch.nn.functional.silu(g) * u, dn)
        out = torch.einsum("etd,te->td", y, w)
        if moe.shared is not None:
            from .experts import uniform_plan

            out = out + torch.sigmoid(moe.shared_gate(x2)) * moe.shared(x2, uniform_plan(x2.shape[0], x2.device))
        return out
    return fn


def _cycle(pool):
    it = itertools.cycle(pool)
    return lambda: next(it)


def _set_impl(block, impl):
    block.experts.config._experts_implementation = impl


# a cell that could not run on this CPU: NaN ratios and times
_NO_RESULT = SimpleNamespace(ratio=float("nan"), ratio_min=float("nan"), ratio_max=float("nan"),
                             candidate_s=float("nan"), baseline_s=float("nan"))


def measure(workloads=None, tokens=TOKENS, dtypes=("fp32", "bf16"), *, pairs: int = 5, all_dense_max: int = DECODE_MAX,
            progress=None) -> list[dict]:
    """Measure every (workload, dtype, tokens); return one row each (ratios > 1: ours faster)."""
    from ..advisor.probe import ReadMeter, cached_probe

    probe = cached_probe()
    meter = ReadMeter()  # the read bandwidth of each cell, measured around its timings
    workloads = workloads or WORKLOADS
    rows = []
    todo = [(n, dt, t) for n in workloads for dt in dtypes for t in tokens]
    bar = progress(total=len(todo)) if progress else None
    gen = torch.Generator().manual_seed(1)
    for name, dt in itertools.product(workloads, dtypes):
        w, dtype = workloads[name], DTYPES[dt]
        block = hf_block(w, dtype)
        dense, sparse = MoE.from_hf(block), MoE.from_hf(block, "2:4")
        # + oneDNN-blocked weight copies (2x memory); bf16 ones need AVX-512 BW/VL/DQ or
        # AVX-NE-CONVERT: elsewhere the prepacked cells are NaN
        from .experts import bf16_prepack_supported

        can_prepack = dtype != torch.bfloat16 or bf16_prepack_supported()
        prepacked = MoE.from_hf(block).set_prepack() if can_prepack else None
        capped = MoE.from_hf(block)  # Switch/GShard capacity mode, for comparison with dropless
        capped.config = replace(capped.config, capacity_factor=CAPACITY_FACTOR)
        all_dense = _all_dense(dense)
        shared_bytes = (0 if dense.shared is None else dense.shared.weight_bytes()) + \
            dense.router.weight.numel() * dense.router.weight.element_size()
        shared_sparse = (0 if sparse.shared is None else sparse.shared.weight_bytes()) + \
            dense.router.weight.numel() * dense.router.weight.element_size()
        peak = probe["gemm"]["fp32_gflops" if dt == "fp32" else "bf16_gflops"]
        for t in tokens:
            if bar:
                bar.set_postfix_str(f"{name.split(' (')[0]} {dt} T{t}")
            pool = [torch.randn(1, t, w["d"], generator=gen).to(dtype) for _ in range(3)]
            xa, xb = _cycle(pool), _cycle(pool)
            bw = meter.gbs()
            with torch.inference_mode():
                # transformers' fastest experts implementation on this machine, for this call
                _set_impl(block, "grouped_mm")
                try:
                    block(pool[0])
                    grouped_ok = True
                except Exception:  # an implementation this CPU/torch cannot run does not compete
                    grouped_ok = False
                impl = "eager"
                if grouped_ok:
                    blk2 = block
                    r_impl = compare(lambda: (_set_impl(blk2, "grouped_mm"), blk2(xa())),
                                     lambda: (_set_impl(blk2, "eager"), blk2(xb())), pairs=3, min_time=0.01)
                    impl = "grouped_mm" if r_impl.ratio > 1 else "eager"
                _set_impl(block, impl)
                rd = compare(lambda: dense(xa()), lambda: block(xb()), pairs=pairs, name=f"dense {name} {dt} T{t}")
                used_d = _used_bytes(dense, pool) + shared_bytes
                rp = compare(lambda: prepacked(xa()), lambda: block(xb()), pairs=pairs,
                             name=f"dense+prepack {name} {dt} T{t}") if prepacked is not None else _NO_RESULT
                rs = compare(lambda: sparse(xa()), lambda: block(xb()), pairs=pairs, name=f"2:4 {name} {dt} T{t}")
                used_s = _used_bytes(sparse, pool) + shared_sparse
                rc = None
                if t > DECODE_MAX:
                    rc = compare(lambda: capped(xa()), lambda: dense(xb()), pairs=pairs,
                                 name=f"capacity {CAPACITY_FACTOR} vs dropless {name} {dt} T{t}")
                    dropped = sum((capped(x), capped.last_plan.dropped_fraction)[1] for x in pool) / len(pool)
                rr_d = rr_s = None
                if t <= DECODE_MAX:  # the cell's own bandwidth limit: a plain read of the same bytes
                    rr_d = compare(lambda: dense(xa()), same_bytes_reader(dense, pool), pairs=pairs,
                                   name=f"dense vs a read of its bytes {name} {dt} T{t}")
                    rr_s = compare(lambda: sparse(xa()), same_bytes_reader(sparse, pool), pairs=pairs,
                                   name=f"2:4 vs a read of its bytes {name} {dt} T{t}")
                ra = None
                if t <= all_dense_max:
                    ra = compare(lambda: dense(xa()), lambda: all_dense(xb()), pairs=pairs,
                                 name=f"dense vs all-experts {name} {dt} T{t}")
            bw = max(bw, meter.gbs())  # a limit is the best the machine sustained meanwhile
            flops = 2 * t * (w["k"] * 3 * w["d"] * w["h"] + 3 * w["d"] * w["h"] * w["shared"])
            row = {
                "workload": name, "d_model": w["d"], "d_ff": w["h"], "experts": w["e"], "top_k": w["k"],
                "shared_experts": w["shared"], "baseline_block": type(block).__name__, "hf_experts_impl": impl,
                "dtype": dt, "tokens": t, "phase": "decode" if t <= DECODE_MAX else "prefill",
                "dense_ratio": rd.ratio, "dense_ratio_min": rd.ratio_min, "dense_ratio_max": rd.ratio_max,
                "prepacked_ratio": rp.ratio, "prepacked_ratio_min": rp.ratio_min,
                "prepacked_ratio_max": rp.ratio_max, "ours_prepacked_ms": rp.candidate_s * 1e3,
                "prepacked_pct_read_bw": 100.0 * used_d / rp.candidate_s / 1e9 / bw,
                "prepacked_pct_gemm_peak": 100.0 * flops / rp.candidate_s / 1e9 / peak,
                "sparse24_ratio": rs.ratio, "sparse24_ratio_min": rs.ratio_min, "sparse24_ratio_max": rs.ratio_max,
                "ours_dense_ms": rd.candidate_s * 1e3, "ours_24_ms": rs.candidate_s * 1e3,
                "hf_ms": rd.baseline_s * 1e3,
                "vs_all_experts_ratio": None if ra is None else ra.ratio,
                "capacity_factor": CAPACITY_FACTOR if rc else None,
                "capacity_vs_dropless_ratio": rc.ratio if rc else None,
                "capacity_dropped_fraction": dropped if rc else None,
                "used_bytes_dense": used_d, "used_bytes_24": used_s,
                "dense_pct_read_bw": 100.0 * used_d / rd.candidate_s / 1e9 / bw,
                "sparse24_pct_read_bw": 100.0 * used_s / rs.candidate_s / 1e9 / bw,
                "dense_pct_gemm_peak": 100.0 * flops / rd.candidate_s / 1e9 / peak,
                "hf_pct_gemm_peak": 100.0 * flops / rd.baseline_s / 1e9 / peak,
                "dense_pct_same_read": None if rr_d is None else 100.0 * rr_d.ratio,
                "sparse24_pct_same_read": None if rr_s is None else 100.0 * rr_s.ratio,
                "same_read_gbs_dense": None if rr_d is None else used_d / rr_d.baseline_s / 1e9,
                "same_read_gbs_24": None if rr_s is None else used_s / rr_s.baseline_s / 1e9,
                "read_gbs": bw, "pairs": rd.pairs, "threads": rd.threads,
            }
            rows.append(row)
            if bar:
                bar.update(1)
        del block, dense, sparse, all_dense, capped, prepacked
    if bar:
        bar.close()
    return rows


def _used_bytes(moe: MoE, pool) -> float:
    # bytes of the routed experts each input actually reaches, averaged over the pool
    total = 0
    for x in pool:
        moe(x)
        total += moe.experts.weight_bytes(moe.last_plan.used_experts())
    return total / len(pool)


def _bytes_of(t: torch.Tensor):
    return t.detach().view(-1).view(torch.uint8).numpy()  # in place (view raises on a non-contiguous tensor)


def _expert_parts(experts, used) -> list:
    # (array, byte ranges) of the stacked weights of the `used` experts, in the kernels' order:
    # every used expert's first matrix, then their second ones
    if experts.packed is None:
        stacks = (experts.gate_up, experts.down)
    else:
        stacks = (experts.gate_up_values, experts.gate_up_indices, experts.down_values, experts.down_indices)
    parts = []
    for st in stacks:
        per = st[0].numel() * st.element_size()
        parts.append((_bytes_of(st), [(e * per, (e + 1) * per) for e in used]))
    return parts


def same_bytes_reader(moe: MoE, pool):
    """A plain parallel read of exactly the weights ``moe`` reaches for each input of ``pool``
    (router, the used experts' matrices, shared experts and their gate), cycling over the pool as
    the timed inputs do: timed beside the block, its time is the limit memory sets for that cell
    right now, with the same cache state (a reused expert's bytes partly in L3) and the host's
    read rate of the moment (which swings ~1.7x on this host between minutes)."""
    from ..advisor.probe import slice_reader

    readers = []
    for x in pool:
        moe(x)
        parts = [(_bytes_of(moe.router.weight), [(0, moe.router.weight.numel() * moe.router.weight.element_size())])]
        parts += _expert_parts(moe.experts, moe.last_plan.used_experts())
        if moe.shared is not None:
            parts += _expert_parts(moe.shared, range(moe.shared.num_experts))
        if moe.shared_gate is not None:
            gw = moe.shared_gate.weight
            parts.append((_bytes_of(gw), [(0, gw.numel() * gw.element_size())]))
        readers.append(slice_reader(parts))
    it = itertools.cycle(readers)
    return lambda: next(it)()


TABLE_HEADER = ("workload", "dtype", "tokens", "HF impl", "dense vs HF", "dense+prepack vs HF", "2:4 vs HF",
                "dense vs all experts", "ours dense ms", "HF ms", "% read BW (dense / +prepack / 2:4)",
                "% of a read of the same bytes (dense / 2:4)", "% GEMM peak (dense / +prepack / HF)",
                "capacity 1.25 vs dropless (dropped)")


def table_rows(rows: list[dict]) -> list[tuple[str, ...]]:
    out = []
    for r in rows:
        decode = r["phase"] == "decode"
        out.append((r["workload"], r["dtype"], str(r["tokens"]), r["hf_experts_impl"],
                    f"{r['dense_ratio']:.2f}x", f"{r['prepacked_ratio']:.2f}x", f"{r['sparse24_ratio']:.2f}x",
                    "-" if r["vs_all_experts_ratio"] is None else f"{r['vs_all_experts_ratio']:.2f}x",
                    f"{r['ours_dense_ms']:.2f}", f"{r['hf_ms']:.2f}",
                    f"{r['dense_pct_read_bw']:.0f}% / {r['prepacked_pct_read_bw']:.0f}% / "
                    f"{r['sparse24_pct_read_bw']:.0f}%" if decode else "-",
                    f"{r['dense_pct_same_read']:.0f}% / {r['sparse24_pct_same_read']:.0f}%"
                    if r.get("dense_pct_same_read") is not None else "-",
                    "-" if decode else f"{r['dense_pct_gemm_peak']:.0f}% / {r['prepacked_pct_gemm_peak']:.0f}% / "
                    f"{r['hf_pct_gemm_peak']:.0f}%",
                    "-" if r.get("capacity_vs_dropless_ratio") is None else
                    f"{r['capacity_vs_dropless_ratio']:.2f}x ({100 * r['capacity_dropped_fraction']:.1f}%)"))
    return out


def format_table(rows: list[dict]) -> str:
    """Markdown table of measured rows (ratios > 1: faster than the baseline)."""
    out = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * 4 + "---:|" * 10]
    out += ["| " + " | ".join(c) + " |" for c in table_rows(rows)]
    return "\n".join(out)


def run(args) -> Path:
    """Entry point of ``sparsewise bench moe``."""
    from tqdm.auto import tqdm

    from .._util import atomic_write_text, threads
    from ..advisor.probe import cached_probe

    with threads(args.threads):
        rows = measure(pairs=3 if args.quick else 7, progress=lambda total: tqdm(total=total, desc="bench moe"))
        table = format_table(rows)
        out = Path(args.out)
        path = write_results(out / "moe.json", "moe", rows, machine=cached_probe(), extra={
            "baseline": "transformers MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock, same weights, dtype and "
                        "threads, fastest of its experts implementations (eager, grouped_mm) per row",
            "weights": "random normal values in the workload shapes (synthetic values)",
            "quick": bool(args.quick)})
        atomic_write_text(out / "moe.md", table + "\n")
    print(table)
    return path
