"""wmdp.stats: cross-fitted best points against hand-computed values, and intervals against
their textbook counterparts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wmdp.stats import (bootstrap_ci, compare_word, cross_fit_best, group_ci, halves,
                        share_ci, share_of_gap, tie)

A, B = (0, 1, 2, 3), (4, 5, 6, 7)


def test_hand_built_curve_in_sample_and_cross_fitted_differ():
    # three checkpoints of a relearning curve, eight questions; halves A = 0-3, B = 4-7
    scores = [[1, 0, 0, 0, 0, 0, 0, 0],   # A 0.25, B 0.00, all 1/8
              [1, 1, 1, 0, 0, 0, 0, 0],   # A 0.75, B 0.00, all 3/8  <- in-sample best
              [0, 0, 0, 0, 1, 1, 0, 0]]   # A 0.00, B 0.50, all 2/8
    fit = cross_fit_best(scores, split=(A, B))
    assert fit.in_sample == 3 / 8 and fit.in_sample_choice == 1
    # chosen on A: step 1, which scores 0 on B; chosen on B: step 2, which scores 0 on A
    assert fit.choices == (1, 2)
    assert fit.value == 0.0
    assert "reported on the other" in fit.how


def test_hand_built_curve_nonzero_cross_fit_and_lowest_index_on_ties():
    scores = [[1, 1, 0, 0, 1, 0, 0, 0],   # A 0.50, B 0.25, all 3/8
              [0, 0, 0, 0, 1, 1, 1, 0]]   # A 0.00, B 0.75, all 3/8 (a tie: step 0 wins)
    fit = cross_fit_best(scores, split=(A, B))
    assert fit.in_sample == 3 / 8 and fit.in_sample_choice == 0
    assert fit.choices == (0, 1)
    assert fit.value == (1 + 0) / 8  # step 0 on B: one right; step 1 on A: none


def test_lower_is_better_chooses_the_minimum():
    scores = [[1, 1, 1, 1], [0, 1, 0, 1]]
    fit = cross_fit_best(scores, split=((0, 1), (2, 3)), higher_is_better=False)
    assert fit.in_sample_choice == 1 and fit.in_sample == 0.5
    assert fit.choices == (1, 1) and fit.value == 0.5


def test_cross_fitting_removes_the_selection_bias_of_the_maximum():
    """Thirty noisy checkpoints of a model that recovers nothing (every one at 0.30): the
    in-sample maximum reports far above 0.30, the cross-fitted figure does not."""
    rng = np.random.default_rng(0)
    ins, cross = [], []
    for t in range(200):
        s = (rng.random((30, 150)) < 0.30).astype(float)
        fit = cross_fit_best(s, seed=t)
        ins.append(fit.in_sample)
        cross.append(fit.value)
    assert np.mean(ins) > 0.35                      # about 0.37 here: the bias
    assert abs(np.mean(cross) - 0.30) < 0.006       # unbiased within Monte Carlo error


def test_halves_split_every_question_once():
    a, b = halves(7, seed=3)
    assert len(a) == 3 and len(b) == 4
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(7))
    assert (halves(7, seed=3)[0] == a).all()


@pytest.mark.parametrize("split", [((0, 1), (1, 2, 3)), ((0,), (1, 2)), ((), (0, 1, 2, 3)),
                                   ((0, 0), (1, 2)), ((0, 1), (2, 9))])
def test_bad_halves_are_refused(split):
    with pytest.raises(ValueError, match="halves"):
        cross_fit_best(np.ones((2, 4)), split=split)


def test_bootstrap_ci_matches_the_normal_interval():
    rng = np.random.default_rng(1)
    x = (rng.random(150) < 0.3).astype(float)
    lo, hi = bootstrap_ci(x)
    p = x.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / x.size)
    assert lo < p < hi
    assert abs((hi - lo) - 2 * half) < 0.02
    assert abs((lo + hi) / 2 - p) < 0.01


def test_share_ci_at_its_ends_and_in_between():
    rng = np.random.default_rng(2)
    base = np.ones(100)
    unlearned = (rng.random(100) < 0.25).astype(float)
    assert share_ci(unlearned, unlearned, base) == (0.0, 0.0)   # nothing recovered
    assert share_ci(base, unlearned, base) == (1.0, 1.0)        # everything recovered
    half = np.where(rng.random(100) < 0.5, base, unlearned)
    point = share_of_gap(half.mean(), unlearned.mean(), base.mean())
    lo, hi = share_ci(half, unlearned, base)
    assert lo < point < hi and hi - lo < 0.35


def test_share_of_gap_by_hand():
    assert share_of_gap(0.5, 0.25, 1.0) == pytest.approx(1 / 3)
    assert math.isnan(share_of_gap(0.5, 0.7, 0.7))


def test_group_ci_over_worlds():
    assert group_ci([0.3]) == (0.3, 0.3, 0.3)
    mean, lo, hi = group_ci([0.1, 0.2, 0.3, 0.4, 0.5])
    assert mean == pytest.approx(0.3) and 0.1 <= lo < 0.3 < hi <= 0.5


def test_overlapping_intervals_are_a_tie():
    assert tie((0.0, 0.1), (0.1, 0.2)) and compare_word((0.0, 0.1), (0.05, 0.3)) == "tie"
    assert compare_word((0.0, 0.1), (0.2, 0.3)) == "lower"
    assert compare_word((0.4, 0.5), (0.2, 0.3)) == "higher"


def test_relearn_chooses_one_step_for_all_tasks_on_the_other_half():
    """relearn.choose_step on a hand-built curve: two tasks, three steps; the pooled questions
    halved with the seed; every figure recomputed here from the halves."""
    from wmdp.audit.relearn import choose_step

    curve = [{"step": 0, "correct": {"a": [0, 0, 0, 0], "b": [0, 0, 0, 0]}},
             {"step": 10, "correct": {"a": [1, 1, 0, 0], "b": [0, 0, 1, 0]}},
             {"step": 20, "correct": {"a": [0, 0, 1, 1], "b": [1, 1, 0, 1]}}]
    kept = {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3]}
    out = choose_step(curve, kept, seed=5)
    scores = np.array([[p["correct"][t][i] for t in "ab" for i in range(4)] for p in curve])
    a, b = halves(8, seed=5)
    pick_a = int(np.argmax(scores[:, a].mean(1)))   # chosen on a, reported on b
    pick_b = int(np.argmax(scores[:, b].mean(1)))
    rep = np.empty(8)
    rep[b], rep[a] = scores[pick_a, b], scores[pick_b, a]
    assert out["steps"] == [curve[pick_a]["step"], curve[pick_b]["step"]]
    assert out["by_task"] == {"a": rep[:4].mean(), "b": rep[4:].mean()}
    assert out["in_sample_step"] == 20                       # 5/8 against 3/8
    assert out["in_sample_by_task"] == {"a": 0.5, "b": 0.75}  # one step for both tasks
    assert "other" in out["how"] and "one step for all tasks" in out["how"]
    assert choose_step(curve, {"a": [], "b": []}, 0)["how"] == "no question counted"
