"""Loss modules: open_clip's contract, and each module equal to its reference composition."""

import pytest
import torch
import torch.nn.functional as F
from conftest import on_cuda, require

from clipcid_fast import _backend, reference
from clipcid_fast.losses import ClipKDLoss, ClipRDLoss, FusedDistillClipLoss, InstanceDiscriminationLoss
from clipcid_fast.ops import relational_rows

open_clip = pytest.importorskip("open_clip")

IMPLS = ["reference"] + (["cpu"] if _backend.has_c() and relational_rows.has_cpu_kernel() else [])


def _features(b, d, seed, normalize_student=True):
    g = torch.Generator().manual_seed(seed)
    s_i, s_t = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    if normalize_student:
        s_i, s_t = F.normalize(s_i, dim=1), F.normalize(s_t, dim=1)
    t_i = F.normalize(torch.randn(b, d, generator=g), dim=1)
    t_t = F.normalize(t_i + 0.5 * torch.randn(b, d, generator=g), dim=1)
    return s_i.requires_grad_(), s_t.requires_grad_(), t_i, t_t


def _close(a, b, tol=2e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,d", [(1, 3), (7, 16), (65, 77)])
def test_fused_distill_matches_open_clip_values_and_student_grads(impl, b, d):
    s_i, s_t, t_i, t_t = _features(b, d, b * 31 + d)
    ls = torch.tensor(14.2, requires_grad=True)
    ours = FusedDistillClipLoss(impl=impl)(s_i, s_t, ls, t_i, t_t, torch.tensor(60.0), output_dict=True)
    theirs = open_clip.loss.DistillClipLoss()(s_i, s_t, ls, t_i, t_t, torch.tensor(60.0), output_dict=True)
    assert list(ours) == list(theirs)
    grad_out = {"contrastive_loss": 0.7, "distill_loss": -1.3}  # grad_output ≠ 1
    go = torch.autograd.grad(sum(grad_out[k] * v for k, v in ours.items()), [s_i, s_t, ls])
    gt = torch.autograd.grad(sum(grad_out[k] * v for k, v in theirs.items()), [s_i, s_t, ls])
    for k in ours:
        _close(ours[k], theirs[k])
    for a, b_ in zip(go, gt):
        _close(a, b_)


@pytest.mark.slow
def test_fused_distill_through_open_clip_call_path():
    """``loss(**model_out, output_dict=True)`` exactly as open_clip's trainer calls it."""
    torch.manual_seed(0)
    student = open_clip.create_model("ViT-S-32", pretrained=None, output_dict=True)
    torch.manual_seed(1)
    teacher = open_clip.create_model("ViT-S-32", pretrained=None, output_dict=True).eval()
    tok = open_clip.get_tokenizer("ViT-S-32")
    images = torch.randn(4, 3, 224, 224)
    texts = tok(["a photo of a cat", "a dog", "a red car", "two birds on a wire"])

    def losses(loss_fn):
        student.zero_grad()
        model_out = student(images, texts)
        with torch.no_grad():
            dist_out = teacher(images, texts)
        model_out.update({f"dist_{k}": v for k, v in dist_out.items()})
        out = loss_fn(**model_out, output_dict=True)
        total = sum(out.values())
        total.backward()
        grad = student.visual.conv1.weight.grad.clone()
        return {k: v.detach() for k, v in out.items()}, grad

    ours, g_ours = losses(FusedDistillClipLoss())
    theirs, g_theirs = losses(open_clip.loss.DistillClipLoss())
    assert set(ours) == set(theirs)
    for k in ours:
        _close(ours[k], theirs[k])
    _close(g_ours, g_theirs, tol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cross_kd", [0.0, 0.5])
def test_clip_kd_loss_equals_reference_composition(impl, cross_kd):
    raw_i, raw_t, t_i, t_t = _features(33, 24, 5, normalize_student=False)
    ls, tls = torch.tensor(20.0, requires_grad=True), torch.tensor(50.0)
    mod = ClipKDLoss(crd_weight=1.5, icl_weight=0.8, fd_weight=200.0, cross_kd_weight=cross_kd, impl=impl)
    out = mod(raw_i, raw_t, ls, t_i, t_t, tls, output_dict=True)
    s_i, s_t, k = F.normalize(raw_i, dim=1), F.normalize(raw_t, dim=1), mod.cross_logit_scale
    want = {
        "task_loss": reference.clip_loss(s_i, s_t, ls),
        "crd_loss": 1.5 * reference.crd_loss(s_i, s_t, ls, t_i, t_t, tls),
        "icl_loss": 0.8 * reference.icl_loss(s_i, s_t, t_i, t_t, k),
        "fd_loss": 200.0 * reference.fd_loss(s_i, s_t, t_i, t_t),
    }
    if cross_kd:
        want["cross_kd_loss"] = cross_kd * reference.cross_kd_loss(s_i, s_t, t_i, t_t, k, tls)
    assert list(out) == list(want)
    inputs = [raw_i, raw_t, ls, k]
    for key in want:
        _close(out[key], want[key])
        for a, b_ in zip(torch.autograd.grad(out[key], inputs, retain_graph=True, allow_unused=True),
                         torch.autograd.grad(want[key], inputs, retain_graph=True, allow_unused=True)):  # fmt: skip
            _close(a if a is not None else torch.zeros(()), b_ if b_ is not None else torch.zeros(()))


@pytest.mark.parametrize("impl", IMPLS)
def test_clip_rd_loss_equals_reference_composition(impl):
    raw_i, raw_t, t_i, t_t = _features(29, 20, 9, normalize_student=False)
    ls, tls = torch.tensor(20.0, requires_grad=True), torch.tensor(50.0)
    mod = ClipRDLoss(vrd_weight=0.7, xrd_weight=1.3, fd_weight=100.0, impl=impl)
    with torch.no_grad():  # distinct scales, so a swapped scale would show
        mod.image_logit_scale.fill_(3.1)
        mod.text_logit_scale.fill_(1.7)
        mod.cross_logit_scale.fill_(2.3)
    out = mod(raw_i, raw_t, ls, t_i, t_t, tls, output_dict=True)
    s_i, s_t = F.normalize(raw_i, dim=1), F.normalize(raw_t, dim=1)
    ki, kt, kc = mod.image_logit_scale, mod.text_logit_scale, mod.cross_logit_scale
    want = {
        "task_loss": reference.clip_loss(s_i, s_t, ls),
        "hrd_loss": reference.crd_loss(s_i, s_t, ls, t_i, t_t, tls),
        "icl_loss": reference.icl_loss(s_i, s_t, t_i, t_t, kc),
        "fd_loss": 100.0 * reference.fd_loss(s_i, s_t, t_i, t_t),
        "vrd_loss": 0.7 * sum(reference.vrd_loss(s_i, s_t, t_i, t_t, ki, kt)),
        "xrd_loss": 1.3 * reference.xrd_loss(s_i, s_t, t_i, t_t, kc),
    }
    assert list(out) == list(want)
    inputs = [raw_i, raw_t, ls, ki, kt, kc]
    for key in want:
        _close(out[key], want[key])
        got = torch.autograd.grad(out[key], inputs, retain_graph=True, allow_unused=True)
        exp = torch.autograd.grad(want[key], inputs, retain_graph=True, allow_unused=True)
        for name, a, b_ in zip(["s_i", "s_t", "ls", "ki", "kt", "kc"], got, exp):
            a = a if a is not None else torch.zeros(())
            b_ = b_ if b_ is not None else torch.zeros(())
            torch.testing.assert_close(a, b_, atol=2e-5, rtol=2e-5, msg=lambda m, k=key, n=name: f"{k} d/d{n}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("two_towers", [False, True])
def test_instance_loss_equals_reference(impl, two_towers):
    raw_i, raw_t, t_i, t_t = _features(17, 12, 2, normalize_student=False)
    mod = InstanceDiscriminationLoss(weight=0.9, use_student_text=two_towers, impl=impl)
    out = mod(raw_i, raw_t, None, t_i, t_t, output_dict=True)["instance_loss"]
    s_i, s_t = F.normalize(raw_i, dim=1), F.normalize(raw_t, dim=1)
    if two_towers:
        want = 0.9 * reference.instance_discrimination_loss(s_i, t_t, mod.scale, s_text=s_t, t_image=t_i)
    else:
        want = 0.9 * reference.instance_discrimination_loss(s_i, t_t, mod.scale)
    _close(out, want)
    for a, b_ in zip(torch.autograd.grad(out, [raw_i, mod.scale]), torch.autograd.grad(want, [raw_i, mod.scale])):
        _close(a, b_)


def test_modules_reject_bad_config_and_shapes():
    with pytest.raises(ValueError, match="use_horovod"):
        FusedDistillClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="rank"):
        FusedDistillClipLoss(rank=2, world_size=2)
    s_i, s_t, t_i, t_t = _features(5, 4, 0)
    with pytest.raises(ValueError, match="batch"):
        FusedDistillClipLoss()(s_i, s_t[:4], 10.0, t_i, t_t, 10.0)
    with pytest.raises(ValueError, match="2-D"):
        FusedDistillClipLoss()(s_i[0], s_t, 10.0, t_i, t_t, 10.0)


@pytest.mark.parametrize("cls", [FusedDistillClipLoss, ClipKDLoss, ClipRDLoss, InstanceDiscriminationLoss])
def test_loss_modules_compile_fullgraph(cls):
    raw_i, raw_t, t_i, t_t = _features(9, 8, 4)
    mod = cls()
    ls, tls = torch.tensor(10.0, requires_grad=True), torch.tensor(30.0)
    compiled = torch.compile(mod, fullgraph=True, backend="eager")
    got = compiled(raw_i, raw_t, ls, t_i, t_t, tls, output_dict=True)
    want = mod(raw_i, raw_t, ls, t_i, t_t, tls, output_dict=True)
    assert list(got) == list(want)
    for k in want:
        _close(got[k], want[k])
    (g,) = torch.autograd.grad(sum(got.values()), [raw_i])
    (w,) = torch.autograd.grad(sum(want.values()), [raw_i])
    _close(g, w)


@pytest.mark.parametrize("target", on_cuda("auto"))
@pytest.mark.parametrize("cls", [FusedDistillClipLoss, ClipKDLoss, ClipRDLoss, InstanceDiscriminationLoss])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loss_modules_on_cuda_match_the_reference_on_cpu(target, cls, dtype):
    """Each module on CUDA tensors (impl="auto": Triton) against the same module on the CPU reference, values
    and student gradients; bf16 features with a bf16-sized tolerance."""
    impl, device = require(target)
    raw_i, raw_t, t_i, t_t = _features(300, 64, 11, normalize_student=False)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    outs = []
    for dev, im in ((device, impl), ("cpu", "reference")):
        torch.manual_seed(0)  # the same initial parameters for both modules
        mod = cls(impl=im).to(dev)
        a, b = (x.detach().to(device=dev, dtype=dtype).requires_grad_() for x in (raw_i, raw_t))
        ls = torch.tensor(20.0, device=dev, requires_grad=True)
        out = mod(a, b, ls, t_i.to(dev, dtype), t_t.to(dev, dtype), torch.tensor(50.0, device=dev), output_dict=True)
        grads = torch.autograd.grad(sum(out.values()), [a, b], allow_unused=True)
        grads = [torch.zeros(()) if g is None else g.float().cpu() for g in grads]  # text unused by one module
        outs.append(({k: v.detach().float().cpu() for k, v in out.items()}, grads))
    (got, got_g), (want, want_g) = outs
    assert list(got) == list(want)
    for k in want:
        _close(got[k], want[k], tol)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, atol=tol * (1 + w.abs().max().item()), rtol=tol)
