"""The variants of the recipe study (``recipe_study.py``): a recipe plus settings, spelled on the command line.

Syntax: ``RECIPE`` or ``RECIPE:KEY=VALUE[,KEY=VALUE...]``, e.g. ``cid:cd_margin=0.2,centre_lr_mult=0``. KEY is

* a field of ``RecipeWeights`` that the recipe reads (``recipes.RECIPES[recipe].weights``; ``-`` and ``_`` are
  the same), e.g. ``cd_margin``, ``centre_lr_mult``, ``id_student_text`` (``true`` / ``false``);
* for the recipes that read pseudo-classes (cid) also the data stages they train on: ``balance_eps``,
  ``balance_keep`` (hard / easy / random) and ``n_classes``.

A KEY the recipe does not read is refused (a ValueError naming the variant), so no two labels name the same run.
Every run of a variant lives in a folder named by the digest of the *resolved* settings (every weight the recipe
reads and, for cid, its data stages), not by the spelling: ``cid:cd_margin=0.2`` and ``cid`` after a change of the
default to 0.2 share their runs, and a run is never reused under settings it was not trained with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from clipcid_fast.pipeline.balance import KEEP_OPTIONS
from clipcid_fast.pipeline.config import DemoConfig, RecipeWeights
from clipcid_fast.recipes import RECIPES

STAGE_KEYS = {"balance_eps": float, "balance_keep": str, "n_classes": int}
"""The data-stage settings a pseudo-class recipe's variant may set (fields of ``DemoConfig``)."""

_WEIGHT_TYPES = {f.name: f.type for f in dataclasses.fields(RecipeWeights)}


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str  # the canonical spelling: recipe, then its settings sorted by key
    recipe: str
    weights: dict  # RecipeWeights overrides
    stages: dict  # DemoConfig data-stage overrides (balance_eps, balance_keep, n_classes)

    def config(self, base: DemoConfig) -> DemoConfig:
        """``base`` with this variant's settings."""
        return dataclasses.replace(base, weights=dataclasses.replace(base.weights, **self.weights), **self.stages)

    def resolved(self, base: DemoConfig) -> dict:
        """Every setting the variant's runs depend on beyond the regime's: the digest of :meth:`run_key`."""
        cfg = self.config(base)
        spec = RECIPES[self.recipe]
        out = {"recipe": self.recipe, "weights": {k: getattr(cfg.weights, k) for k in spec.weights}}
        if spec.labels:
            out["stages"] = {"balance_k": cfg.balance_k, **{k: getattr(cfg, k) for k in STAGE_KEYS}}
        return out

    def run_key(self, base: DemoConfig) -> str:
        """The folder of this variant's runs: ``<recipe>-<digest of the resolved settings>``."""
        blob = json.dumps(self.resolved(base), sort_keys=True).encode()
        return f"{self.recipe}-{hashlib.sha256(blob).hexdigest()[:10]}"


def _value(text: str, kind, where: str):
    if kind in (bool, "bool"):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{where}: expected true or false, got {text!r}")
    try:
        return {"float": float, "int": int, "str": str}.get(kind, kind)(text)
    except ValueError:
        raise ValueError(f"{where}: not a {getattr(kind, '__name__', kind)}: {text!r}") from None


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return f"{v:g}" if isinstance(v, float) else str(v)


def parse_variant(spec: str) -> Variant:
    """One ``--variant`` string (module docstring) -> a Variant; ValueError naming the string on bad input."""
    recipe, _, rest = spec.strip().partition(":")
    if recipe not in RECIPES:
        raise ValueError(f"--variant {spec!r}: recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    reads = RECIPES[recipe].weights
    weights, stages = {}, {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, text = item.partition("=")
        key = key.strip().replace("-", "_")
        where = f"--variant {spec!r}, {key}"
        if not eq or not text.strip():
            raise ValueError(f"--variant {spec!r}: {item!r} is not KEY=VALUE")
        if key in weights or key in stages:
            raise ValueError(f"--variant {spec!r}: {key} given twice")
        if key in reads:
            weights[key] = _value(text.strip(), _WEIGHT_TYPES[key], where)
        elif key in STAGE_KEYS and RECIPES[recipe].labels:
            stages[key] = _value(text.strip(), STAGE_KEYS[key], where)
        else:
            allowed = list(reads) + (list(STAGE_KEYS) if RECIPES[recipe].labels else [])
            raise ValueError(f"--variant {spec!r}: {recipe} does not read {key!r} (it reads: {', '.join(allowed)})")
    if stages.get("balance_keep", "hard") not in KEEP_OPTIONS:
        raise ValueError(f"--variant {spec!r}: balance_keep must be one of {', '.join(KEEP_OPTIONS)}")
    settings = {**weights, **stages}
    label = recipe + (":" + ",".join(f"{k}={_fmt(settings[k])}" for k in sorted(settings)) if settings else "")
    return Variant(label, recipe, weights, stages)


def parse_variants(specs: list[str]) -> list[Variant]:
    """Several ``--variant`` strings; a label given twice (after canonical spelling) is refused."""
    out = [parse_variant(s) for s in specs]
    labels = [v.label for v in out]
    dup = sorted({label for label in labels if labels.count(label) > 1})
    if dup:
        raise ValueError(f"--variant: {dup[0]!r} given twice")
    return out
