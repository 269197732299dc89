"""One command for the whole workflow on a causal LM: load, measure, prune, (fine-tune), measure,
save packed, reload and check. ``sparsewise prune`` calls :func:`prune_lm`.

The quality table has one row per stage (dense, pruned, fine-tuned) with the perplexity over the
same evaluation tokens, its ratio to the dense one, and the time each stage took. It is written as
``quality.json`` and ``quality.md`` beside the pruned model.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._util import atomic_write_json, atomic_write_text
from .evaluate import perplexity
from .finetune import FinetuneConfig, finetune_causal_lm
from .lm import calibration_windows, check_out_dir, load_causal_lm, load_pruned, read_text, save_pruned, token_ids
from .mask import check_nm
from .prune import METHODS, prune_

__all__ = ["PruneLMConfig", "prune_lm", "parse_pattern", "quality_markdown"]


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4), with the N:M rules of :func:`check_nm` (0 < N < M <= 16)."""
    try:
        n_s, m_s = str(pattern).split(":")
        n, m = int(n_s), int(m_s)
    except ValueError:
        raise ValueError(f"pattern must look like N:M (e.g. 2:4), got {pattern!r}") from None
    return check_nm(n, m)


@dataclass
class PruneLMConfig:
    method: str = "sparsegpt"
    pattern: str = "2:4"
    nsamples: int | None = None  # calibration windows; None: every window of the calibration text
    seqlen: int = 256  # tokens per calibration / training window
    eval_tokens: int = 16384
    window: int = 512  # perplexity window and stride
    stride: int = 256
    finetune_minutes: float = 0.0
    finetune_lr: float = 5e-5
    finetune_batch: int = 4
    distill_alpha: float = 0.5
    dtype: str = "fp32"
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        n, m = parse_pattern(self.pattern)
        for name in ("nsamples", "seqlen", "eval_tokens", "window", "stride", "finetune_batch"):
            v = getattr(self, name)
            if name == "nsamples" and v is None:
                continue
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not self.finetune_minutes >= 0:
            raise ValueError(f"finetune_minutes must be >= 0, got {self.finetune_minutes!r}")
        if self.finetune_minutes > 0:  # the fine-tuning settings are checked before any pruning
            FinetuneConfig(n=n, m=m, lr=self.finetune_lr, distill_alpha=self.distill_alpha,
                           max_minutes=self.finetune_minutes)
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be fp32, bf16 or fp16, got {self.dtype!r}")


@dataclass
class QualityRow:
    stage: str
    perplexity: float
    ratio_to_dense: float
    seconds: float
    note: str = ""


@dataclass
class PruneLMResult:
    model: str
    method: str
    pattern: str
    eval_tokens: int
    calib_tokens: int
    rows: list[QualityRow] = field(default_factory=list)
    out: str = ""
    reload_max_abs_diff: float | None = None
    finetune_steps: int = 0
    config: dict = field(default_factory=dict)


def quality_markdown(res: PruneLMResult) -> str:
    lines = [f"# {Path(res.model).name}: {res.method} {res.pattern}", "",
             f"Perplexity over {res.eval_tokens:,} evaluation tokens (window {res.config.get('window')}, "
             f"stride {res.config.get('stride')}); calibration: {res.config.get('calibration_windows')} windows of "
             f"{res.config.get('seqlen')} tokens.", "",
             "| stage | perplexity | x dense | seconds | note |", "|---|---:|---:|---:|---|"]
    for r in res.rows:
        lines.append(f"| {r.stage} | {r.perplexity:.2f} | {r.ratio_to_dense:.2f} | {r.seconds:.0f} | {r.note} |")
    if res.reload_max_abs_diff is not None:
        lines += ["", f"Reloaded from `{res.out}` (SparseLinear layers): max |logit difference| "
                      f"{res.reload_max_abs_diff:.2e} against the pruned model in memory."]
    return "\n".join(lines) + "\n"


def prune_lm(model_path: str, calib: str, eval_text: str, out: str | None, config: PruneLMConfig = PruneLMConfig(),
             *, train: str | None = None, progress: bool = True, log=print) -> PruneLMResult:
    """Prune a causal LM (transformers folder or GGUF) and measure it. See the module docstring."""
    n, m = parse_pattern(config.pattern)
    for what, path in (("calibration", calib), ("evaluation", eval_text), ("training", train)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{what} file {path}: no such file")
    if out is not None:
        check_out_dir(out)  # refused before minutes of work, not after
    t = time.perf_counter()
    model, tok = load_causal_lm(model_path, dtype=config.dtype)
    log(f"loaded {type(model).__name__} from {model_path} in {time.perf_counter() - t:.0f} s "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters, {config.dtype})")
    ev = token_ids(tok, read_text(eval_text), max_tokens=config.eval_tokens)
    if ev.numel() < config.window:
        raise ValueError(f"the evaluation text has {ev.numel()} tokens, shorter than one window ({config.window})")
    cal_ids = token_ids(tok, read_text(calib))
    windows = calibration_windows(cal_ids, config.nsamples, config.seqlen, seed=config.seed)
    res = PruneLMResult(model=str(model_path), method=config.method, pattern=f"{n}:{m}", eval_tokens=int(ev.numel()),
                        calib_tokens=int(cal_ids.numel()), config={**asdict(config), "calibration_windows": len(windows)})

    def ppl() -> float:
        return perplexity(model, ev, window=config.window, stride=config.stride, progress=progress)

    t = time.perf_counter()
    dense = ppl()
    res.rows.append(QualityRow("dense", dense, 1.0, time.perf_counter() - t))
    log(f"dense perplexity {dense:.2f}")
    teacher = copy.deepcopy(model) if config.finetune_minutes > 0 and config.distill_alpha > 0 else None
    t = time.perf_counter()
    report = prune_(model, config.method, n, m, calibration=windows, progress=progress)
    took = time.perf_counter() - t
    t = time.perf_counter()
    pruned = ppl()
    res.rows.append(QualityRow(f"{config.method} {n}:{m}", pruned, pruned / dense, took,
                               f"{len(report.pruned)} layers pruned, {len(report.skipped)} kept dense"))
    log(f"{config.method} {n}:{m}: perplexity {pruned:.2f} ({pruned / dense:.2f}x dense), pruned in {took:.0f} s")
    if config.finetune_minutes > 0:
        train_ids = token_ids(tok, read_text(train)) if train else cal_ids
        per_epoch = max(1, train_ids.numel() // config.seqlen)
        wins = calibration_windows(train_ids, per_epoch, config.seqlen, seed=config.seed + 1)
        batches = [torch.cat(wins[i:i + config.finetune_batch]) for i in range(0, len(wins), config.finetune_batch)]
        fcfg = FinetuneConfig(mode="masked", n=n, m=m, lr=config.finetune_lr, distill_alpha=config.distill_alpha,
                              max_minutes=config.finetune_minutes, epochs=1000)
        fr = finetune_causal_lm(model, batches, fcfg, teacher=teacher, progress=progress)
        res.finetune_steps = fr.steps
        tuned = ppl()
        res.rows.append(QualityRow(f"{config.method} {n}:{m} + fine-tune", tuned, tuned / dense, fr.seconds,
                                   f"masked, distill {config.distill_alpha}, {fr.steps} steps of "
                                   f"{config.finetune_batch}x{config.seqlen} tokens, lr {config.finetune_lr:g}"
                                   f"{'' if train else ', on the calibration text'}"))
        log(f"after {fr.steps} fine-tuning steps ({fr.seconds / 60:.1f} min): perplexity {tuned:.2f} "
            f"({tuned / dense:.2f}x dense)")
        del teacher
    if out is not None:
        probe_ids = ev[: min(64, ev.numel())].unsqueeze(0)
        with torch.no_grad():
            before = model(probe_ids).logits
        res.out = str(out)
        save_pruned(model, tok, out, n=n, m=m, info={"quality": [asdict(r) for r in res.rows],
                                                     "source": str(model_path)})
        again, _ = load_pruned(out)
        with torch.no_grad():
            after = again(probe_ids).logits
        res.reload_max_abs_diff = float((after.float() - before.float()).abs().max())
        atomic_write_json(Path(out) / "quality.json", asdict(res))
        atomic_write_text(Path(out) / "quality.md", quality_markdown(res))
        log(f"pruned model written to {out} (reloads as SparseLinear; max |logit diff| {res.reload_max_abs_diff:.1e})")
    return res
