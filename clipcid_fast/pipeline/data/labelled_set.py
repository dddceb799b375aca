"""A user's labelled image set for zero-shot and the linear probe: class folders or a CSV, class names, templates.

- **class folders** (torchvision ``ImageFolder``'s layout, e.g. ImageNet val): ``root/<class>/<image files>``;
  the classes are the sub-folders in sorted order (ImageFolder's numbering), the files those ImageFolder finds
  (its extensions, sub-folders followed, sorted);
- **a CSV**: an image-path column (``csv_img_key``, default ``filepath``; relative paths from the CSV's folder)
  and a ``label`` column, separated by ``csv_separator`` (default tab), so ``export-data``'s CSV is one.
  Integer labels index the class-names file (which is then required); any other labels are class keys,
  numbered in sorted order as folders are;
- **class names** (``--classnames FILE``, CLIP_benchmark's ``classnames.txt``): one a line, in class order;
  default: the class keys (folder names), which suits folders named by class;
- **templates** (``--templates FILE``, CLIP_benchmark's format): one a line, each containing ``{c}``;
  default: the project's caption templates (``fashion_mnist.TEMPLATES``).

Items are ``{"image": FloatTensor[3,H,W], "label": int}`` (``collate_labelled`` stacks them): a labelled set
has no captions. Bad input (a missing path, an empty class folder, a class-names file whose line count
differs from the classes, a template without ``{c}``, an image that does not decode) is a ValueError naming
the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ._common import decode_image
from .fashion_mnist import TEMPLATES

LABEL_COLUMN = "label"
PLACEHOLDER = "{c}"
_INT = re.compile(r"-?\d+")


def default_templates() -> list[str]:
    """The project's caption templates in CLIP_benchmark's spelling (``{c}``), so rendering either gives the
    same prompt strings."""
    return [t.replace("{}", PLACEHOLDER) for t in TEMPLATES]


def render(template: str, classname: str) -> str:
    # replace, not str.format: a template may hold other braces, and CLIP_benchmark's files use {c} only
    return template.replace(PLACEHOLDER, classname)


def _read_lines(path: str, flag: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file (trailing blank lines dropped, an interior one is an error)."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path!r}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f.read().splitlines()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path!r}: not UTF-8 text ({e})") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ValueError(f"{flag} {path!r}: the file is empty")
    blank = next((i for i, line in enumerate(lines) if not line), None)
    if blank is not None:
        raise ValueError(f"{flag} {path!r}: line {blank + 1} is empty (one entry a line)")
    return lines


def read_classnames(path: str) -> list[str]:
    """``--classnames FILE``: one class name a line, in class order."""
    return _read_lines(path, "--classnames")


def read_templates(path: str) -> list[str]:
    """``--templates FILE``: one template a line, each containing ``{c}`` (where the class name goes)."""
    lines = _read_lines(path, "--templates")
    for i, line in enumerate(lines):
        if PLACEHOLDER not in line:
            raise ValueError(f"--templates {path!r}: line {i + 1} ({line!r}) has no {PLACEHOLDER} for the class name")
    return lines


class LabelledSet(Dataset):
    """Map-style labelled images (see the module docstring). ``like``: another set (the evaluation set) whose
    classes number this one's, so a probe's train split and its test split agree: a class key here that is not
    there is an error, and integer labels must be below its class count."""

    def __init__(self, path: str, preprocess, *, flag: str, classnames: str | None = None,
                 templates: str | None = None, csv_separator: str = "\t", csv_img_key: str = "filepath",
                 like: LabelledSet | None = None):  # fmt: skip
        self.path, self.flag, self.preprocess = path, flag, preprocess
        if not path or not os.path.exists(path):
            raise ValueError(f"{flag} {path!r}: no such file or folder (class folders or a labelled CSV)")
        names = read_classnames(classnames) if classnames else None
        self.templates = read_templates(templates) if templates else default_templates()
        self.classnames_file, self.templates_file = classnames, templates
        if os.path.isdir(path):
            self.kind = "class-folders"
            self.files, self.labels, self.keys = self._folders(like)
        else:
            self.kind = "csv"
            self.files, self.labels, self.keys = self._csv(csv_separator, csv_img_key, like, names)
        if not len(self.files):
            raise ValueError(f"{flag} {path!r}: no images")
        n_classes = len(self.keys) if self.keys is not None else (like.num_classes if like else len(names))
        if names is not None and len(names) != n_classes:
            raise ValueError(f"--classnames {classnames!r}: {len(names)} lines, but {flag} {path!r} has {n_classes} "
                             f"classes (one class name a line, in {self._order()} order)")  # fmt: skip
        if like is not None:  # one class list for both splits of a probe: the evaluation set's
            self.classnames, self.templates = like.classnames, like.templates
        else:
            self.classnames = names if names is not None else list(self.keys)
        self.num_classes = n_classes
        self.labels.flags.writeable = False

    def _order(self) -> str:
        return "sorted folder-name" if self.kind == "class-folders" else "sorted label"

    def _own_keys(self, like, found: list[str]) -> list[str]:
        """The class keys that number this set: its own (sorted), or ``like``'s, which must hold them all."""
        if like is None:
            return found
        if like.keys is None:
            raise ValueError(f"{self.flag} {self.path!r}: its classes are named, but the evaluation set "
                             f"{like.path!r} has integer labels; give both integer labels or both names")  # fmt: skip
        known = set(like.keys)
        unknown = next((k for k in found if k not in known), None)
        if unknown is not None:
            raise ValueError(f"{self.flag} {self.path!r}: class {unknown!r} is not a class of the evaluation set "
                             f"{like.path!r}")  # fmt: skip
        return list(like.keys)

    def _folders(self, like):
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        try:
            found, _ = find_classes(self.path)
        except FileNotFoundError:
            raise ValueError(
                f"{self.flag} {self.path!r}: no class folders (expected {self.path}/<class>/<images>)"
            ) from None
        keys = self._own_keys(like, found)
        index = {k: i for i, k in enumerate(keys)}
        samples = make_dataset(self.path, {k: index[k] for k in found}, extensions=IMG_EXTENSIONS, allow_empty=True)
        present = {label for _, label in samples}
        empty = next((k for k in found if index[k] not in present), None)
        if empty is not None:
            folder = os.path.join(self.path, empty)
            raise ValueError(f"{self.flag} {self.path!r}: class folder {folder!r} holds no image "
                             f"({', '.join(IMG_EXTENSIONS)})")  # fmt: skip
        files = [f for f, _ in samples]
        return files, np.array([label for _, label in samples], dtype=np.int64), keys

    def _csv(self, sep, img_key, like, names):
        where = f"{self.flag} {self.path!r}"
        try:
            frame = pd.read_csv(self.path, sep=sep, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise ValueError(f"{where}: cannot parse as CSV with separator {sep!r} ({e})") from None
        for key in (img_key, LABEL_COLUMN):
            if key not in frame.columns:
                raise ValueError(f"{where}: no column {key!r}; the columns are {list(frame.columns)}")
        root = os.path.dirname(os.path.abspath(self.path))
        files = [p if os.path.isabs(p) else os.path.join(root, p) for p in frame[img_key].tolist()]
        for row, f in enumerate(files):
            if not os.path.isfile(f):
                raise ValueError(f"{where}: row {row}: image file {f!r} not found")
        raw = [v.strip() for v in frame[LABEL_COLUMN].tolist()]
        if raw and all(_INT.fullmatch(v) for v in raw):  # integer labels index the class names
            labels = np.array([int(v) for v in raw], dtype=np.int64)
            n = like.num_classes if like is not None else (len(names) if names is not None else None)
            if n is None:
                raise ValueError(f"{where}: integer labels need --classnames FILE (label i names line i + 1)")
            bad = np.flatnonzero((labels < 0) | (labels >= n))
            if bad.size:
                r = int(bad[0])
                raise ValueError(f"{where}: row {r}: label {raw[r]} is outside [0, {n}) ({n} classes)")
            return files, labels, (like.keys if like is not None else None)
        keys = self._own_keys(like, sorted(set(raw)))
        index = {k: i for i, k in enumerate(keys)}
        return files, np.array([index[v] for v in raw], dtype=np.int64), keys

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        path = self.files[index]
        image = decode_image(path, f"{self.flag} {self.path!r}: {path}")
        return {"image": self.preprocess(image), "label": int(self.labels[index])}

    def prompts(self) -> list[list[str]]:
        """Per class (in label order), its prompt for every template."""
        return [[render(t, name) for t in self.templates] for name in self.classnames]

    def summary(self) -> dict:
        return {
            "dataset": self.kind,
            "path": self.path,
            "num_samples": len(self),
            "num_classes": self.num_classes,
            "classnames": self.classnames_file or ("folder names" if self.kind == "class-folders" else "labels"),
            "templates": self.templates_file or "default",
        }


def collate_labelled(items: Sequence[dict]) -> dict:
    """Stack items into a batch: image [B,3,H,W], label int64 [B]."""
    if not items:
        raise ValueError("collate: got an empty list of items")
    return {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
    }
