"""The trainer's sample stream: which samples step s trains on, as a pure function of (seed, s).

The stream is the concatenation of per-epoch permutations ``default_rng([seed, epoch]).permutation(n)``
of the training rows; step s takes stream positions ``[s·B, (s+1)·B)`` (batches run across epoch ends, so
every step has a full batch). The data position is therefore the step itself, and a resumed run
draws exactly the samples the uninterrupted one would: no sampler state to save. Rank r of W takes the
r-th contiguous slice of the global batch (B divisible by W).

A batch is assembled from the map-style dataset (image after the model's preprocess, tokens), and, by
sample id, from the teacher's embedding cache and the pseudo-class labels. The deterministic preprocess of
each image is kept after its first use (the eval transform has no randomness), which saves its cost on
every later epoch, up to ``cache_bytes`` (default 2 GB) of preprocessed images: past that, images are
preprocessed on every use (at 224 px an image is 0.6 MB, so an unbounded cache grew with every image seen).

With ``--augment`` (``views``), sample id of epoch e trains on view ``augment.train_view(seed, e, id, K)``: its
image is that view's crop and flip before the preprocess (view 0, the kept un-augmented one, is the item's image),
and its teacher image features are row ``[cache row, view]`` of the cache's ``image_views``. Both are functions of
(seed, epoch, id) alone, so resume, ranks and micro-batches see the views an uninterrupted one-process run sees.
"""

from __future__ import annotations

import numpy as np
import torch

from .augment import Views, train_view


class SampleStream:
    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if n < 1:
            raise ValueError("the training set is empty")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(
                f"--batch-size must be a positive multiple of the world size {world_size}, got {batch_size}"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def global_rows(self, step: int) -> np.ndarray:
        """Positions (into the training rows) of step ``step``'s global batch."""
        start = step * self.batch_size
        pos = np.arange(start, start + self.batch_size)
        epochs, offsets = np.divmod(pos, self.n)
        return np.concatenate([self._perm(int(e))[offsets[epochs == e]] for e in np.unique(epochs)])

    def rows(self, step: int) -> np.ndarray:
        local = self.batch_size // self.world_size
        return self.global_rows(step)[self.rank * local : (self.rank + 1) * local]

    def epochs(self, step: int) -> np.ndarray:
        """The epoch of each of ``rows(step)`` (a batch that runs across an epoch end holds two)."""
        local = self.batch_size // self.world_size
        start = step * self.batch_size + self.rank * local
        return np.arange(start, start + local) // self.n

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.n


class BatchBuilder:
    """Turns training-row positions into tensors: images, tokens, teacher features, pseudo-labels."""

    def __init__(
        self, dataset, train_index: np.ndarray, teacher: dict | None, labels: np.ndarray | None,
        cache_bytes: int = 2 * 10**9, views: Views | None = None, seed: int = 0,
    ) -> None:  # fmt: skip
        self.ds = dataset
        self.cache_bytes, self._cached_bytes = cache_bytes, 0
        self.train_index = train_index  # training row -> dataset index
        self.teacher = teacher  # {"image": [n, D], "text": [n, D], "row_of": id -> cache row} (+ "views") or None
        self.views, self.seed = views, seed  # --augment: the views and the run's seed (which view, each epoch)
        self.labels = labels  # cache row -> pseudo-class (cid), or None
        self._items: dict[int, dict] = {}
        self.ids = np.asarray(dataset.ids, dtype=np.int64)

    def _item(self, i: int) -> dict:
        item = self._items.get(i)
        if item is None:
            item = self.ds[i]
            size = sum(v.nbytes for v in item.values() if isinstance(v, torch.Tensor))
            if self._cached_bytes + size <= self.cache_bytes:
                self._items[i] = item
                self._cached_bytes += size
        return item

    def __call__(self, rows: np.ndarray, epochs: np.ndarray | None = None) -> dict:
        """The batch of training rows ``rows``; ``epochs``: each row's epoch (needed with views)."""
        idx = self.train_index[rows]
        ids = self.ids[idx]
        view = np.zeros(len(idx), dtype=np.int64)
        if self.views is not None:
            if epochs is None or len(epochs) != len(idx):
                raise ValueError("BatchBuilder with views: give each row's epoch")
            view[:] = [train_view(self.seed, int(e), int(i), self.views.count) for e, i in zip(epochs, ids)]
        images, texts = [], []
        for i, sample_id, v in zip(idx, ids, view):
            item = self._item(int(i))
            if v:  # an augmented view: cropped from the source image, not kept (K of them would fill the memory)
                images.append(self.views.image(self.ds.raw_image(int(i)), self.ds.preprocess, int(sample_id), int(v)))
            else:
                images.append(item["image"])
            texts.append(item["text"])
        out = {"image": torch.stack(images), "text": torch.stack(texts), "id": torch.from_numpy(ids)}
        if self.views is not None:
            out["view"] = torch.from_numpy(view)
        if self.teacher is not None:
            cache_rows = self.teacher["row_of"](ids)
            if "views" in self.teacher:  # (an online teacher's cache, read for cid's labels, has none: unused)
                picked = self.teacher["views"][cache_rows][np.arange(len(idx)), view]
            else:
                picked = self.teacher["image"][cache_rows]
            out["dist_image"] = torch.from_numpy(np.asarray(picked, dtype=np.float32))
            out["dist_text"] = torch.from_numpy(np.asarray(self.teacher["text"][cache_rows], dtype=np.float32))
            if self.labels is not None:
                out["cluster_label"] = torch.from_numpy(np.asarray(self.labels[cache_rows], dtype=np.int64))
        return out
