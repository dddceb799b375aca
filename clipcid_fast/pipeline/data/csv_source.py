"""open_clip CSV source: one row per sample, an image-path column and a caption column (open_clip_train's format).

- columns: ``cfg.csv_img_key`` (default ``filepath``) and ``cfg.csv_caption_key`` (default ``title``), separated by
  ``cfg.csv_separator`` (default tab); optional ``id`` (int64 sample id; default: the row number) and ``label``
  (int class index; default -1);
- image paths are absolute or relative to the CSV's folder;
- rows are numbered from 0, header not counted (so without an ``id`` column a sample's id is its row number);
- bad rows: a missing image file is found when the set is built (one ``stat`` per row); a corrupt image when
  its item is read. With ``cfg.skip_bad`` the build decodes every image once and drops the rows that fail, so
  ``len()`` counts only good samples and no id repeats; ``ds.skipped`` says how many went (also logged).
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from ._common import NO_LABEL, TokenMemo, decode_image, log, seeded_order

ID_COLUMN = "id"
LABEL_COLUMN = "label"


def _int_column(frame: pd.DataFrame, column: str, csv_path: str) -> np.ndarray:
    values = frame[column].tolist()
    out = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values):
        try:
            out[row] = int(str(value).strip())
        except ValueError:
            raise ValueError(f"{csv_path}: row {row}: column {column!r} holds {value!r}, not an integer") from None
    return out


def read_csv_table(cfg) -> tuple[pd.DataFrame, str]:
    """The CSV as strings, with its required columns checked; returns the frame and the CSV's path."""
    csv_path = cfg.train_data
    if not csv_path:
        raise ValueError("train_data must name the CSV file when dataset is 'csv' (got none)")
    if not os.path.isfile(csv_path):
        raise ValueError(f"train_data {csv_path!r}: CSV file not found")
    try:
        # Every column as text: a caption like "1984" stays a string, an empty cell stays "" (not NaN).
        frame = pd.read_csv(csv_path, sep=cfg.csv_separator, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{csv_path}: cannot parse as CSV with separator {cfg.csv_separator!r} ({e})") from None
    for flag, key in (("csv_img_key", cfg.csv_img_key), ("csv_caption_key", cfg.csv_caption_key)):
        if key not in frame.columns:
            hint = " (is csv_separator right?)" if len(frame.columns) == 1 else ""
            raise ValueError(f"{csv_path}: no column {key!r} ({flag}); the columns are {list(frame.columns)}{hint}")
    return frame, csv_path


class CsvDataset(Dataset):
    """Map-style dataset over an open_clip CSV; ``ds[i]`` is row ``order[i]`` of the kept rows (row order if none)."""

    def __init__(self, cfg, preprocess, tokenizer, *, shuffle_seed: int | None = None):
        frame, csv_path = read_csv_table(cfg)
        self.csv_path = csv_path
        self.img_key = cfg.csv_img_key
        root = os.path.dirname(os.path.abspath(csv_path))
        raw_paths = frame[cfg.csv_img_key].tolist()
        paths = [p if os.path.isabs(p) else os.path.join(root, p) for p in raw_paths]
        captions = frame[cfg.csv_caption_key].tolist()
        n = len(frame)
        ids = _int_column(frame, ID_COLUMN, csv_path) if ID_COLUMN in frame.columns else np.arange(n, dtype=np.int64)
        labels = (
            _int_column(frame, LABEL_COLUMN, csv_path)
            if LABEL_COLUMN in frame.columns
            else np.full(n, NO_LABEL, dtype=np.int64)
        )
        _check_unique_ids(ids, csv_path)

        keep = []
        for row in range(n):
            try:
                if not os.path.isfile(paths[row]):
                    raise ValueError(f"{self._where(row, raw_paths[row])}: image file not found ({paths[row]})")
                if cfg.skip_bad:
                    decode_image(paths[row], self._where(row, raw_paths[row]))
            except ValueError as e:
                if not cfg.skip_bad:
                    raise
                log.warning("skipping %s", e)
                continue
            keep.append(row)
        self.skipped = n - len(keep)
        if self.skipped:
            log.warning("%s: skipped %d of %d rows (skip_bad)", csv_path, self.skipped, n)
        if not keep:
            raise ValueError(f"{csv_path}: no usable rows (of {n})")
        rows = np.asarray(keep, dtype=np.int64)
        self.rows = rows  # the CSV row of each kept sample
        self.raw_paths = [raw_paths[r] for r in rows]
        self.paths = [paths[r] for r in rows]
        self.captions = [captions[r] for r in rows]
        self.ids = ids[rows]
        self.labels = labels[rows]
        self.preprocess = preprocess
        self.tokens = TokenMemo(tokenizer)
        self.order = seeded_order(len(rows), shuffle_seed)

    def _where(self, row: int, raw_path: str) -> str:
        return f"{self.csv_path}: row {row} ({self.img_key}={raw_path!r})"

    def __len__(self) -> int:
        return len(self.rows)

    def _sample(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return int(self.order[index]) if self.order is not None else int(index) % len(self)

    def _decode(self, i: int):
        return decode_image(self.paths[i], self._where(int(self.rows[i]), self.raw_paths[i]))

    def raw_image(self, index: int):
        """Item ``index``'s decoded image before the preprocess (PIL): what an augmented view crops."""
        return self._decode(self._sample(index))

    def __getitem__(self, index: int) -> dict:
        i = self._sample(index)
        caption = self.captions[i]
        return {
            "image": self.preprocess(self._decode(i)),
            "text": self.tokens(caption),
            "id": int(self.ids[i]),
            "caption": caption,
            "label": int(self.labels[i]),
        }


def _check_unique_ids(ids: np.ndarray, csv_path: str) -> None:
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if dup.size:
        a, b = int(order[dup[0]]), int(order[dup[0] + 1])
        raise ValueError(f"{csv_path}: rows {a} and {b} have the same {ID_COLUMN} {int(ids[a])} (ids must be unique)")
