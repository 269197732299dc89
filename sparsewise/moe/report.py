"""The MoE section of ``sparsewise report`` (registered in ``sparsewise.advisor.report.SECTIONS``)."""
from __future__ import annotations

__all__ = ["moe_section"]


def moe_section(ctx):
    """Measure MoE decode (and, in full mode, prefill) against transformers' blocks; a Section."""
    from ..advisor.report import Section, _fig_to_img, _table
    from .bench import TABLE_HEADER, WORKLOADS, measure, table_rows
    from .layer import hf_available

    if not hf_available():
        body = "<p>transformers is not installed (<code>pip install 'sparsewise[hf]'</code>): no baseline to compare with.</p>"
        return Section("Mixture-of-Experts", body, "  skipped: transformers not installed")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if ctx.quick:
        rows = measure({"mixtral (scaled)": WORKLOADS["mixtral (scaled)"]}, tokens=(1, 16), dtypes=("fp32",), pairs=3)
    else:
        rows = measure(tokens=(1, 16, 128, 2048), dtypes=("fp32", "bf16"), pairs=5)
    ctx.data["moe"] = rows
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    labels = [f"{r['workload'].split(' (')[0]}\n{r['dtype']} T{r['tokens']}" for r in rows]
    xs = range(len(rows))
    ax.bar([i - 0.27 for i in xs], [r["dense_ratio"] for r in rows], width=0.27, color="tab:purple", label="dense experts")
    ax.bar(list(xs), [r["prepacked_ratio"] for r in rows], width=0.27, color="tab:blue",
           label="dense + prepacked copies (2x memory)")
    ax.bar([i + 0.27 for i in xs], [r["sparse24_ratio"] for r in rows], width=0.27, color="tab:green", label="2:4 experts")
    ax.axhline(1.0, color="gray", lw=1)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("speed vs transformers' block (x)")
    ax.set_title("MoE blocks on this CPU (higher is better)")
    ax.legend(fontsize=8)
    body = ("<p>sparsewise's MoE (router computed once, tokens grouped by expert, each used expert's "
            "weights read once per call; 2:4 experts in the packed N:M format) against transformers' own "
            "sparse MoE block with the same random-normal weights, dtype and threads, using the faster of its "
            "experts implementations, interleaved pairs. Decode rows also give bytes of the experts actually "
            "used / time as % of the read bandwidth measured around the same timings, and as % of the speed of a plain "
            "read of exactly those bytes timed beside the block (the cell's own limit as memory runs then).</p>" + _fig_to_img(fig)
            + _table(table_rows(rows), TABLE_HEADER))
    summary = "\n".join(
        f"  {r['workload']} {r['dtype']} {r['tokens']} tokens: dense {r['dense_ratio']:.2f}x "
        f"(+prepack {r['prepacked_ratio']:.2f}x), 2:4 "
        f"{r['sparse24_ratio']:.2f}x transformers' block" for r in rows)
    return Section("Mixture-of-Experts", body, summary)
