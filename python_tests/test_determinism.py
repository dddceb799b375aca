"""A run is a function of (config, seed, thread count): trained twice at 2 intra-op threads, bitwise the same weights.

Two things made it not (issue 20, "the same run twice is not the same run"), each caught here by training twice in
one process and comparing every tensor:

* the student's caption dedup copied its text rows back by advanced indexing, whose CPU backward (``index_put_``
  with accumulation) adds with atomics over threads once the batch holds 32768 elements (B >= 86 at width 384):
  the order of the adds, and so the weights, followed thread scheduling (``step.StudentForward``);
* the default teacher's image tower was initialised from the caller's global RNG, so one recipe key trained other
  weights depending on what the process had drawn before (``models.load_model``).

The batch (128) is above that threshold: at 64 the old code was repeatable too.
"""

from __future__ import annotations

import pytest
import torch

from clipcid_fast.pipeline import models, train
from clipcid_fast.pipeline.config import DataConfig, ModelConfig, TrainConfig


@pytest.fixture
def two_threads(monkeypatch):
    """2 intra-op threads, on the CPU (a CUDA machine would otherwise train on its GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def trained_weights(cfg: TrainConfig, steps: int) -> dict[str, torch.Tensor]:
    p = train.prepare(cfg)
    for i in range(steps):
        p.step(p.batch(i))
    return {k: v.detach().clone() for k, v in p.model.state_dict().items()}


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_student_trained_twice_has_the_same_weights(tmp_path, two_threads):
    # captions repeat (10 classes x the templates): the dedup's copies are summed in the backward of every step
    cfg = TrainConfig(out_dir=str(tmp_path), recipe="baseline", steps=2, batch_size=128, warmup=0, eval_every=0,
                      progress=False, data=DataConfig(student_samples=128))  # fmt: skip
    first = trained_weights(cfg, cfg.steps)
    torch.rand(5)  # other work in between: the run must not depend on the global RNG it finds
    second = trained_weights(cfg, cfg.steps)
    bad = differing(first, second)
    assert not bad, f"{len(bad)} of {len(first)} tensors differ, e.g. {bad[:3]}"


def test_default_teacher_is_a_function_of_its_recipe(tmp_path, two_threads):
    """Trained twice (separate caches) after different draws from the global RNG: the same weights, and the caller's
    RNG left where it was."""
    recipe = dict(teacher_samples=128, teacher_epochs=1, teacher_batch_size=64)
    torch.manual_seed(1)
    a = models.load_model(ModelConfig(cache_dir=str(tmp_path / "a"), **recipe), "teacher", progress=False)
    torch.manual_seed(2)
    torch.rand(7)
    rng = torch.get_rng_state()
    b = models.load_model(ModelConfig(cache_dir=str(tmp_path / "b"), **recipe), "teacher", progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    bad = differing(a.model.state_dict(), b.model.state_dict())
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"
    assert a.fingerprint == b.fingerprint
