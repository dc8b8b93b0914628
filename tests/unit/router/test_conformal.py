"""The guarantee, tested: thresholds certified by calibrate_threshold / calibrate_cascade keep the rate of
unacceptable answers among accepted ones at or below alpha on held-out data, in at least 1 - delta of the
calibration draws (plus sampling slack)."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routenlp.router import cascade
from routenlp.router.conformal import calibrate_cascade, calibrate_threshold, thresholds_table


def _true_risk(lam: float, gamma: float) -> float:
    """P(Y = 0 | S >= lam) for S ~ U(0, 1), P(Y = 1 | S = s) = s ** gamma."""
    if lam >= 1:
        return 0.0
    return 1 - (1 - lam ** (gamma + 1)) / ((gamma + 1) * (1 - lam))


def _draw(rng, n, gamma):
    s = rng.uniform(size=n)
    return s, (rng.uniform(size=n) < s ** gamma).astype(int)


def test_uncertified_when_too_few_samples_or_too_hard():
    rng = np.random.default_rng(0)
    s, y = _draw(rng, 50, 1.0)
    r = calibrate_threshold(s, y, 0.05, 0.1, min_samples=200)
    assert (r.threshold, r.certified, r.n) == (None, False, 50)
    s, y = rng.uniform(size=2000), np.zeros(2000)  # every answer unacceptable: nothing can be certified
    assert calibrate_threshold(s, y, 0.05, 0.1, 10).certified is False


def test_easy_case_certifies_everything():
    r = calibrate_threshold(np.full(400, 0.3), np.ones(400), 0.05, 0.1, 10)
    assert r.certified and r.threshold == 0.0 and r.n_accepted == 400 and r.empirical_risk == 0.0


def test_nan_labels_are_ignored():
    rng = np.random.default_rng(1)
    s, y = _draw(rng, 1000, 1.0)
    y = y.astype(float)
    y[:500] = np.nan
    assert calibrate_threshold(s, y, 0.1, 0.1, 10).n == 500


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(alpha=st.sampled_from([0.05, 0.1, 0.2]), delta=st.sampled_from([0.1, 0.2]),
       gamma=st.floats(0.3, 3.0), n_cal=st.integers(300, 1500), seed=st.integers(0, 2**31 - 1))
def test_violation_rate_controlled_over_random_splits(alpha, delta, gamma, n_cal, seed):
    rng = np.random.default_rng(seed)
    splits, true_violations = 60, 0
    for _ in range(splits):
        s, y = _draw(rng, n_cal + 4000, gamma)
        r = calibrate_threshold(s[:n_cal], y[:n_cal], alpha, delta, min_samples=50)
        if r.threshold is None:
            continue  # accepting nothing never violates
        if _true_risk(r.threshold, gamma) > alpha:
            true_violations += 1
        acc = s[n_cal:] >= r.threshold
        if acc.sum() >= 50:  # held-out empirical rate within sampling slack of alpha
            held = 1 - y[n_cal:][acc].mean()
            assert held <= alpha + 3.5 * np.sqrt(alpha * (1 - alpha) / acc.sum()) + 1e-9
    # P(true risk > alpha) <= delta; binomial slack for `splits` draws
    assert true_violations / splits <= delta + 3 * np.sqrt(delta * (1 - delta) / splits)


def _cascade_data(rng, n):
    """Three tiers; difficulty d ~ U(0,1); tier k answers well with prob depending on d; score noisy of that."""
    d = rng.uniform(size=n)
    p_ok = np.stack([np.clip(1.1 - 1.2 * d, 0, 1), np.clip(1.3 - 0.9 * d, 0, 1), np.full(n, 0.97)], 1)
    ok = (rng.uniform(size=(n, 3)) < p_ok).astype(float)
    score = np.clip(p_ok + rng.normal(0, 0.1, size=(n, 3)), 0, 1)
    task = (rng.uniform(size=n) < 0.5).astype(int)
    start = np.where(d > 0.8, 1, 0)  # a router prior sends the hardest queries straight to tier 1
    return task, start, score, ok


def test_cascade_calibration_holds_per_task_and_tier_on_held_out_data():
    alpha, delta = 0.1, 0.1
    failures, checks = 0, 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        task, start, score, ok = _cascade_data(rng, 6000)
        res = calibrate_cascade(task[:3000], start[:3000], score[:3000], ok[:3000], n_tasks=2, risk_level=alpha,
                                delta=delta, min_samples=100, max_escalations=2)
        assert res[0][2].threshold is None  # the reference is never thresholded
        thr = thresholds_table(res)
        sim = cascade.simulate_cascade(start[3000:], score[3000:], ok[3000:], np.ones((3000, 3)),
                                       thr[task[3000:]], max_escalations=2)
        for t in (0, 1):
            for k in (0, 1):
                m = (task[3000:] == t) & (sim.tier == k)
                if m.sum() >= 50:
                    checks += 1
                    viol = 1 - sim.quality[m].mean()
                    failures += viol > alpha + 3 * np.sqrt(alpha * (1 - alpha) / m.sum())
    assert checks > 20
    assert failures / checks <= delta


def test_cascade_tier_calibrated_only_on_queries_that_reach_it():
    # tier 0 accepts every query with score >= 0.5; tier 1 must be calibrated on the rest only
    n = 2000
    rng = np.random.default_rng(0)
    s0 = rng.uniform(size=n)
    score = np.stack([s0, rng.uniform(size=n), np.ones(n)], 1)
    labels = np.stack([np.ones(n), np.ones(n), np.ones(n)], 1)
    res = calibrate_cascade(np.zeros(n, int), np.zeros(n, int), score, labels, 1, 0.1, 0.1, 10, 2)
    assert res[0][0].threshold == 0.0  # everything acceptable at tier 0: it accepts all
    assert res[0][1].n == 0 and not res[0][1].certified  # nothing reaches tier 1
