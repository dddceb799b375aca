"""Training the offline default teacher's image tower once, LiT-style, against its frozen text tower.

LiT (locked-image... here locked *text*) tuning: the pretrained MiniLM-L6 text tower is frozen, so its
caption embeddings are computed once (the corpus has only class × template distinct captions) and the image
tower learns to land on them. The corpus' captions are class prompts, so a batch holds many images of one
class: the plain CLIP target (the diagonal) would push apart images of the same class. The target of image
i is therefore uniform over the batch's captions of i's caption class (and the transposed target for the
text side): soft same-class targets (a 0.35M-param CNN, scale 20, AdamW 2e-3, batch 256 reaches about 90 %
zero-shot on the test split).

The model's own preprocess is applied once to every image of the corpus (it is deterministic: resize,
to-tensor, normalise), which costs one pass instead of one per epoch.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .config import DataConfig, ModelConfig
from .progress import tqdm


def soft_target_clip_loss(img: torch.Tensor, txt: torch.Tensor, groups: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric cross-entropy of scale·img·txtᵀ against uniform targets over same-group pairs."""
    logits = scale * img @ txt.T
    target = (groups[:, None] == groups[None, :]).float()
    target = target / target.sum(dim=1, keepdim=True)  # symmetric: rows and columns have the same sums
    return 0.5 * (
        -(target * logits.log_softmax(dim=1)).sum(dim=1).mean() - (target * logits.T.log_softmax(dim=1)).sum(1).mean()
    )


def _preprocessed_corpus(ds, progress: bool, subset: int, seed: int) -> tuple[torch.Tensor, list[str], np.ndarray]:
    rows = np.arange(len(ds))
    if 0 < subset < len(ds):  # a seeded subset, in ascending order (the stream below shuffles)
        rows = np.sort(np.random.default_rng([seed, 11]).permutation(len(ds))[:subset])
    n = len(rows)
    first = ds[0]
    images = torch.empty((n, *first["image"].shape), dtype=first["image"].dtype)
    captions: list[str] = []
    groups = np.asarray(getattr(ds, "caption_labels", np.full(len(ds), -1)))[rows]
    for j, i in enumerate(
        tqdm(rows, desc="teacher corpus: preprocess", disable=not progress, unit="img", mininterval=2)
    ):
        item = ds[int(i)]
        images[j] = item["image"]
        captions.append(item["caption"])
    if (groups < 0).any():  # no caption classes known: identical captions are the positives
        _, groups = np.unique(np.asarray(captions), return_inverse=True)
    return images, captions, groups


def train_lit_image_tower(
    model, preprocess, tokenizer, logit_scale: float, cfg: ModelConfig, data_cfg: DataConfig, progress: bool = True
) -> dict:
    """Train ``model.visual`` in place against the frozen text tower (``preprocess`` / ``tokenizer``: the model's,
    ``logit_scale``: the fixed scale of the loss); returns the training record cached beside the weights."""
    from . import data

    corpus_cfg = DataConfig(
        dataset="fashion-mnist",
        corpus="teacher",
        data_seed=data_cfg.data_seed,
        fashion_mnist_dir=data_cfg.fashion_mnist_dir,
    )
    ds = data.build_dataset(corpus_cfg, preprocess, tokenizer)
    t0 = time.perf_counter()
    images, captions, groups = _preprocessed_corpus(ds, progress, cfg.teacher_samples, data_cfg.data_seed)
    t_pre = time.perf_counter() - t0

    distinct, caption_idx = np.unique(np.asarray(captions), return_inverse=True)
    model.eval()
    with torch.inference_mode():
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(list(distinct))), dim=-1)
    text = text.clone()
    caption_idx = torch.from_numpy(caption_idx)
    groups = torch.from_numpy(np.asarray(groups, dtype=np.int64))

    for p in model.parameters():
        p.requires_grad_(False)
    visual = model.visual
    for p in visual.parameters():
        p.requires_grad_(True)
    visual.train()

    gen = torch.Generator().manual_seed(cfg.teacher_seed)
    torch.manual_seed(cfg.teacher_seed)
    n, bs = images.shape[0], cfg.teacher_batch_size
    steps_per_epoch = n // bs  # drop the last partial batch: every step sees a full batch
    total = cfg.teacher_epochs * steps_per_epoch
    warmup = max(1, total // 20)
    opt = torch.optim.AdamW(visual.parameters(), lr=cfg.teacher_lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))),
    )
    bar = tqdm(total=total, desc="teacher: LiT image tower", disable=not progress, unit="step", mininterval=2)
    t1 = time.perf_counter()
    losses = []
    for _epoch in range(cfg.teacher_epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * bs : (s + 1) * bs]
            img = torch.nn.functional.normalize(visual(images[idx]), dim=-1)
            loss = soft_target_clip_loss(img, text[caption_idx[idx]], groups[idx], logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            if s % 20 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}", img_s=f"{bar.n * bs / (time.perf_counter() - t1):.0f}")
    bar.close()
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return {
        "steps": total,
        "final_loss_mean_last_50": float(np.mean(losses[-50:])),
        "preprocess_seconds": t_pre,
        "train_seconds": time.perf_counter() - t1,
        "corpus_samples": n,
        "distinct_captions": len(distinct),
    }
