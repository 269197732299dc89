"""sparsewise.nm.finetune: masked fine-tuning, SR-STE, distillation, checkpoints.

Every model here is a tiny MLP (or a one-layer Llama) built in the test, trained for a few dozen
full-size steps on a synthetic, learnable classification task: the whole file runs in seconds on
a CPU.
"""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from sparsewise.nm import NMConfig, SparseLinear, is_nm, nm_mask, prune_, sparsify_
from sparsewise.nm.finetune import (SRSTE, FinetuneConfig, FinetuneResult, finetune, finetune_causal_lm,
                                    finetune_classifier, load_checkpoint, save_checkpoint)


# ---------------------------------------------------------------- helpers

def make_task(n: int = 128, k: int = 8, classes: int = 4, seed: int = 0):
    """Labels given by a fixed random linear map of the inputs: a small MLP can learn it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    y = (x @ torch.randn(k, classes, generator=g)).argmax(-1)
    return x, y


def batches(x, y, bs: int = 32):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, x.shape[0], bs)]


def mlp(seed: int = 0, k: int = 8, h: int = 16, classes: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, classes))


def pruned_mlp(seed: int = 0) -> nn.Sequential:
    model = mlp(seed)
    prune_(model, "magnitude", 2, 4, progress=False)
    return model


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}


def zero_patterns(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: lin.weight.detach() == 0 for name, lin in linears(model).items()}


def ce_loss(model, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def ce_loss_fn(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), logits


# ---------------------------------------------------------------- FinetuneConfig

@pytest.mark.parametrize("kwargs, field", [
    (dict(mode="dense"), "mode"),
    (dict(mode="SRSTE"), "mode"),
    (dict(n=4, m=4), "n < m"),
    (dict(n=5, m=4), "n < m"),
    (dict(lr=0.0), "lr"),
    (dict(lr=-1e-3), "lr"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(srste_lambda=-1e-4), "srste_lambda"),
    (dict(distill_alpha=-0.01), "distill_alpha"),
    (dict(distill_alpha=1.01), "distill_alpha"),
    (dict(distill_temperature=0.0), "distill_temperature"),
    (dict(max_steps=0), "max_steps"),
    (dict(max_steps=-3), "max_steps"),
    (dict(max_minutes=0.0), "max_minutes"),
    (dict(max_minutes=-1.0), "max_minutes"),
    (dict(epochs=0), "epochs"),
])
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        FinetuneConfig(**kwargs)


def test_config_accepts_boundary_values():
    for kw in (dict(distill_alpha=0.0), dict(distill_alpha=1.0), dict(max_steps=1), dict(weight_decay=0.0),
               dict(srste_lambda=0.0), dict(epochs=1), dict(mode="srste", n=1, m=4), dict(n=4, m=8)):
        cfg = FinetuneConfig(**kw)
        for k, v in kw.items():
            assert getattr(cfg, k) == v


@pytest.mark.parametrize("field", ["weight_decay", "srste_lambda"])
def test_config_rejects_nan(field):
    with pytest.raises(ValueError, match=field):
        FinetuneConfig(**{field: float("nan")})


def test_finetune_rejects_wrong_argument_types():
    x, y = make_task(n=32)
    with pytest.raises(TypeError, match="nn.Module"):
        finetune(object(), batches(x, y), ce_loss_fn, progress=False)
    with pytest.raises(TypeError, match="FinetuneConfig"):
        finetune(pruned_mlp(), batches(x, y), ce_loss_fn, {"mode": "masked"}, progress=False)


# ---------------------------------------------------------------- masked mode

def test_masked_keeps_zero_pattern_exactly_and_learns():
    x, y = make_task()
    model = pruned_mlp()
    before = zero_patterns(model)
    weights_before = {k: v.weight.detach().clone() for k, v in linears(model).items()}
    loss_before = ce_loss(model, x, y)
    cfg = FinetuneConfig(mode="masked", lr=2e-2, weight_decay=0.1, max_steps=42, epochs=100)
    res = finetune_classifier(model, batches(x, y), cfg, progress=False)

    assert isinstance(res, FinetuneResult)
    assert res.steps == 42  # 4 batches per epoch: stopped in the middle of epoch 11, exactly at 42
    assert len(res.losses) == 42 and all(math.isfinite(v) for v in res.losses)
    assert res.layers == ["0", "2", "4"]
    assert res.seconds > 0
    for name, lin in linears(model).items():
        w = lin.weight.detach()
        assert torch.equal(w == 0, before[name]), f"{name}: zero pattern changed"
        assert is_nm(w, 2, 4)
        kept = ~before[name]
        assert not torch.equal(w[kept], weights_before[name][kept]), f"{name}: kept weights did not train"
        assert lin.weight._backward_hooks is None or len(lin.weight._backward_hooks) == 0
    assert ce_loss(model, x, y) < 0.7 * loss_before
    assert sum(res.losses[-4:]) < sum(res.losses[:4])
    assert not model.training and not any(mod.training for mod in model.modules())


def test_epochs_run_every_batch_of_every_epoch():
    x, y = make_task(n=96)
    model = pruned_mlp()
    res = finetune_classifier(model, batches(x, y), FinetuneConfig(lr=1e-3, epochs=3), progress=False)
    assert res.steps == 9 and len(res.losses) == 9


def test_masked_leaves_dense_linears_dense_and_trains_them():
    # only N:M layers are held to their pattern; a dense layer trains freely
    x, y = make_task()
    model = mlp()
    prune_(model, progress=False, filter_fn=lambda name, mod: name != "2")
    dense_w = model[2].weight.detach().clone()
    res = finetune_classifier(model, batches(x, y), FinetuneConfig(lr=1e-2, max_steps=5), progress=False)
    assert res.layers == ["0", "4"]
    assert not is_nm(model[2].weight.detach()) and not torch.equal(model[2].weight.detach(), dense_w)


def test_max_steps_stops_within_first_epoch():
    x, y = make_task()
    model = pruned_mlp()
    seen = []

    def loss_fn(mdl, batch):
        seen.append(batch)
        return ce_loss_fn(mdl, batch)

    res = finetune(model, batches(x, y, bs=8), loss_fn, FinetuneConfig(max_steps=3), progress=False)
    assert res.steps == 3 and len(seen) == 3 and len(res.losses) == 3


def test_max_minutes_stops_after_first_step():
    x, y = make_task()
    model = pruned_mlp()
    res = finetune_classifier(model, batches(x, y, bs=8), FinetuneConfig(max_minutes=1e-6, epochs=5),
                              progress=False)
    assert res.steps == 1 and len(res.losses) == 1


def test_masked_on_sparse_linear_keeps_indices_and_trains_values():
    x, y = make_task()
    model = pruned_mlp()
    sparsify_(model, NMConfig(dense_fallback=False))  # no crossover timing in tests
    sls = {n: mod for n, mod in model.named_modules() if isinstance(mod, SparseLinear)}
    assert len(sls) == 3
    idx = {n: mod.indices.clone() for n, mod in sls.items()}
    vals = {n: mod.values.detach().clone() for n, mod in sls.items()}
    loss_before = ce_loss(model, x, y)
    res = finetune_classifier(model, batches(x, y), FinetuneConfig(lr=2e-2, weight_decay=0.1, max_steps=40, epochs=10),
                              progress=False)
    assert res.steps == 40 and res.layers == []  # no nn.Linear: SparseLinear keeps the pattern itself
    for n, mod in sls.items():
        assert torch.equal(mod.indices, idx[n]), f"{n}: indices changed"
        assert not torch.equal(mod.values.detach(), vals[n]), f"{n}: values did not train"
        assert is_nm(mod.to_linear().weight.detach(), 2, 4)
    assert ce_loss(model, x, y) < 0.7 * loss_before
    assert not model.training


def test_masked_without_nm_layer_is_refused():
    x, y = make_task(n=32)
    model = mlp()  # dense random weights: no N:M layer, no SparseLinear
    w0 = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="no layer to fine-tune"):
        finetune_classifier(model, batches(x, y), progress=False)
    assert torch.equal(model[0].weight, w0)


def test_masked_with_a_frozen_pruned_layer():
    x, y = make_task()
    model = pruned_mlp()
    model[0].weight.requires_grad_(False)
    w0 = model[0].weight.detach().clone()
    pattern = zero_patterns(model)
    res = finetune_classifier(model, batches(x, y), FinetuneConfig(lr=1e-2, max_steps=3), progress=False)
    assert res.steps == 3
    assert torch.equal(model[0].weight, w0)
    assert all(torch.equal(lin.weight == 0, pattern[n]) for n, lin in linears(model).items())


# ---------------------------------------------------------------- SR-STE

def test_srste_function_forward_and_backward_by_hand():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5],
                      [1.0, -0.2, 0.3, -4.0]], requires_grad=True)
    out = SRSTE.apply(w, 2, 4, 0.5)
    assert torch.equal(out.detach(), torch.tensor([[0.0, -3.0, 2.0, 0.0],
                                                   [1.0, 0.0, 0.0, -4.0]]))
    assert torch.equal(out.detach(), w.detach() * nm_mask(w.detach().abs(), 2, 4))
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                      [-1.0, -2.0, -3.0, -4.0]])
    out.backward(g)
    # straight-through gradient everywhere + 0.5 * (1 - M) * W on the pruned positions
    expected = torch.tensor([[1.0 + 0.05, 2.0, 3.0, 4.0 + 0.25],
                             [-1.0, -2.0 - 0.1, -3.0 + 0.15, -4.0]])
    torch.testing.assert_close(w.grad, expected, rtol=0, atol=1e-7)


def test_srste_function_lambda_zero_is_pure_straight_through():
    torch.manual_seed(1)
    w = torch.randn(3, 8, requires_grad=True)
    g = torch.randn(3, 8)
    SRSTE.apply(w, 1, 4, 0.0).backward(g)
    assert torch.equal(w.grad, g)


def test_srste_leaves_nm_weights_without_parametrization_and_learns():
    x, y = make_task()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 4))
    dense_last = model[4].weight.detach().clone()
    loss_before = ce_loss(model, x, y)
    cfg = FinetuneConfig(mode="srste", lr=1e-2, srste_lambda=1e-2, max_steps=40, epochs=100)
    res = finetune_classifier(model, batches(x, y), cfg, progress=False)
    assert res.steps == 40 and res.layers == ["0", "2"]  # Linear(6, 4) cannot take 2:4
    for name, lin in linears(model).items():
        assert not parametrize.is_parametrized(lin)
        assert type(lin.weight) is nn.Parameter and lin.weight.requires_grad
        assert "weight" in lin._parameters
        if lin.in_features % 4 == 0:
            assert is_nm(lin.weight.detach(), 2, 4), name
            assert int((lin.weight == 0).sum()) >= lin.weight.numel() // 2
    assert not torch.equal(model[4].weight.detach(), dense_last)  # the odd layer trains densely
    assert not is_nm(model[4].weight.detach()[:, :4], 2, 4)
    assert ce_loss(model, x, y) < 0.7 * loss_before  # the final (pruned) model
    assert sum(res.losses[-4:]) < sum(res.losses[:4])
    assert not model.training


def test_srste_final_weights_are_the_masked_dense_weights():
    # the weights end as W * M with M the magnitude mask of the final dense weights: forward
    # output of the returned model equals what the last forward of the parametrized model gave
    x, y = make_task(n=32)
    model = mlp()
    finetune_classifier(model, batches(x, y), FinetuneConfig(mode="srste", lr=1e-2, max_steps=2), progress=False)
    for lin in linears(model).values():
        w = lin.weight.detach()
        assert torch.equal(w, w * nm_mask(w.abs(), 2, 4))


# ---------------------------------------------------------------- distillation

def test_distill_without_teacher_is_refused():
    x, y = make_task(n=32)
    with pytest.raises(ValueError, match="teacher"):
        finetune_classifier(pruned_mlp(), batches(x, y), FinetuneConfig(distill_alpha=0.5), progress=False)


def test_distillation_uses_the_kd_term_and_keeps_the_pattern():
    x, y = make_task()
    teacher = mlp()
    teacher_state = copy.deepcopy(teacher.state_dict())
    student = copy.deepcopy(teacher)
    prune_(student, progress=False)
    pattern = zero_patterns(student)
    plain = copy.deepcopy(student)
    data = batches(x, y)

    # expected first loss, by hand: (1 - a) * CE + a * T^2 * KL(teacher || student), batch mean
    a, temp = 0.5, 3.0
    with torch.no_grad():
        s, t = student(data[0][0]), teacher(data[0][0])
        p_t = F.softmax(t / temp, -1)
        kl = (p_t * (F.log_softmax(t / temp, -1) - F.log_softmax(s / temp, -1))).sum(-1).mean()
        expected0 = (1 - a) * F.cross_entropy(s, data[0][1]) + a * temp * temp * kl
    assert float(kl) > 1e-4  # pruning moved the student away from the teacher

    teacher.train()
    cfg = FinetuneConfig(lr=1e-2, distill_alpha=a, distill_temperature=temp, max_steps=8, epochs=2)
    res_kd = finetune_classifier(student, data, cfg, teacher=teacher, progress=False)
    res_plain = finetune_classifier(plain, data, FinetuneConfig(lr=1e-2, max_steps=8, epochs=2), teacher=teacher,
                                    progress=False)
    assert res_kd.losses[0] == pytest.approx(float(expected0), rel=1e-5)
    assert res_kd.losses[0] != pytest.approx(res_plain.losses[0], rel=1e-3)
    assert res_kd.steps == res_plain.steps == 8
    assert not all(torch.equal(a_, b_) for a_, b_ in zip(student.state_dict().values(), plain.state_dict().values()))
    for name, lin in linears(student).items():
        assert torch.equal(lin.weight == 0, pattern[name])
    # the teacher is only read: eval mode, weights untouched, no gradients
    assert not teacher.training
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_distill_alpha_one_matches_teacher_gives_zero_kd():
    # student == teacher (both the same pruned weights): pure KD loss is 0 on the first step
    x, y = make_task(n=32)
    student = pruned_mlp()
    teacher = copy.deepcopy(student)
    res = finetune_classifier(student, batches(x, y), FinetuneConfig(distill_alpha=1.0, max_steps=1), teacher=teacher,
                              progress=False)
    assert res.losses[0] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- non-finite loss and clean-up

def nan_after(k: int):
    calls = []

    def loss_fn(model, batch):
        loss, logits = ce_loss_fn(model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) > k else loss), logits

    return loss_fn


def test_masked_nan_loss_raises_and_removes_gradient_hooks():
    x, y = make_task()
    model = pruned_mlp()
    pattern = zero_patterns(model)
    with pytest.raises(ValueError, match="non-finite loss at step 2"):
        finetune(model, batches(x, y), nan_after(2), FinetuneConfig(lr=1e-2), progress=False)
    assert not model.training
    for name, lin in linears(model).items():
        assert torch.equal(lin.weight == 0, pattern[name])  # the two good steps kept the pattern
        assert lin.weight._backward_hooks is None or len(lin.weight._backward_hooks) == 0
    # a later manual backward is no longer masked: pruned positions get gradients again
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    for name, lin in linears(model).items():
        assert lin.weight.grad[pattern[name]].abs().sum() > 0, name


def test_srste_nan_loss_raises_and_removes_parametrization():
    x, y = make_task()
    model = mlp()
    with pytest.raises(ValueError, match="non-finite loss at step 0"):
        finetune(model, batches(x, y), nan_after(0), FinetuneConfig(mode="srste"), progress=False)
    assert not model.training
    for lin in linears(model).values():
        assert not parametrize.is_parametrized(lin)
        assert type(lin.weight) is nn.Parameter
    # the model still runs and trains normally afterwards
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    assert all(lin.weight.grad is not None for lin in linears(model).values())


def test_srste_divergence_still_removes_parametrization():
    x, y = make_task()
    model = mlp()

    def nan_grad_loss(mdl, batch):
        loss, logits = ce_loss_fn(mdl, batch)
        # finite value (0) but NaN gradient: d sqrt(z)/dz at z = 0 is inf, times 0 is NaN
        return loss + torch.sqrt((logits * 0).sum()), logits

    with pytest.raises(ValueError):
        finetune(model, batches(x, y), nan_grad_loss, FinetuneConfig(mode="srste"), progress=False)
    assert not any(parametrize.is_parametrized(lin) for lin in linears(model).values())
    assert not model.training


# ---------------------------------------------------------------- causal LM

def test_finetune_causal_lm_tiny_llama_keeps_2_4():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    rep = prune_(model, "magnitude", 2, 4, filter_fn=None, progress=False)
    assert "model.layers.0.self_attn.q_proj" in rep.pruned
    pattern = zero_patterns(model)
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 64, (2, 8), generator=g) for _ in range(5)]
    res = finetune_causal_lm(model, ids, FinetuneConfig(lr=1e-3, max_steps=3), progress=False)
    assert res.steps == 3 and len(res.losses) == 3
    assert all(math.isfinite(v) and v > 0 for v in res.losses)
    assert sorted(res.layers) == sorted(rep.pruned)
    q = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert is_nm(q, 2, 4) and not torch.equal(q, q_before)
    for name, lin in linears(model).items():
        assert torch.equal(lin.weight == 0, pattern[name]), name
    assert not model.training


# ---------------------------------------------------------------- checkpoints

def test_finetune_writes_checkpoint_that_reloads_identically(tmp_path):
    from safetensors import safe_open

    x, y = make_task()
    model = pruned_mlp()
    path = tmp_path / "sub" / "ck.safetensors"
    finetune_classifier(model, batches(x, y), FinetuneConfig(lr=1e-2, max_steps=4), checkpoint=path, progress=False)
    assert path.is_file() and path.stat().st_size > 0
    assert [p.name for p in path.parent.iterdir()] == ["ck.safetensors"]  # no temporary left behind
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata()["format"] == "sparsewise.checkpoint"
    fresh = mlp(seed=123)
    assert not torch.equal(fresh(x), model(x))
    assert load_checkpoint(fresh, path) is fresh
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_checkpoint_round_trip_with_sparse_linear(tmp_path):
    x, _ = make_task(n=16)
    model = pruned_mlp()
    sparsify_(model, NMConfig(dense_fallback=False))
    path = save_checkpoint(model, tmp_path / "sl.safetensors")
    fresh = mlp(seed=7)
    prune_(fresh, progress=False)
    sparsify_(fresh, NMConfig(dense_fallback=False))
    load_checkpoint(fresh, path)
    assert torch.equal(fresh[0].indices, model[0].indices)
    assert torch.equal(fresh(x), model(x))


def test_load_truncated_checkpoint_names_the_path(tmp_path):
    path = save_checkpoint(pruned_mlp(), tmp_path / "ck.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_checkpoint(mlp(), path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_checkpoint(mlp(), path)


def test_load_checkpoint_of_other_architecture_is_refused(tmp_path):
    path = save_checkpoint(pruned_mlp(), tmp_path / "ck.safetensors")
    wider = mlp(h=32)
    w0 = wider[0].weight.detach().clone()
    with pytest.raises(ValueError, match="does not match the model"):
        load_checkpoint(wider, path)
    assert torch.equal(wider[0].weight, w0)
    with pytest.raises(ValueError, match="does not match the model"):
        load_checkpoint(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), path)  # missing keys
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_checkpoint(mlp(k=12), path)


def test_load_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_checkpoint(mlp(), tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(mlp(), tmp_path)  # a directory is not a checkpoint


def test_failed_save_leaves_existing_checkpoint_unchanged(tmp_path, monkeypatch):
    import safetensors.torch

    path = save_checkpoint(pruned_mlp(seed=0), tmp_path / "ck.safetensors")
    good = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(good[:50])  # partial bytes, then the disk "fills up"
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    other = pruned_mlp(seed=1)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(other, path)
    x, y = make_task(n=32)
    with pytest.raises(OSError, match="No space"):
        finetune_classifier(other, batches(x, y), FinetuneConfig(max_steps=1), checkpoint=path, progress=False)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]
    monkeypatch.undo()
    restored = mlp(seed=9)
    load_checkpoint(restored, path)
    assert torch.equal(restored[0].weight, pruned_mlp(seed=0)[0].weight)
