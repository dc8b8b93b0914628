import numpy as np
import pytest

from routenlp.bench import metrics as M


def test_upper_hull_is_non_decreasing_and_concave():
    pts = [(0, 0.5), (1, 0.4), (2, 0.9), (1.5, 0.6), (3, 0.95), (4, 0.9)]
    assert M.upper_hull(pts) == [(0, 0.5), (2, 0.9), (3, 0.95)]


def test_aiq_of_known_shapes():
    # A single point at the cheapest cost: flat line over the range.
    assert M.aiq([(1.0, 0.8)], 1.0, 3.0) == pytest.approx(0.8)
    # Linear from (1, 0.5) to (3, 0.9): mean 0.7.
    assert M.aiq([(1.0, 0.5), (3.0, 0.9)], 1.0, 3.0) == pytest.approx(0.7, abs=1e-4)
    # A point only at the dearest end has no support before it.
    assert M.aiq([(3.0, 0.9)], 1.0, 3.0) == pytest.approx(0.0, abs=1e-3)
    # Dominated points do not change the area.
    assert M.aiq([(1.0, 0.5), (2.0, 0.4), (3.0, 0.9)], 1.0, 3.0) == pytest.approx(0.7, abs=1e-4)


def test_operating_point_uses_calibration_points_only():
    cal = [(1.0, 0.5), (2.0, 0.68), (3.0, 0.7)]
    assert M.operating_point(cal, ref_quality=0.7, target=0.97) == 1
    assert M.operating_point(cal, ref_quality=0.7, target=1.0) == 2
    assert M.operating_point(cal, ref_quality=0.9, target=0.97) is None


def test_mean_ci():
    m, (lo, hi) = M.mean_ci([0.1, 0.2, 0.3])
    assert m == pytest.approx(0.2) and lo < 0.2 < hi and hi - 0.2 == pytest.approx(0.2 - lo)
    assert M.mean_ci([0.5]) == (0.5, [0.5, 0.5])
    assert M.mean_ci([None, 0.4])[0] == pytest.approx(0.4)


def test_violations_count_only_answers_accepted_below_the_reference():
    tier = np.array([0, 0, 0, 1, 2, 2, 0])
    accepted = np.array([True, True, True, True, True, True, False])  # last: a fallback, outside the guarantee
    quality = np.array([1, 0, 1, 1, 0, 1, 0])
    tasks = np.zeros(7, dtype=int)
    v = M.violations(tier, accepted, quality, tasks, n_tiers=3, risk=0.2)
    assert v["violation_rate"] == pytest.approx(1 / 4)  # tier 0: 1 bad of 3, tier 1: 0 of 1; reference excluded
    assert v["unacceptable_share"] == pytest.approx(1 / 7)
    assert v["cells_over_risk"] == pytest.approx(1 / 2)  # tier 0 (1/3 > 0.2) over, tier 1 not


def test_violations_all_requests_divide_by_the_requests_reaching_the_tier():
    # 6 requests; tier 0 is called for the first 5 (the 6th starts at the reference), accepts 3 of them (1 bad)
    tier = np.array([0, 0, 0, 1, 1, 1])
    accepted = np.array([True, True, True, True, True, True])
    quality = np.array([1, 0, 1, 1, 1, 0])
    called = np.array([[1, 0], [1, 0], [1, 0], [1, 1], [1, 1], [0, 1]], dtype=bool)
    tasks = np.zeros(6, dtype=int)
    v = M.violations(tier, accepted, quality, tasks, n_tiers=2, risk=0.1, called=called, risk_measure="allRequests")
    assert v["violation_rate"] == pytest.approx(1 / 5)  # 1 accepted-and-bad of 5 requests reaching tier 0
    assert v["cells"][0]["reached"] == 5 and v["cells"][0]["accepted"] == 3
    assert v["cells_over_risk"] == 1.0
    conditional = M.violations(tier, accepted, quality, tasks, n_tiers=2, risk=0.1, called=called)
    assert conditional["violation_rate"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="called"):
        M.violations(tier, accepted, quality, tasks, n_tiers=2, risk=0.1, risk_measure="allRequests")


def test_simulated_cascade_records_which_tiers_were_called():
    from routenlp.router.cascade import simulate_cascade

    scores = np.array([[0.9, 1.0], [0.1, 1.0], [0.9, 1.0]])
    r = simulate_cascade(np.array([0, 0, 1]), scores, np.ones((3, 2)), np.ones((3, 2)), np.array([0.5, np.nan]),
                         max_escalations=1)
    assert r.called.tolist() == [[True, False], [True, True], [False, True]]


def test_violations_leave_out_the_chain_end_answers():
    """A chain that ends below the reference: its end always answers (never thresholded), so its answers are outside
    the guarantee like the reference's; counting them would report violations the thresholds never allowed."""
    tier = np.array([1, 1, 0, 0])
    accepted = np.array([True, True, True, True])
    quality = np.array([0.0, 0.0, 1.0, 0.0])
    tasks = np.array([0, 0, 1, 1])
    called = np.array([[True, True, False], [True, True, False], [True, False, False], [True, False, False]])
    ends = np.array([1, 1, 2, 2])  # task 0 ends at tier 1; task 1 at the reference
    v = M.violations(tier, accepted, quality, tasks, 3, 0.1, called=called, risk_measure="allRequests", ends=ends)
    assert v["violation_rate"] == pytest.approx(1 / 4)  # task 1's one bad accepted answer / 4 requests reaching tier 0
    assert {(c["task"], c["tier"]) for c in v["cells"]} == {(0, 0), (1, 0)}
    old = M.violations(tier, accepted, quality, tasks, 3, 0.1, called=called, risk_measure="allRequests")
    assert old["violation_rate"] > v["violation_rate"]  # the end's two wrong answers counted as violations
