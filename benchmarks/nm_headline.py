"""Headline 2:4 figures (issue 3 targets): Llama-2-7B MLP up projection 11008x4096, batch 1/8/32,
fp32 and bf16, 15 interleaved pairs each (the full suite uses 5). Writes results/nm_headline.json.

    .venv/bin/python benchmarks/nm_headline.py
"""
from pathlib import Path

from sparsewise._util import atomic_write_text
from sparsewise.advisor.probe import cached_probe
from sparsewise.bench import write_results
from sparsewise.nm.bench import SHAPES, format_table, measure

NAME = "llama2-7b mlp up (11008x4096)"

if __name__ == "__main__":
    rows = measure({NAME: SHAPES[NAME]}, batches=(1, 8, 32), pairs=15)
    out = Path(__file__).parent / "results"
    write_results(out / "nm_headline.json", "nm_headline", rows, machine=cached_probe(),
                  extra={"baseline": "torch.nn.functional.linear / nn.Linear, same dtype and threads"})
    table = format_table(rows)
    atomic_write_text(out / "nm_headline.md", table + "\n")
    print(table)
