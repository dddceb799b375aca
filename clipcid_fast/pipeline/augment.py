"""Augmented views that are replayed, not stored: ``--augment SPEC``, ``--views K``, ``--augment-seed S``.

A view is a crop of the source image (RandomResizedCrop's scale and aspect-ratio ranges, resized back to the
image's own size) and an optional horizontal flip, then the model's usual eval preprocess. Its parameters are a
pure function of (augmentation seed, sample id, view index, image size) (``view_params``): a numpy generator
seeded from those words alone, never a global RNG, so ``embed`` (the teacher's features of every view) and
``train`` (the student's input of the view it draws) make the same crop in any process, order or world size, and
nothing but the seed needs storing.

View 0 is the un-augmented image (the eval preprocess alone): the cache's ``image/`` store stays what a run
without ``--augment`` writes, and a K-view cache holds the clean view among its K. Views 1..K-1 are augmented.

SPEC is comma-separated ``key=value`` in open_clip's ``AugmentationCfg`` words where they fit:
``scale=LO:HI`` (area fraction, 0 < LO <= HI <= 1), ``ratio=LO:HI`` (width/height, 0 < LO <= HI), ``hflip=P``
(flip probability, 0 <= P <= 1). Keys left out take ``DEFAULTS`` (open_clip's train crop: scale 0.9:1.0, ratio
3/4:4/3, no flip).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

# First word of every seeded stream here, so a view never shares a stream with the data or the sample order.
VIEW_STREAM = 0xA06
TRAIN_VIEW_STREAM = 0xA07
CROP_TRIES = 10  # RandomResizedCrop's number of draws before it falls back to the central crop


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.0

    def canonical(self) -> str:
        """The spec as one string, key order and number format fixed: what the cache records and compares."""
        return (
            f"scale={self.scale[0]:g}:{self.scale[1]:g},ratio={self.ratio[0]:g}:{self.ratio[1]:g},hflip={self.hflip:g}"
        )


DEFAULTS = AugmentSpec()


@dataclasses.dataclass(frozen=True)
class ViewParams:
    """A crop box of the source image (pixels) and whether to flip it."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def _bad(flag: str, text: str, why: str) -> ValueError:
    return ValueError(f"{flag} {text!r}: {why} (keys: scale=LO:HI, ratio=LO:HI, hflip=P)")


def _number(flag: str, text: str, value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise _bad(flag, text, f"{value!r} is not a number") from None
    if not math.isfinite(x):
        raise _bad(flag, text, f"{value!r} is not finite")
    return x


def _range(flag: str, text: str, key: str, value: str) -> tuple[float, float]:
    parts = value.split(":")
    if len(parts) != 2:
        raise _bad(flag, text, f"{key} takes LO:HI, got {value!r}")
    lo, hi = (_number(flag, text, p) for p in parts)
    if not 0 < lo <= hi:
        raise _bad(flag, text, f"{key} needs 0 < LO <= HI, got {value!r}")
    if key == "scale" and hi > 1:
        raise _bad(flag, text, f"scale is a fraction of the image's area (HI <= 1), got {value!r}")
    return lo, hi


def parse_spec(text: str, flag: str = "--augment") -> AugmentSpec:
    """``AugmentSpec`` of ``text``; an unknown key, a repeated key or a bad value is one ValueError line naming
    ``flag`` and ``text``."""
    if not isinstance(text, str) or not text.strip():
        raise _bad(flag, str(text), "empty spec")
    fields: dict = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise _bad(flag, text, f"{item.strip()!r} is not key=value")
        if key in fields:
            raise _bad(flag, text, f"{key} given twice")
        if key in ("scale", "ratio"):
            fields[key] = _range(flag, text, key, value)
        elif key == "hflip":
            p = _number(flag, text, value)
            if not 0 <= p <= 1:
                raise _bad(flag, text, f"hflip is a probability in [0, 1], got {value!r}")
            fields[key] = p
        else:
            raise _bad(flag, text, f"unknown key {key!r}")
    return dataclasses.replace(DEFAULTS, **fields)


def _check_ints(**values) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")


def view_params(spec: AugmentSpec, seed: int, sample_id: int, view: int, hw: tuple[int, int]) -> ViewParams:
    """The crop and flip of view ``view`` of sample ``sample_id`` (an image of ``hw`` = (height, width)): a pure
    function of its arguments. View 0 is the whole image unflipped.

    The crop follows RandomResizedCrop's rule: up to ``CROP_TRIES`` draws of an area fraction in ``spec.scale``
    and a log-uniform aspect ratio in ``spec.ratio``; the first box that fits is placed uniformly; if none fits,
    the central box of the largest area whose ratio is clamped into the range."""
    _check_ints(seed=seed, sample_id=sample_id, view=view)
    h, w = (int(x) for x in hw)
    if h < 1 or w < 1:
        raise ValueError(f"hw must be a positive (height, width), got {hw!r}")
    if view == 0:
        return ViewParams(0, 0, h, w, False)
    rng = np.random.default_rng([VIEW_STREAM, int(seed), int(sample_id), int(view)])
    flip = bool(rng.random() < spec.hflip)
    area = h * w
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    for _ in range(CROP_TRIES):
        target = area * rng.uniform(spec.scale[0], spec.scale[1])
        r = math.exp(rng.uniform(log_lo, log_hi))
        cw, ch = round(math.sqrt(target * r)), round(math.sqrt(target / r))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return ViewParams(top, left, ch, cw, flip)
    r = w / h
    if r < spec.ratio[0]:
        cw, ch = w, round(w / spec.ratio[0])
    elif r > spec.ratio[1]:
        cw, ch = round(h * spec.ratio[1]), h
    else:
        cw, ch = w, h
    cw, ch = min(max(cw, 1), w), min(max(ch, 1), h)  # a tiny image: at least one pixel, never past its edge
    return ViewParams((h - ch) // 2, (w - cw) // 2, ch, cw, flip)


def apply_view(image, params: ViewParams):
    """The view of a PIL image (or a [..., H, W] tensor): its crop resized back to the image's size, flipped if
    ``params.flip``. The whole unflipped box returns ``image`` itself (view 0: nothing resampled)."""
    h, w = TF.get_size(image)
    if (params.top, params.left, params.height, params.width, params.flip) == (0, 0, h, w, False):
        return image
    out = TF.resized_crop(image, params.top, params.left, params.height, params.width, [h, w], antialias=True)
    return TF.horizontal_flip(out) if params.flip else out


def train_view(seed: int, epoch: int, sample_id: int, views: int) -> int:
    """The view (of ``views``) that sample ``sample_id`` trains on in epoch ``epoch`` of a run seeded ``seed``:
    uniform, a pure function of its arguments (a resumed run draws the same)."""
    _check_ints(seed=seed, epoch=epoch, sample_id=sample_id)
    return int(np.random.default_rng([TRAIN_VIEW_STREAM, int(seed), int(epoch), int(sample_id)]).integers(views))


@dataclasses.dataclass(frozen=True)
class Views:
    """An augmentation setting (``--augment``, ``--views``, ``--augment-seed``), checked; ``None`` when off."""

    spec: AugmentSpec
    count: int
    seed: int

    def record(self) -> dict:
        """What the cache's metadata records (and a trainer compares)."""
        return {"augment": self.spec.canonical(), "views": self.count, "augment_seed": self.seed}

    def image(self, raw, preprocess, sample_id: int, view: int) -> torch.Tensor:
        """``preprocess`` of view ``view`` of the PIL image ``raw`` of sample ``sample_id``."""
        h, w = TF.get_size(raw)
        return preprocess(apply_view(raw, view_params(self.spec, self.seed, sample_id, view, (h, w))))


def views_of(augment: str, views: int, seed: int, flag: str = "--augment") -> Views | None:
    """The checked setting of the three flags: ``None`` without ``--augment`` (then ``--views`` must be 1)."""
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"--views must be an int >= 1, got {views!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--augment-seed must be an int >= 0, got {seed!r}")
    if not augment:
        if views != 1:
            raise ValueError(f"--views {views} needs --augment SPEC (the views are augmented copies of each image)")
        return None
    spec = parse_spec(augment, flag)
    if views < 2:
        raise ValueError(f"{flag} {augment!r} needs --views >= 2 (view 0 is the un-augmented image), got {views}")
    return Views(spec, views, seed)


class ViewsDataset(torch.utils.data.Dataset):
    """A map-style source (one with ``raw_image``) whose items also carry ``views`` [K-1, 3, H, W]: the source's
    preprocess of views 1..K-1 (view 0 is the item's ``image``). What ``embed --augment`` reads."""

    def __init__(self, ds, views: Views):
        if not hasattr(ds, "raw_image"):
            raise ValueError(f"--augment needs a map-style source (fashion-mnist, csv), got {type(ds).__name__}")
        self.ds, self.views = ds, views

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict:
        item = self.ds[index]
        raw = self.ds.raw_image(index)
        made = [self.views.image(raw, self.ds.preprocess, item["id"], v) for v in range(1, self.views.count)]
        return {**item, "views": torch.stack(made)}
