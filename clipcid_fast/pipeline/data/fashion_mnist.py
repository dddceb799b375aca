"""The offline default source: Fashion-MNIST (Debian package ``dataset-fashion-mnist``) with class captions.

Each 28×28 grey image is paired with a caption ``template.format(class name)``. Three corpora model the regime
in which distillation pays:

- ``teacher``: the clean 60k train split, ids 0..59999 (an id is the image's index in the train split);
- ``student``: a seeded subset of ``student_samples`` train images (ids are their train indices, so a teacher
  cache of the train split covers them), of which exactly ``round(caption_noise × student_samples)`` captions
  name a *different* class, drawn uniformly from the other 9 — so ``caption_noise`` is exactly the fraction
  of wrong captions, not a rate of random relabelling (which would leave 1/10 of the "noisy" ones right);
- ``test``: the official 10k test split, ids 0..9999, clean captions.

Every draw comes from ``data_seed`` through one numpy stream per purpose, indexed by sample id, so a sample's
caption does not depend on iteration order, and a smaller student subset is contained in a larger one with
the same seed. A train image has the same template in the teacher and the student corpus.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ._common import seeded_order

# Fashion-MNIST's classes in label order, written as natural words (the text towers read them).
CLASS_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]

# Caption templates; "the" rather than "a" so that every class name reads grammatically ("the ankle boot").
TEMPLATES = [
    "a photo of the {}.",
    "a black and white photo of the {}.",
    "a low resolution photo of the {}.",
    "a close-up photo of the {}.",
    "a cropped photo of the {}.",
    "a grayscale picture of the {}.",
]

DEBIAN_PACKAGE = "dataset-fashion-mnist"
SPLIT_FILES = {"train": "train", "test": "t10k"}
SPLIT_SIZES = {"train": 60000, "test": 10000}
CORPORA = ("teacher", "student", "test")

# Seeded streams, one per purpose: numpy's SeedSequence([data_seed, stream, ...]) keeps them independent.
_SUBSET_STREAM, _NOISE_STREAM, _WRONG_CLASS_STREAM, _TEMPLATE_STREAM = 1, 2, 3, 4
_SPLIT_CODE = {"train": 0, "test": 1}


def _stream(seed: int, *words: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *words])


@functools.lru_cache(maxsize=4)
def _read_idx(path: str, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """One idx file (gzip): big-endian magic, count, then the shape words, then uint8 data. Read-only result."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ValueError(
            f"Fashion-MNIST file {path!r} is missing: install the Debian package {DEBIAN_PACKAGE} "
            f"(apt-get install {DEBIAN_PACKAGE}) or point fashion_mnist_dir at a copy"
        ) from None
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"Fashion-MNIST file {path!r} is not a readable gzip file ({e})") from None
    header = 8 + 4 * len(item_shape)
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise ValueError(f"Fashion-MNIST file {path!r}: not an idx file with magic {magic}")
    count = int.from_bytes(raw[4:8], "big")
    dims = tuple(int.from_bytes(raw[8 + 4 * i : 12 + 4 * i], "big") for i in range(len(item_shape)))
    if dims != item_shape or len(raw) != header + count * int(np.prod(item_shape, dtype=np.int64)):
        raise ValueError(f"Fashion-MNIST file {path!r}: header says {count}×{dims}, size is {len(raw)} bytes")
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(count, *item_shape)
    arr.flags.writeable = False
    return arr


def fashion_mnist_arrays(cfg, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw arrays of a split: images uint8 [n, 28, 28] and labels int64 [n], read-only (memoised per process).

    ``split`` is ``train`` (60k) or ``test`` (10k); the files come from ``cfg.fashion_mnist_dir``.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    root = cfg.fashion_mnist_dir
    if not os.path.isdir(root):
        raise ValueError(
            f"fashion_mnist_dir {root!r} does not exist: install the Debian package {DEBIAN_PACKAGE} "
            f"(apt-get install {DEBIAN_PACKAGE}), or set fashion_mnist_dir to a folder with its .gz files"
        )
    stem = os.path.join(os.path.abspath(root), SPLIT_FILES[split])
    images = _read_idx(f"{stem}-images-idx3-ubyte.gz", 2051, (28, 28))
    labels = _labels_int64(f"{stem}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split} split in {root!r}: {len(images)} images but {len(labels)} labels")
    return images, labels


@functools.lru_cache(maxsize=4)
def _labels_int64(path: str) -> np.ndarray:
    labels = _read_idx(path, 2049, ()).astype(np.int64)
    if labels.size and not (0 <= labels.min() and labels.max() < len(CLASS_NAMES)):
        raise ValueError(f"Fashion-MNIST file {path!r}: labels outside 0..{len(CLASS_NAMES) - 1}")
    labels.flags.writeable = False
    return labels


class FashionMnistCorpus:
    """The samples of one corpus, without images or tokens: what the dataset serves and what export writes.

    Arrays in ascending id order: ``ids`` (= row in ``split``), ``labels`` (the image's true class),
    ``caption_labels`` (the class the caption names; differs from ``labels`` exactly on the noisy ones),
    ``template_ids`` (index into ``TEMPLATES``).
    """

    def __init__(self, cfg):
        if cfg.corpus not in CORPORA:
            raise ValueError(f"corpus must be one of {list(CORPORA)}, got {cfg.corpus!r}")
        if not 0.0 <= float(cfg.caption_noise) <= 1.0:
            raise ValueError(f"caption_noise must be in [0, 1], got {cfg.caption_noise!r}")
        n_train = SPLIT_SIZES["train"]
        if cfg.corpus == "student" and not 1 <= int(cfg.student_samples) <= n_train:
            raise ValueError(f"student_samples must be in [1, {n_train}], got {cfg.student_samples!r}")
        self.corpus = cfg.corpus
        self.split = "test" if cfg.corpus == "test" else "train"
        self.data_seed = int(cfg.data_seed)
        images, split_labels = fashion_mnist_arrays(cfg, self.split)
        self.images = images
        n_split = len(split_labels)
        # One template per id of the split, so teacher and student agree on a train image's caption wording.
        split_templates = _stream(self.data_seed, _TEMPLATE_STREAM, _SPLIT_CODE[self.split]).integers(
            0, len(TEMPLATES), n_split
        )
        if cfg.corpus == "student":
            # The subset: the student_samples ids with the smallest seeded keys (nested across sizes), ascending.
            keys = _stream(self.data_seed, _SUBSET_STREAM).random(n_split)
            ids = np.sort(np.argsort(keys, kind="stable")[: int(cfg.student_samples)])
        else:
            ids = np.arange(n_split)
        self.ids = ids.astype(np.int64)
        self.labels = split_labels[self.ids]
        self.template_ids = split_templates[self.ids]
        caption_labels = self.labels.copy()
        self.num_wrong_captions = 0
        if cfg.corpus == "student":
            wrong = round(float(cfg.caption_noise) * len(self.ids))
            # Which captions are wrong: the `wrong` members with the smallest seeded keys (exact count).
            noise_keys = _stream(self.data_seed, _NOISE_STREAM).random(n_split)[self.ids]
            noisy = np.argsort(noise_keys, kind="stable")[:wrong]
            # The wrong class: true class + an offset in 1..9, i.e. uniform over the other 9 classes.
            offsets = _stream(self.data_seed, _WRONG_CLASS_STREAM).integers(1, len(CLASS_NAMES), n_split)
            caption_labels[noisy] = (self.labels[noisy] + offsets[self.ids[noisy]]) % len(CLASS_NAMES)
            self.num_wrong_captions = wrong
        self.caption_labels = caption_labels
        for arr in (self.ids, self.labels, self.template_ids, self.caption_labels):
            arr.flags.writeable = False
        self.caption_noise = float(cfg.caption_noise) if cfg.corpus == "student" else 0.0

    def __len__(self) -> int:
        return len(self.ids)

    def caption(self, i: int) -> str:
        return TEMPLATES[self.template_ids[i]].format(CLASS_NAMES[self.caption_labels[i]])

    @property
    def captions(self) -> list[str]:
        return [self.caption(i) for i in range(len(self))]

    def image(self, i: int) -> Image.Image:
        """Sample i's image as a PIL image of mode "L" (the model's preprocess converts it to RGB)."""
        return Image.fromarray(np.ascontiguousarray(self.images[self.ids[i]]))

    def summary(self) -> dict:
        """The regime's parameters, for reports: which corpus, how many samples, how many wrong captions."""
        return {
            "dataset": "fashion-mnist",
            "corpus": self.corpus,
            "split": self.split,
            "num_samples": len(self),
            "num_wrong_captions": self.num_wrong_captions,
            "caption_noise": self.caption_noise,
            "data_seed": self.data_seed,
        }


class FashionMnistDataset(Dataset):
    """Map-style dataset over a ``FashionMnistCorpus``; ``ds[i]`` is sample ``order[i]`` (ascending id if none).

    Every distinct caption (10 classes × len(TEMPLATES)) is tokenised once at construction, in one call.
    """

    def __init__(self, cfg, preprocess, tokenizer, *, shuffle_seed: int | None = None):
        self.corpus = FashionMnistCorpus(cfg)
        self.preprocess = preprocess
        self.order = seeded_order(len(self.corpus), shuffle_seed)
        all_captions = [t.format(name) for name in CLASS_NAMES for t in TEMPLATES]
        self._tokens = tokenizer(all_captions)
        self._caption_rows = self.corpus.caption_labels * len(TEMPLATES) + self.corpus.template_ids
        self.skipped = 0  # nothing to skip: the arrays are read whole or not at all

    # The corpus' arrays, in ascending id order (not in ``order``), for reports and for cache checks.
    @property
    def ids(self) -> np.ndarray:
        return self.corpus.ids

    @property
    def labels(self) -> np.ndarray:
        return self.corpus.labels

    @property
    def caption_labels(self) -> np.ndarray:
        return self.corpus.caption_labels

    @property
    def num_wrong_captions(self) -> int:
        return self.corpus.num_wrong_captions

    def summary(self) -> dict:
        return self.corpus.summary()

    def __len__(self) -> int:
        return len(self.corpus)

    def _sample(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return int(self.order[index]) if self.order is not None else int(index) % len(self)

    def raw_image(self, index: int):
        """Item ``index``'s image before the preprocess (PIL, mode "L"): what an augmented view crops."""
        return self.corpus.image(self._sample(index))

    def __getitem__(self, index: int) -> dict:
        i = self._sample(index)
        c = self.corpus
        return {
            "image": self.preprocess(c.image(i)),
            "text": self._tokens[self._caption_rows[i]].clone(),
            "id": int(c.ids[i]),
            "caption": c.caption(i),
            "label": int(c.labels[i]),
        }
