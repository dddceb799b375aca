"""Evaluation metrics on features: zero-shot classification, image↔text retrieval, linear probe.

Pure functions of L2-normalised feature tensors (no model, no data loading), so each has a
hand-checkable test; ``evaluate.py`` streams a model's features into them. Conventions follow open_clip's
``zero_shot.py`` and CLIP_benchmark:

* zero-shot: a class's classifier is the mean of its prompt embeddings (class name × every template),
  re-normalised; top-k accuracy counts the true class among the k highest cosines; mean per-class recall
  is the unweighted mean over classes of (correct in class / samples in class).
* retrieval: captions may repeat (class prompts do), so positives are given as groups, as CLIP_benchmark's
  ``texts_image_index``: image i's positives are the texts whose group equals ``image_group[i]``; image→text
  R@k = fraction of images with a positive among their k nearest texts; text→image R@k = fraction of texts
  with a positive image among their k nearest images. Similarities are formed ``block`` rows at a time
  (memory O(block · n), never n_images × n_texts at once).
* linear probe: multinomial logistic regression (scikit-learn, L-BFGS) on frozen features, the CLIP
  paper's protocol, with a fixed inverse regularisation ``C``; reports top-1 on the test features.
"""

from __future__ import annotations

import numpy as np
import torch


def class_classifier(prompt_features: torch.Tensor) -> torch.Tensor:
    """[n_classes, n_templates, D] normalised prompt embeddings -> [n_classes, D] normalised classifiers."""
    if prompt_features.dim() != 3:
        raise ValueError(f"prompt_features: expected [classes, templates, D], got {tuple(prompt_features.shape)}")
    w = prompt_features.float().mean(dim=1)
    return w / w.norm(dim=1, keepdim=True)


class ZeroShotAccumulator:
    """Streams image features batch by batch; memory O(classes), not O(images)."""

    def __init__(self, classifier: torch.Tensor, topk: tuple[int, ...] = (1, 5)):
        self.w = classifier.float()
        # top-k past the number of classes is always 1; such k are dropped (top5 of a 3-class task is not reported)
        self.topk = tuple(k for k in topk if 1 <= k <= self.w.shape[0])
        if not self.topk:
            raise ValueError(f"zero-shot: topk {tuple(topk)} has no k in [1, {self.w.shape[0]} classes]")
        n = self.w.shape[0]
        self.correct = dict.fromkeys(self.topk, 0)
        self.per_class_correct = torch.zeros(n, dtype=torch.long)
        self.per_class_total = torch.zeros(n, dtype=torch.long)
        self.count = 0

    def update(self, image_features: torch.Tensor, labels: torch.Tensor) -> None:
        n = self.w.shape[0]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            raise ValueError(f"zero-shot: labels must be in [0, {n}), got {int(labels.min())}..{int(labels.max())}")
        logits = image_features.float() @ self.w.T
        kmax = max(self.topk)
        top = logits.topk(kmax, dim=1).indices
        hit = top == labels[:, None]
        for k in self.topk:
            self.correct[k] += int(hit[:, :k].any(dim=1).sum())
        self.per_class_total += torch.bincount(labels, minlength=n)
        self.per_class_correct += torch.bincount(labels[hit[:, 0]], minlength=n)
        self.count += labels.numel()

    def result(self) -> dict:
        if self.count == 0:
            raise ValueError("zero-shot: no labelled images were evaluated")
        out = {f"top{k}": self.correct[k] / self.count for k in self.topk}
        present = self.per_class_total > 0
        recall = self.per_class_correct[present].double() / self.per_class_total[present].double()
        out["mean_per_class_recall"] = float(recall.mean())
        out["n"] = self.count
        return out


def _hits_at_k(query: torch.Tensor, keys: torch.Tensor, q_group: torch.Tensor, k_group: torch.Tensor,
               ks: tuple[int, ...], block: int) -> dict[int, int]:  # fmt: skip
    kmax = min(max(ks), keys.shape[0])
    hits = dict.fromkeys(ks, 0)
    for s in range(0, query.shape[0], block):
        sim = query[s : s + block] @ keys.T
        top = sim.topk(kmax, dim=1).indices
        ok = k_group[top] == q_group[s : s + block, None]
        for k in ks:
            hits[k] += int(ok[:, :k].any(dim=1).sum())
    return hits


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    image_group: torch.Tensor,
    text_group: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
    block: int = 4096,
) -> dict:
    """R@k both ways; ``image_group[i] == text_group[j]`` marks text j as a positive of image i."""
    if image_features.shape[0] != image_group.shape[0] or text_features.shape[0] != text_group.shape[0]:
        raise ValueError("retrieval: one group id per image and per text is required")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    img, txt = image_features.float(), text_features.float()
    i2t = _hits_at_k(img, txt, image_group, text_group, ks, block)
    t2i = _hits_at_k(txt, img, text_group, image_group, ks, block)
    out = {f"image_to_text_R@{k}": i2t[k] / img.shape[0] for k in ks}
    out.update({f"text_to_image_R@{k}": t2i[k] / txt.shape[0] for k in ks})
    out["n_images"], out["n_texts"] = int(img.shape[0]), int(txt.shape[0])
    return out


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 c: float = 1.0, max_iter: int = 1000, seed: int = 0) -> dict:  # fmt: skip
    """Logistic regression on frozen features; top-1 on the test features."""
    from sklearn.linear_model import LogisticRegression

    if c <= 0:
        raise ValueError(f"probe_c must be > 0, got {c}")
    if len(np.unique(train_y)) < 2:
        raise ValueError("linear probe: the training features hold fewer than 2 classes")
    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    clf.fit(np.asarray(train_x, dtype=np.float64), train_y)
    pred = clf.predict(np.asarray(test_x, dtype=np.float64))
    return {"top1": float((pred == test_y).mean()), "n_train": len(train_y), "n_test": len(test_y), "C": c}
