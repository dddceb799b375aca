"""Row-wise log-sum-exp: the infrastructure op. Small, but it has every face the fused ops have:
a Triton kernel, the C++ CPU kernel (csrc/cpu/row_logsumexp.cpp, online-LSE tiles of tiles.h), a
CUDA C++ kernel (csrc/cuda/row_logsumexp.cu), the reference, a fake, and autograd."""

import torch
from torch import Tensor

from .. import reference
from .._backend import c_extension
from ._triton import jit, launch, launch_on, tl, triton


@jit
def _row_lse_kernel(x_ptr, out_ptr, cols, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: rows × stride may pass 2^31
    m = tl.full([1], float("-inf"), tl.float32)
    s = tl.zeros([1], tl.float32)
    for c0 in range(0, cols, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        # bf16 is loaded then widened: the interpreter mis-handles bf16 arithmetic.
        v = tl.load(x_ptr + row * stride + offs, mask=offs < cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(v, 0))
        # A tile of only -inf keeps m_new = -inf; shift by 0 instead so exp sees no inf - inf.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(v[None, :] - shift[:, None]), 1)
        m = m_new
    tl.store(out_ptr + row + tl.arange(0, 1), m + tl.log(s))


def _triton_fwd(x: Tensor) -> Tensor:
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    if x.shape[0] > 0:
        block = min(1024, max(16, triton.next_power_of_2(x.shape[1])))
        with launch_on(x):
            launch(_row_lse_kernel, (x.shape[0],), x, out, x.shape[1], x.stride(0), BLOCK=block)
    return out


@torch.library.custom_op("clipcid_fast::row_logsumexp", mutates_args=())
def row_logsumexp_op(x: Tensor, backend: str) -> Tensor:
    if backend == "triton":
        return _triton_fwd(x)
    if backend in ("cpu", "cuda"):
        return torch.ops.clipcid_fast_C.row_logsumexp_fwd(x.contiguous())
    return reference.row_logsumexp(x).float()


@row_logsumexp_op.register_fake
def _(x: Tensor, backend: str) -> Tensor:
    return x.new_empty((x.shape[0],), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, backend = inputs
    ctx.save_for_backward(x, output)
    ctx.backend = backend


def _backward(ctx, grad: Tensor):
    x, lse = ctx.saved_tensors
    if ctx.backend == "cpu":
        gx = torch.ops.clipcid_fast_C.row_logsumexp_bwd(grad.contiguous(), x.contiguous(), lse)
    else:
        gx = (grad[:, None] * torch.exp(x.float() - lse[:, None])).to(x.dtype)
    return gx, None


row_logsumexp_op.register_autograd(_backward, setup_context=_setup_context)

if c_extension() is not None:  # fakes for the raw C++ ops the backward calls (torch.compile, opcheck)

    @torch.library.register_fake("clipcid_fast_C::row_logsumexp_bwd")
    def _(grad: Tensor, x: Tensor, lse: Tensor) -> Tensor:
        return torch.empty_like(x)
