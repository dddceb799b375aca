"""What every source shares: the item layout, the tokenizer memo, image decoding with clear errors, collate."""

from __future__ import annotations

import io
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("clipcid_fast.pipeline.data")

# The image extensions img2dataset writes (and open_clip_train reads), in the order they are looked up.
IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")

NO_LABEL = -1

# First word of every seeded stream a shuffle draws from, so it never coincides with a data_seed stream.
SHUFFLE_STREAM = 0x5EED


class TokenMemo:
    """Caption string -> token row, remembered.

    Tokenising is most of an item's cost when the image is small, and an offline corpus has a few dozen
    distinct captions; web captions are mostly unique, so the memo is bounded (least recently used goes).
    """

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor], max_entries: int = 4096):
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self._rows: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, caption: str) -> torch.Tensor:
        row = self._rows.get(caption)
        if row is None:
            row = self.tokenizer([caption])[0].clone()
            self._rows[caption] = row
            if len(self._rows) > self.max_entries:
                self._rows.popitem(last=False)
        else:
            self._rows.move_to_end(caption)
        return row


def collate(items: Sequence[dict]) -> dict:
    """Stack a list of items into a batch: image [B,3,H,W], text [B,L], id / label int64 [B], caption list[str]
    (and views [B,K-1,3,H,W] where the items carry them)."""
    if not items:
        raise ValueError("collate: got an empty list of items")
    out = {
        "image": torch.stack([it["image"] for it in items]),
        "text": torch.stack([it["text"] for it in items]),
        "id": torch.tensor([it["id"] for it in items], dtype=torch.int64),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
        "caption": [it["caption"] for it in items],
    }
    if "views" in items[0]:  # embed --augment: each item's augmented views [K-1, 3, H, W] (augment.ViewsDataset)
        out["views"] = torch.stack([it["views"] for it in items])
    return out


def decode_image(data: bytes | str, where: str) -> Image.Image:
    """Open and fully decode an image (a path or its bytes); any failure is a ValueError naming ``where``.

    ``load()`` forces the decode here: PIL opens lazily, and a truncated file would otherwise fail later,
    inside the preprocess, with a message that names no file.
    """
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        with Image.open(source) as img:
            img.load()
            return img.copy()  # detached from the file, which the with-block closes
    except FileNotFoundError:
        raise ValueError(f"{where}: image file not found") from None
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError...)
        raise ValueError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None


def check_rank(rank: int, world_size: int) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")


def seeded_order(n: int, shuffle_seed: int | None) -> np.ndarray | None:
    """The fixed index permutation a map-style set applies when given a shuffle seed (None: natural order)."""
    if shuffle_seed is None:
        return None
    return np.random.default_rng([SHUFFLE_STREAM, int(shuffle_seed)]).permutation(n)
