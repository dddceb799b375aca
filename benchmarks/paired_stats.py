"""Seed statistics of the recipe study: mean ± standard error, and paired (same-seed) differences.

Why paired: the training seed fixes the student's initialisation and the data order, and seed-to-seed spread
(about ±1 point of zero-shot top-1 here) is shared by the recipes trained with that seed; the difference of
two variants on the same seed cancels that shared part, so its standard error is what a ranking needs.

``se`` is the sample standard deviation (ddof = 1) over sqrt(n); ``t`` = mean / se, with n − 1 degrees of freedom
(|t| > 2.78 at n = 5 is p < 0.05, two-sided). With one seed the standard errors are NaN.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Summary:
    mean: float
    se: float
    n: int


def summarize(values) -> Summary:
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("summarize: no values")
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return Summary(mean, math.nan, n)
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return Summary(mean, math.sqrt(var / n), n)


def paired(a: dict, b: dict) -> Summary:
    """a − b over the seeds both have (``{seed: value}`` each); ValueError when they share none."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("paired: no common seeds")
    return summarize(a[s] - b[s] for s in seeds)


def t_value(s: Summary) -> float:
    if math.isnan(s.se):
        return math.nan
    if s.se == 0:
        return 0.0 if s.mean == 0 else math.copysign(math.inf, s.mean)
    return s.mean / s.se


def best_other(means: dict, label: str, recipe_of: dict, exclude=("baseline",)) -> str | None:
    """The variant with the highest mean among those of another recipe than ``label``'s (``exclude``: recipes never
    counted as the best other, the student alone); None when there is none."""
    others = [v for v in means if recipe_of[v] != recipe_of[label] and recipe_of[v] not in exclude]
    return max(others, key=lambda v: means[v]) if others else None
