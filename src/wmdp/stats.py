"""Figures a reviewer accepts: a best point chosen apart from what it reports, and intervals.

Every robustness figure is a mean of per-question correctness (0/1), so everything here works
on matrices of it: `scores[k, i]` is candidate k's correctness on question i (a candidate is a
relearning step, a protocol run, a probe layer, a few-shot context, a suffix).

- `cross_fit_best`: choose the best candidate on one half of the questions, report it on the
  other half, swap the halves, and pool (cross-fitting). The in-sample maximum over many noisy
  candidates is biased upwards, most for models that recover least; it is kept beside the
  cross-fitted figure, labelled, for comparison with papers that report it.
- `bootstrap_ci`, `share_ci`: percentile bootstrap intervals over questions (paired: the same
  resampled questions for every model in a share), and `group_ci` over worlds or seeds.
- `tie`: two figures whose intervals overlap are a tie; nothing "resists" or "beats" unless
  the intervals separate.

    python -c "from wmdp.stats import cross_fit_best; import numpy as np; \
      print(cross_fit_best(np.eye(4)[:3]))"
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95      # every interval's coverage
N_BOOT = 2000     # bootstrap resamples: the interval's ends move by < 0.01 between seeds at 150 questions


@dataclass(frozen=True)
class CrossFit:
    """A best point chosen on one half of the questions and reported on the other."""
    value: float            # cross-fitted: each question reported once, by the choice made without it
    in_sample: float        # the maximum over candidates on all questions (biased upwards)
    in_sample_choice: int   # the candidate that maximum belongs to
    choices: tuple[int, int]  # (chosen on half A -> reported on B, chosen on half B -> reported on A)
    halves: tuple[tuple[int, ...], tuple[int, ...]]
    how: str = "chosen on one half of the questions, reported on the other, halves swapped and pooled"

    def record(self) -> dict:
        return {"value": self.value, "in_sample_max": self.in_sample,
                "in_sample_choice": self.in_sample_choice, "choices": list(self.choices),
                "how": self.how}


def halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of n question indices into two halves (the first has n // 2)."""
    if n < 2:
        raise ValueError(f"cross-fitting needs at least 2 questions, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def cross_fit_best(scores, seed: int = 0, split: tuple | None = None,
                   higher_is_better: bool = True) -> CrossFit:
    """`scores[k, i]`: candidate k's score on question i. Returns the cross-fitted best.

    Ties between candidates go to the lowest index (the earliest step or first run), on every
    half alike. `split` gives the halves explicitly (two index sequences covering the questions);
    otherwise they are drawn with `seed`."""
    s = np.asarray(scores, dtype=float)
    if s.ndim != 2 or s.shape[0] == 0:
        raise ValueError(f"scores must be (candidates, questions), got shape {s.shape}")
    sign = 1.0 if higher_is_better else -1.0
    a, b = (np.asarray(split[0], int), np.asarray(split[1], int)) if split else halves(s.shape[1], seed)
    if len(a) == 0 or len(b) == 0 or not np.array_equal(np.sort(np.concatenate([a, b])),
                                                        np.arange(s.shape[1])):
        raise ValueError("the two halves must be disjoint, non-empty and cover every question")
    pick_a = int(np.argmax(sign * s[:, a].mean(axis=1)))
    pick_b = int(np.argmax(sign * s[:, b].mean(axis=1)))
    total = s[pick_a, b].sum() + s[pick_b, a].sum()
    whole = s.mean(axis=1)
    best = int(np.argmax(sign * whole))
    return CrossFit(value=float(total / s.shape[1]), in_sample=float(whole[best]),
                    in_sample_choice=best, choices=(pick_a, pick_b),
                    halves=(tuple(int(i) for i in a), tuple(int(i) for i in b)))


def reported(scores, fit: CrossFit) -> np.ndarray:
    """Per question, its score under the candidate chosen without it: `fit.choices[0]` (chosen
    on half A) on half B's questions, `fit.choices[1]` on half A's. Its mean is `fit.value`."""
    s = np.asarray(scores, dtype=float)
    a, b = (np.asarray(h, int) for h in fit.halves)
    out = np.empty(s.shape[1])
    out[b] = s[fit.choices[0], b]
    out[a] = s[fit.choices[1], a]
    return out


def _percentile(samples: np.ndarray, level: float) -> tuple[float, float]:
    if np.isnan(samples).all():  # e.g. a share whose gap is zero in every resample
        return float("nan"), float("nan")
    lo, hi = np.nanpercentile(samples, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_ci(correct, n_boot: int = N_BOOT, level: float = LEVEL,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean over questions."""
    x = np.asarray(correct, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty vector of per-question scores")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    return _percentile(x[idx].mean(axis=1), level)


def share_of_gap(attacked: float, unlearned: float, base: float) -> float:
    """(attacked - unlearned) / (base - unlearned): the share of the removed knowledge recovered."""
    gap = base - unlearned
    return float("nan") if gap == 0 else (attacked - unlearned) / gap


def share_ci(attacked, unlearned, base, n_boot: int = N_BOOT, level: float = LEVEL,
             seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap of the recovered share: the three models' per-question correctness on
    the same resampled questions. Resamples whose gap is zero are dropped (NaN)."""
    rows = [np.asarray(v, dtype=float) for v in (attacked, unlearned, base)]
    n = rows[0].size
    if n == 0 or any(r.shape != (n,) for r in rows):
        raise ValueError("share_ci needs three per-question vectors of one non-zero length")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    att, unl, bas = (r[idx].mean(axis=1) for r in rows)
    gap = bas - unl
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = np.where(gap != 0, (att - unl) / np.where(gap != 0, gap, 1.0), np.nan)
    return _percentile(shares, level)


def group_ci(values, n_boot: int = N_BOOT, level: float = LEVEL,
             seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile bootstrap interval over groups (worlds, seeds): (mean, lo, hi).
    With one group the interval is that value alone, and says nothing about spread."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("group_ci needs a non-empty vector, one value per world or seed")
    if x.size == 1:
        return float(x[0]), float(x[0]), float(x[0])
    lo, hi = bootstrap_ci(x, n_boot=n_boot, level=level, seed=seed)
    return float(x.mean()), lo, hi


def tie(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Two intervals (lo, hi) that overlap: the figures cannot be told apart."""
    return not (a[1] < b[0] or b[1] < a[0])


def compare_word(a: tuple[float, float], b: tuple[float, float]) -> str:
    """'lower', 'higher' or 'tie' for interval a against interval b."""
    if tie(a, b):
        return "tie"
    return "lower" if a[1] < b[0] else "higher"
