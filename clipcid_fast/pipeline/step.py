"""One optimiser step over a global batch: data parallel, exact gradient accumulation, no host sync.

``TrainStep(batch)`` takes this rank's share of the global batch (CPU tensors from ``batches.BatchBuilder``)
and returns the step's loss terms as device tensors; nothing in it reads a value back to the host, so on a
GPU the trainer can queue the next step before it logs this one.

* **Data parallel.** The student runs inside ``DistributedDataParallel`` (its gradient mean overlaps the
  backward); the losses all-gather features with autograd (open_clip's ``gather_with_grad``), so every rank
  computes the global loss and the mean of the ranks' gradients is the global batch's gradient. The recipe's
  replicated parameters (projections, CLIP-KD/RD scales) are averaged the same way in one flat all-reduce;
  class centres are sharded over ranks and each rank's gradient is already its block's exact gradient.
* **Accumulation** (``accum_freq = K > 1``, GradCache's scheme): pass 1 encodes the K micro-batches without a
  graph; the loss runs once over all their features (the whole global batch, O(B) memory through the fused
  ops) and gives the gradient of every feature; pass 2 re-encodes micro-batch k with a graph and
  backpropagates its slice of those gradients. The result is the big-batch gradient, with the activation
  memory of one micro-batch, for every recipe. Exact where the encoder is a function of each micro-batch
  alone: batch-norm sees micro-batch statistics (as in any accumulation; its running statistics are updated
  once, by pass 2). Dropout is exact to pass 1's draws: pass 2 replays each micro-batch's RNG state (GradCache's
  rule), so its graph is the one whose features the loss saw (the draws differ from a one-batch step's).
* **Clipping** over all parameters (sharded centres' squares summed over ranks), then AdamW, the schedule,
  and open_clip's clamp of the student's logit scale.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
from torch import Tensor

from .comm import Comm

LOGIT_SCALE_MAX = math.log(100.0)


class StudentForward(nn.Module):
    """The student's ``(image_features, text_features, logit_scale.exp())`` as one ``forward`` (what DDP hooks).

    ``distinct`` / ``inverse`` (from ``torch.unique`` on the host) encode each distinct caption once and index
    the rows back: exact, since rows are independent through the text tower, and backward sums the copies.

    The copies are an embedding lookup, not ``t[inverse]``: on the CPU the backward of advanced indexing
    (``index_put_`` with accumulation) adds the copies' gradients with atomic adds over threads once a batch holds
    32768 elements (B >= 86 at width 384), so their order, and the run's bits, followed thread scheduling.
    ``embedding``'s backward sums each distinct row's copies in batch order (one thread per row on the CPU, the
    sum a 1-thread run of the old code made; sorted segments on CUDA), where ``index_select``'s would be
    ``index_add_``, atomic on CUDA."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, texts: Tensor | None, distinct: Tensor | None = None, inverse=None):
        img = self.model.encode_image(images)
        if distinct is not None:
            txt = nn.functional.embedding(inverse, self.model.encode_text(distinct))
        else:
            txt = self.model.encode_text(texts)
        return img, txt, self.model.logit_scale.exp()


@contextlib.contextmanager
def _buffers_kept(model: nn.Module):
    """Pass 1 of accumulation must leave batch-norm's running statistics as they were (pass 2 updates them)."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved):
                b.copy_(s)


def _rng_state(device: torch.device):
    """The generators an encoder's dropout draws from: the host's, and the device's on CUDA (host-side state)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class TrainStep:
    def __init__(
        self,
        model: nn.Module,
        recipe: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        *,
        device: torch.device,
        comm: Comm,
        accum_freq: int = 1,
        grad_clip: float = 1.0,
        autocast=None,
        dedup_captions: bool = True,
        teacher: nn.Module | None = None,
        teacher_scale: Tensor | None = None,
        mean_terms: bool = False,
    ) -> None:
        self.model, self.recipe, self.opt, self.sched = model, recipe, optimizer, scheduler
        self.device, self.comm, self.accum = device, comm, accum_freq
        self.grad_clip, self.dedup = grad_clip, dedup_captions
        self.autocast = autocast if autocast is not None else contextlib.nullcontext
        self.teacher, self.t_scale = teacher, teacher_scale
        self.mean_terms = mean_terms and comm.world > 1  # local_loss: each rank's terms cover its rows only
        self.encoder = StudentForward(model)
        if comm.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.encoder = nn.parallel.DistributedDataParallel(self.encoder, device_ids=ids)
        sharded = {id(p) for p in getattr(recipe, "sharded_parameters", lambda: [])()}
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.sharded = [p for p in params if id(p) in sharded]
        self.replicated = [p for p in params if id(p) not in sharded]
        model_ids = {id(p) for p in model.parameters()}
        self.recipe_replicated = [p for p in self.replicated if id(p) not in model_ids]
        # they start as rank 0's (DDP does this for the student): the ranks' RNG streams may differ by the time the
        # recipe's projections are drawn (rank 0 alone may have trained the default teacher), and averaged
        # gradients only keep equal weights equal
        with torch.no_grad():
            comm.broadcast_(self.recipe_replicated)

    # -- encoding

    def _h2d(self, t: Tensor) -> Tensor:
        # A copy from pageable memory is staged by the host, which waits for it behind the kernels already queued
        # (the previous step's): from pinned memory it is queued like a kernel. Pinning is a host-side copy.
        if self.device.type == "cuda" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _texts(self, texts: Tensor) -> dict:
        if not self.dedup:
            return {"texts": self._h2d(texts)}
        distinct, inverse = torch.unique(texts, dim=0, return_inverse=True)  # on the host: no device sync
        return {"texts": None, "distinct": self._h2d(distinct), "inverse": self._h2d(inverse)}

    def _encode(self, images: Tensor, text_args: dict):
        with self.autocast():
            return self.encoder(self._h2d(images), **text_args)

    def _teacher_features(self, batch: dict, rows: slice) -> tuple[Tensor | None, Tensor | None]:
        if self.t_scale is None:
            return None, None
        if self.teacher is not None:
            from .models import normalized_features

            with torch.no_grad(), self.autocast():
                t_img, t_txt = normalized_features(self.teacher, self._h2d(batch["image"][rows]),
                                                   self._h2d(batch["text"][rows]))  # fmt: skip
            return t_img.float(), t_txt.float()
        return self._h2d(batch["dist_image"][rows]), self._h2d(batch["dist_text"][rows])

    def loss_terms(self, img, txt, scale, t_img, t_txt, labels) -> dict[str, Tensor]:
        """The recipe's weighted terms on the student's features ``img`` / ``txt`` (scale: its exp'd logit scale), the
        teacher's ``t_img`` / ``t_txt`` (None without a teacher) and the pseudo-labels, as the step computes them
        (the seam a benchmark of the loss alone times)."""
        with self.autocast():
            return self.recipe(img.float(), txt.float(), scale, t_img, t_txt, self.t_scale, labels)

    # -- the step

    def __call__(self, batch: dict) -> dict[str, Tensor]:
        if self.device.type == "cuda":  # pinned once: every micro-batch slice of it is then copied as it is
            batch = {k: v.pin_memory() if isinstance(v, Tensor) else v for k, v in batch.items()}
        images, texts = batch["image"], batch["text"]
        n = images.shape[0]
        labels = batch.get("cluster_label")
        labels = self._h2d(labels) if labels is not None else None
        self.opt.zero_grad(set_to_none=True)
        if self.accum == 1:
            img, txt, scale = self._encode(images, self._texts(texts))
            t_img, t_txt = self._teacher_features(batch, slice(None))
            terms = self.loss_terms(img, txt, scale, t_img, t_txt, labels)
            sum(terms.values()).backward()
        else:
            terms = self._accumulated(batch, images, texts, labels, n)
        return self._update(terms)

    def _accumulated(self, batch, images, texts, labels, n) -> dict[str, Tensor]:
        k = self.accum
        micro = [slice(i * n // k, (i + 1) * n // k) for i in range(k)]
        text_args = [self._texts(texts[m]) for m in micro]  # the caption dedup and its copies, once for both passes
        rng, feats = [], []
        with torch.no_grad(), _buffers_kept(self.model):
            for m, t in zip(micro, text_args):
                rng.append(_rng_state(self.device))  # pass 2 replays it: the same dropout masks as pass 1
                feats.append(self._encode(images[m], t)[:2])
        teacher = [self._teacher_features(batch, m) for m in micro]
        img = torch.cat([f[0].float() for f in feats]).requires_grad_()
        txt = torch.cat([f[1].float() for f in feats]).requires_grad_()
        del feats
        scale = self.model.logit_scale.detach().exp().requires_grad_()
        t_img, t_txt = (torch.cat(t) if t[0] is not None else None for t in zip(*teacher))
        terms = self.loss_terms(img, txt, scale, t_img, t_txt, labels)
        sum(terms.values()).backward()  # recipe parameters get their gradients here; features get theirs
        g_img, g_txt, g_scale = img.grad, txt.grad, scale.grad
        for i, m in enumerate(micro):
            last = i == k - 1
            sync = self.encoder.no_sync() if self.comm.world > 1 and not last else contextlib.nullcontext()
            with sync:
                _set_rng_state(rng[i], self.device)
                out_img, out_txt, out_scale = self._encode(images[m], text_args[i])
                # the scale's gradient once (its graph is the same in every micro-batch); zeros keep DDP's
                # every-parameter-used rule on the others
                g_s = g_scale if last else torch.zeros_like(g_scale)
                torch.autograd.backward([out_img.float(), out_txt.float(), out_scale], [g_img[m], g_txt[m], g_s])
        return {name: t.detach() for name, t in terms.items()}

    def _update(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        self.comm.mean_([p.grad for p in self.recipe_replicated if p.grad is not None])
        norm = self._clip()
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        out = {name: t.detach() for name, t in terms.items()}
        if self.mean_terms:
            values = list(out.values())
            self.comm.mean_(values)
        out["grad_norm"] = norm
        out["logit_scale"] = self.model.logit_scale.detach().exp()
        return out

    def _clip(self) -> Tensor:
        """torch's clip_grad_norm_ (2-norm over every parameter, coefficient max/(norm + 1e-6) capped at 1),
        with the sharded centres' squared norms summed over ranks; no host sync."""
        rep = [p.grad for p in self.replicated if p.grad is not None]
        shard = [p.grad for p in self.sharded if p.grad is not None]
        zero = torch.zeros((), device=self.device)
        sq = torch.stack(torch._foreach_norm(rep)).float().square().sum() if rep else zero
        if self.sharded:
            sq = sq + self.comm.sum(torch.stack(torch._foreach_norm(shard)).float().square().sum() if shard else zero)
        norm = sq.sqrt()
        if self.grad_clip:
            coef = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(rep + shard, coef)
        return norm
