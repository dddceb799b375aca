# ruff: noqa: F811 (test_train's module fixtures are imported by name and taken as arguments)
"""``--grad-checkpointing``: a ViT student's step keeps fewer activations for the backward and computes the same
weights, bit for bit (the recomputed forward is the same arithmetic); on the default ModifiedResNet student a line
says what open_clip cannot checkpoint. ``--torchcompile``: the compiled student keeps its ``state_dict`` keys and
computes the eager student's features within float32 rounding."""

from __future__ import annotations

import dataclasses

import torch
from test_train import _trainer_on_cpu, assets, make_cfg  # noqa: F401 (module fixtures)

from clipcid_fast.pipeline import student_switches, train
from clipcid_fast.pipeline.config import ModelConfig


def vit_student_cfg(assets, tmp_path, **kw):
    """kd with the tiny ViT config of test_train's teacher as the student (random init): both towers are
    transformers."""
    cfg = make_cfg(assets, tmp_path / "run", "kd", **kw)
    return dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, student=assets.teacher_json))


def one_step(cfg) -> tuple[dict, int]:
    """(student weights after one step, bytes autograd saved for the backward during it)."""
    p = train.prepare(cfg)
    batch = p.batch(0)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        p.step(batch)
    return {k: v.detach().clone() for k, v in p.model.state_dict().items()}, sum(saved)


def test_grad_checkpointing_keeps_less_and_computes_the_same(assets, tmp_path):
    plain, plain_bytes = one_step(vit_student_cfg(assets, tmp_path / "a"))
    ckpt, ckpt_bytes = one_step(vit_student_cfg(assets, tmp_path / "b", grad_checkpointing=True))
    assert list(plain) == list(ckpt)
    for k in plain:
        assert torch.equal(plain[k], ckpt[k]), k
    assert ckpt_bytes < 0.8 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_grad_checkpointing_on_a_resnet_student_says_what_it_cannot(assets, tmp_path, capsys):
    train.prepare(make_cfg(assets, tmp_path / "run", "baseline", grad_checkpointing=True))
    assert "the student's ModifiedResNet image tower keeps its activations" in capsys.readouterr().out


def test_torchcompile_keeps_keys_and_features(assets):
    from clipcid_fast.pipeline import models

    loaded = models.load_model(ModelConfig(student=assets.teacher_json), "student", seed=3)
    eager = loaded.model.eval()
    compiled = models.load_model(ModelConfig(student=assets.teacher_json), "student", seed=3).model.eval()
    student_switches.apply(compiled, False, True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    from torch._dynamo.utils import counters

    counters.clear()
    with torch.no_grad():
        want, got = eager.encode_image(images), compiled.encode_image(images)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured (and inductor compiled) the tower
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
