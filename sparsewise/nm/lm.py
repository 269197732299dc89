"""Causal LMs in the prune workflow: load one (a transformers folder or a GGUF file), read text
(plain, compressed, or a MediaWiki XML dump), cut token windows, and save / load a pruned model
whose N:M layers are stored packed and come back as :class:`SparseLinear`.

A pruned model folder holds ``config.json``, the tokenizer files, ``model.safetensors`` (packed
values and indices for the N:M layers, dense tensors for the rest) and ``sparsewise.json`` (format,
version, pattern, which layers are packed, which tensors are tied). It is written to a temporary
folder and renamed into place, so a crash never leaves half a model.

Nothing here reaches a model hub: transformers runs with ``HF_HUB_OFFLINE=1``.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import html
import json
import lzma
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from .linear import NMConfig, SparseLinear, sparsify_
from .mask import check_nm, is_nm

__all__ = ["load_causal_lm", "read_text", "wiki_plaintext", "token_ids", "calibration_windows",
           "check_out_dir", "save_pruned", "load_pruned", "generation_speed", "FORMAT", "FORMAT_VERSION"]

FORMAT = "sparsewise.pruned-lm"
FORMAT_VERSION = 1
MANIFEST = "sparsewise.json"
WEIGHTS = "model.safetensors"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


def load_causal_lm(path: str | os.PathLike, dtype="fp32"):
    """(model, tokenizer) from a transformers model folder, a GGUF file, or a folder written by
    :func:`save_pruned` (its N:M layers come back as SparseLinear). Anything else: ValueError."""
    _offline()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / MANIFEST).is_file():
            return load_pruned(p, dtype=dtype)
        if not (p / "config.json").is_file():
            raise ValueError(f"{p}: neither a transformers model folder (no config.json) nor a GGUF file")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(p, dtype=_dtype(dtype))
        tok = AutoTokenizer.from_pretrained(p)
    else:
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{p}: neither a transformers model folder nor a GGUF file (it starts with {magic!r})")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
            model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=_dtype(dtype))
        except (ValueError, OSError, KeyError, EOFError) as exc:
            raise ValueError(f"{p}: could not load this GGUF file through transformers: {exc}") from None
    model.eval()
    return model, tok


_OPENERS = {".bz2": bz2.open, ".gz": gzip.open, ".xz": lzma.open}


def read_text(path: str | os.PathLike, *, max_chars: int | None = None) -> str:
    """The text of a file: plain UTF-8, or .bz2/.gz/.xz compressed. A MediaWiki XML dump
    (``<mediawiki ...>``, like gensim's shortened enwiki test file) becomes the plain text of its
    articles (:func:`wiki_plaintext`). Truncated or corrupt archives give a ValueError."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    opener = _OPENERS.get(p.suffix.lower(), open)
    try:
        with opener(p, "rt", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except (EOFError, OSError, lzma.LZMAError) as exc:
        raise ValueError(f"{p}: could not read it (truncated or corrupted?): {exc}") from None
    if text.lstrip()[:10] == "<mediawiki":
        text = wiki_plaintext(text)
    if max_chars is not None:
        text = text[:max_chars]
    if not text.strip():
        raise ValueError(f"{p}: no text in it")
    return text


_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_TAG = re.compile(r"<[^>]+>")
_FILELINK = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]")
_LINK = re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]")
_EXTLINK = re.compile(r"\[https?://[^\s\]]+\s*([^\]]*)\]")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)


def wiki_plaintext(xml: str) -> str:
    """Article text of a MediaWiki XML dump with the markup removed (templates, tables,
    references, file and category links, bold/italics), one article after another. Redirect
    pages are dropped."""
    parts = []
    for body in re.findall(r"<text[^>]*>(.*?)</text>", xml, re.S):
        t = html.unescape(body)
        if t.lstrip().upper().startswith("#REDIRECT"):
            continue
        t = _COMMENT.sub("", t)
        t = _REF.sub("", t)
        for _ in range(8):  # nested templates, innermost first
            t, k = _TEMPLATE.subn("", t)
            if not k:
                break
        t = _TABLE.sub("", t)
        t = _FILELINK.sub("", t)
        t = _LINK.sub(r"\1", t)
        t = _EXTLINK.sub(r"\1", t)
        t = _HEADING.sub(r"\1", t)
        t = _TAG.sub("", t)
        t = t.replace("'''", "").replace("''", "")
        lines = [ln.strip() for ln in t.splitlines()]
        lines = [ln.lstrip("*#:; ").strip() for ln in lines if ln and not ln.startswith(("|", "!", "{", "}"))]
        t = "\n".join(ln for ln in lines if ln)
        if t:
            parts.append(t)
    if not parts:
        raise ValueError("no article text found in the MediaWiki XML")
    return "\n\n".join(parts)


def token_ids(tokenizer, text: str, *, max_tokens: int | None = None) -> torch.Tensor:
    """1-D LongTensor of the text's token ids (at most ``max_tokens``; long texts are cut before
    tokenizing, at about 8 characters a token, so a 6 MB file does not cost a minute)."""
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        text = text[: max_tokens * 8]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0].to(torch.int64)
    return ids[:max_tokens] if max_tokens is not None else ids


def calibration_windows(ids: torch.Tensor, nsamples: int | None, seqlen: int, *, seed: int = 0) -> list[torch.Tensor]:
    """``nsamples`` windows of ``seqlen`` tokens, each (1, seqlen), at random starts (seeded), as
    SparseGPT and Wanda calibrate. Non-overlapping when the text is long enough.
    ``nsamples=None``: every non-overlapping window of the text, in order (the whole text)."""
    if (nsamples is not None and nsamples < 1) or seqlen < 2:
        raise ValueError(f"need nsamples >= 1 (or None for all) and seqlen >= 2, got {nsamples} and {seqlen}")
    ids = ids.reshape(-1)
    if ids.numel() < seqlen:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    slots = ids.numel() // seqlen
    if nsamples is None:
        starts = [i * seqlen for i in range(slots)]
    elif slots >= nsamples:  # distinct non-overlapping windows
        starts = (torch.randperm(slots, generator=gen)[:nsamples] * seqlen).tolist()
    else:
        starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen).tolist()
    return [ids[s:s + seqlen].unsqueeze(0).clone() for s in starts]


def _tied_keys(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """key -> the earlier key whose tensor it shares (tied embeddings and heads)."""
    seen, tied = {}, {}
    for k, v in state.items():
        sig = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if sig in seen:
            tied[k] = seen[sig]
        else:
            seen[sig] = k
    return tied


def check_out_dir(out: str | os.PathLike) -> Path:
    """``out`` as a Path if a pruned model may be written there: it does not exist, is empty, or
    holds an earlier pruned model (which is replaced). Anything else: ValueError, nothing touched."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise ValueError(f"{out}: exists and is not an earlier pruned-model folder; choose another --out")
    return out


def save_pruned(model: nn.Module, tokenizer, out: str | os.PathLike, *, n: int = 2, m: int = 4,
                info: dict | None = None) -> Path:
    """Write a pruned causal LM to folder ``out``: its N:M nn.Linear layers are packed (swapped
    for SparseLinear in place, see :func:`sparsify_`), every other tensor is stored as it is.
    ``info`` (JSON-able) is kept in the manifest. Atomic: a temporary folder renamed into place.
    An existing ``out`` is replaced only if it is empty or an earlier pruned-model folder."""
    from safetensors.torch import save_file

    n, m = check_nm(n, m)
    out = check_out_dir(out)
    report = sparsify_(model, NMConfig(n=n, m=m),
                       filter_fn=lambda name, mod: is_nm(mod.weight.detach(), n, m))
    sparse = sorted(name for name, mod in model.named_modules() if isinstance(mod, SparseLinear))
    if not sparse:
        raise ValueError(f"the model has no {n}:{m} layer to pack (was it pruned?)")
    state = model.state_dict()
    tied = _tied_keys(state)
    tensors = {k: v.detach().contiguous() for k, v in state.items() if k not in tied}
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("save_pruned needs a transformers model (it has no .config)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
        dtypes = {str(v.dtype).replace("torch.", "") for v in tensors.values() if v.is_floating_point()}
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "n": n, "m": m, "sparse_layers": sparse,
                    "kept_dense": sorted(report.skipped), "tied": tied, "dtypes": sorted(dtypes),
                    "sha256": {WEIGHTS: _sha256(tmp / WEIGHTS)},
                    "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "info": info or {}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def load_pruned(path: str | os.PathLike, dtype=None):
    """(model, tokenizer) from a folder written by :func:`save_pruned`; the packed layers are
    SparseLinear. ``dtype`` ("fp32", "bf16", "fp16" or None to keep the stored one) converts the
    whole model after loading. Missing, foreign, truncated or corrupted files (the weights' SHA-256
    is kept in the manifest and checked): ValueError."""
    _offline()
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    mpath = p / MANIFEST
    if not mpath.is_file():
        raise ValueError(f"{p}: not a pruned-model folder (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{mpath}: not valid JSON (truncated or corrupted?): {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{mpath}: format version {manifest.get('version')!r}; this sparsewise reads {FORMAT_VERSION}")
    want = (manifest.get("sha256") or {}).get(WEIGHTS)  # folders written before the checksum have none
    if want is not None and (p / WEIGHTS).is_file() and _sha256(p / WEIGHTS) != want:
        raise ValueError(f"{p / WEIGHTS}: checksum does not match {MANIFEST} (truncated or corrupted?)")
    try:
        state = load_file(str(p / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{p / WEIGHTS}: not a readable safetensors file (truncated or corrupted?): {exc}") from None
    config = AutoConfig.from_pretrained(p)
    stored = next((v.dtype for k, v in state.items() if k.endswith(".values")), torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=stored)
    n, m = int(manifest["n"]), int(manifest["m"])
    for name in manifest["sparse_layers"]:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{mpath}: layer {name!r} does not exist in a {type(model).__name__}") from None
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{mpath}: {name!r} is a {type(lin).__name__}, not a Linear")
        sl = SparseLinear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          config=NMConfig(n=n, m=m), dtype=state[f"{name}.values"].dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, sl)
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - set(manifest.get("tied", {}))
    if missing or result.unexpected_keys:
        raise ValueError(f"{p / WEIGHTS} does not match its config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:5]}")
    for k, src in manifest.get("tied", {}).items():  # tied tensors point at one storage again
        mod_name, _, attr = k.rpartition(".")
        src_mod, _, src_attr = src.rpartition(".")
        setattr(model.get_submodule(mod_name), attr, getattr(model.get_submodule(src_mod), src_attr))
    if dtype is not None:
        model.to(_dtype(dtype))
    model.eval()
    tok = AutoTokenizer.from_pretrained(p) if any(p.glob("tokenizer*")) else None
    return model, tok


@torch.no_grad()
def generation_speed(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 64) -> dict:
    """Greedy batch-1 generation with the KV cache: decode tokens/s (prefill timed apart)."""
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids.unsqueeze(0)
    t0 = time.perf_counter()
    out = model(prompt_ids, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t1 = time.perf_counter()
    tokens = [nxt]
    for _ in range(new_tokens - 1):
        out = model(nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens.append(nxt)
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens_per_s": (new_tokens - 1) / (t2 - t1),
            "tokens": torch.cat(tokens, 1)[0].tolist()}
