"""Per-task chains: learning them, naming them, and the cascade rules over them (cascade.py with `chain`)."""

import numpy as np
import pytest
from routenlp.router import cascade
from routenlp.router.chains import (
    chain_end_names,
    chains_from_names,
    chains_to_names,
    learn_chains,
)
from routenlp.router.conformal import calibrate_cascade, thresholds_table


def test_learn_chains_is_each_tasks_pareto_set_and_may_end_below_the_reference():
    # tiers: 0 cheap, 1 specialist for task 0, 2 reference. Task 0: tier 1 beats the reference; task 1: tier 1 is
    # worse than tier 0 (dearer and not better: off the chain).
    q = np.array([[0, 1, 1], [1, 1, 0], [0, 1, 0], [0, 1, 1],   # task 0 means: 0.25, 1.0, 0.5
                  [1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 1]], dtype=float)  # task 1 means: 0.5, 0.25, 1.0
    c = np.tile([1.0, 2.0, 10.0], (8, 1))
    t = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    ch = learn_chains(q, c, t, 3)
    np.testing.assert_array_equal(ch, [[True, True, False], [True, False, True], [True, True, True]])
    # task 2 has no training rows: pooled chain (means 0.375, 0.625, 0.75 -> every tier)
    assert chain_end_names(ch, ["a", "b", "ref"], ["x", "y", "z"]) == {"x": "b", "y": "ref", "z": "ref"}
    # a minimum gain drops a tier that is only marginally better than the cheaper ones
    np.testing.assert_array_equal(learn_chains(q[4:], c[4:], t[4:] - 1, 1, min_gain=0.6), [[True, False, False]])
    with pytest.raises(ValueError, match="cheapest first"):
        learn_chains(q, c[:, ::-1], t, 2)


def test_chain_names_round_trip_and_errors():
    tiers, tasks = ["a", "b", "ref"], ["x", "y"]
    ch = np.array([[True, True, False], [False, False, True]])
    names = chains_to_names(ch, tiers, tasks)
    assert names == {"x": ["a", "b"], "y": ["ref"]}
    np.testing.assert_array_equal(chains_from_names(names, tiers, tasks), ch)
    np.testing.assert_array_equal(chains_from_names({"x": ["b"]}, tiers, tasks), [[False, True, False],
                                                                                   [True, True, True]])
    for bad, msg in (({"w": ["a"]}, "unknown task"), ({"x": ["c"]}, "unknown tiers"), ({"x": []}, "empty"),
                     ({"x": ["ref", "a"]}, "cheapest first")):
        with pytest.raises(ValueError, match=msg):
            chains_from_names(bad, tiers, tasks)


def test_start_rule_over_a_chain():
    p = np.array([0.5, 0.8, 0.85, 0.9])
    chain = np.array([True, False, True, False])  # ends at tier 2 (predicted 0.85)
    assert cascade.start_tier(p, 0.9, chain=chain) == 2  # 0.5 < 0.9 x 0.85; tier 1 is off the chain
    assert cascade.start_tier(p, 0.5, chain=chain) == 0
    assert cascade.start_tier(None, 0.9, chain=[False, True, True, False]) == 1  # no prediction: first member
    # per-query chains, and usable moving the start to the next usable member
    starts = cascade.start_tiers(np.tile(p, (2, 1)), 0.0, usable=[False, True, False, True],
                                 chain=[[True, False, True, False], [True, True, False, True]])
    np.testing.assert_array_equal(starts, [2, 1])  # row 0: tier 0 unusable -> its end; row 1: tier 1


def test_cost_weighted_start_rule_maximises_expected_utility_over_the_chain():
    p = np.array([0.5, 0.8, 0.85, 0.9])
    cost = np.array([0.1, 0.3, 0.6, 1.0])  # relative to the reference
    rule = lambda w: cascade.StartRule(cost_weight=w, relative_cost=cost)  # noqa: E731
    assert cascade.start_tier(p, rule(0.0)) == 3  # no cost weight: the most likely acceptable tier
    assert cascade.start_tier(p, rule(0.5)) == 1  # 0.8 - 0.15 beats 0.5 - 0.05, 0.85 - 0.3 and 0.9 - 0.5
    assert cascade.start_tier(p, rule(5.0)) == 0  # cost dominates: the cheapest
    assert cascade.start_tier(p, rule(0.5), chain=[True, False, True, False]) == 2  # tier 1 off the chain: 0.55 > 0.45
    # ties go to the cheaper tier; per-request relative costs
    assert cascade.start_tier(np.array([0.6, 0.6]), cascade.StartRule(cost_weight=0.0, relative_cost=[0.5, 1.0])) == 0
    starts = cascade.start_tiers(np.tile(p, (2, 1)), cascade.StartRule(cost_weight=1.0,
                                                                      relative_cost=[[0.1, 0.5, 0.3, 1.0], cost]))
    np.testing.assert_array_equal(starts, [2, 1])  # 0.85 - 0.3 > 0.5 - 0.1; 0.8 - 0.3 > 0.5 - 0.1
    with pytest.raises(ValueError, match="relative cost"):
        cascade.start_tier(p, cascade.StartRule(cost_weight=1.0))
    # the default rule is the quality-target rule
    assert cascade.start_tier(p, cascade.StartRule(quality_target=0.9)) == 2 == cascade.start_tier(p, 0.9)


def test_chain_none_is_every_tier():
    rng = np.random.default_rng(0)
    p = rng.random((50, 4))
    full = np.ones(4, dtype=bool)
    for qt in (0.0, 0.7, 1.0):
        np.testing.assert_array_equal(cascade.start_tiers(p, qt), cascade.start_tiers(p, qt, chain=full))
    for start in range(4):
        for up in ([True] * 4, [True, False, True, False], [False] * 4):
            for use in ([True] * 4, [False, True, False, False]):
                for me in (0, 1, 3):
                    assert cascade.plan_for(start, 4, me, up, use) == cascade.plan_for(start, 4, me, up, use, full)


def test_plan_over_a_chain_and_its_fallback_when_the_end_is_down():
    chain = [True, False, True, False]  # ends at tier 2, below the reference (3)
    assert cascade.plan_for(0, 4, 3, chain=chain) == [0, 2]
    assert cascade.plan_for(0, 4, 3, usable=[False, True, False, True], chain=chain) == [2]  # the end is usable
    assert cascade.plan_for(0, 4, 0, chain=chain) == [0]
    # end down: the highest tier up above it (the reference) is tried last, as a fallback
    assert cascade.plan_for(0, 4, 3, tier_up=[True, True, False, True], chain=chain) == [0, 3]
    assert cascade.plan_for(0, 4, 3, tier_up=[True, True, False, False], chain=chain) == [0]
    assert cascade.plan_for(2, 4, 3, tier_up=[False, False, False, False], chain=chain) == []
    np.testing.assert_array_equal(cascade.attempt_plan(np.array([0, 0]), 4, 3, chain=[chain, [True] * 4]),
                                  [[True, False, True, False], [True, True, True, True]])


def test_simulate_cascade_with_chains_answers_at_the_end_and_falls_back_past_it():
    scores = np.array([[0.2, 0.9, 0.1, 1.0]] * 3)
    quality = np.array([[0, 1, 1, 0]] * 3, dtype=float)
    costs = np.tile([1.0, 2.0, 5.0, 10.0], (3, 1))
    thr = np.tile([0.5, 0.5, np.nan, np.nan], (3, 1))  # tier 2 has no threshold: as the end it answers anyway
    chains = np.array([[True, False, True, False], [True, True, True, False], [True, True, True, True]])
    r = cascade.simulate_cascade(np.zeros(3, int), scores, quality, costs, thr, 3, chains=chains)
    np.testing.assert_array_equal(r.tier, [2, 1, 1])
    np.testing.assert_array_equal(r.cost, [6, 3, 3])
    assert r.accepted.all()
    down = cascade.simulate_cascade(np.zeros(3, int), scores, quality, costs, thr, 3, tier_up=[True, False, False, True],
                                    chains=chains)
    np.testing.assert_array_equal(down.tier, [3, 3, 3])
    np.testing.assert_array_equal(down.accepted, [False, False, True])  # rows 0-1 borrowed the reference: fallback
    full = cascade.simulate_cascade(np.zeros(3, int), scores, quality, costs, thr, 3)
    same = cascade.simulate_cascade(np.zeros(3, int), scores, quality, costs, thr, 3, chains=np.ones((3, 4), bool))
    for a, b in ((full.tier, same.tier), (full.cost, same.cost), (full.accepted, same.accepted)):
        np.testing.assert_array_equal(a, b)


def test_calibrate_cascade_over_chains_matches_simulation_and_skips_off_chain_tiers():
    rng = np.random.default_rng(1)
    n, K = 4000, 3
    task = rng.integers(0, 2, n)
    score = rng.random((n, K))
    labels = (rng.random((n, K)) < 0.4 + 0.6 * score).astype(float)
    chains = np.array([[True, True, False], [False, True, True]])  # task 0 ends at tier 1; task 1 skips tier 0
    res = calibrate_cascade(task, np.zeros(n, int), score, labels, 2, 0.15, 0.1, 10, K - 1, chains=chains,
                            risk_measure="allRequests")
    thr = thresholds_table(res)
    assert not res[0][1].certified and res[0][1].n > 0  # task 0's end: never thresholded
    assert not res[1][0].certified and res[1][0].n == 0  # off task 1's chain: never calibrated
    assert res[0][0].certified and res[1][1].certified
    sim = cascade.simulate_cascade(np.zeros(n, int), score, labels, np.ones((n, K)), thr[task], K - 1,
                                   chains=chains[task])
    assert set(sim.tier[task == 0]) <= {0, 1} and set(sim.tier[task == 1]) <= {1, 2}
    # the counts calibration saw are the requests the simulation sends to each tier
    for t, k in ((0, 0), (1, 1), (0, 1)):
        assert res[t][k].n == int(sim.called[task == t, k].sum())
    # per-(task, tier) risk levels; 0 certifies nothing
    alphas = np.array([[0.0, 0.0, 0.0], [0.0, 0.15, 0.0]])
    res2 = calibrate_cascade(task, np.zeros(n, int), score, labels, 2, alphas, 0.1, 10, K - 1, chains=chains,
                             risk_measure="allRequests")
    assert not res2[0][0].certified and res2[1][1].certified


def test_a_tier_better_only_by_noise_stays_off_the_chain():
    rng = np.random.default_rng(2)
    base = (rng.random(400) < 0.6).astype(float)
    noisy = base.copy()
    zeros, ones = np.flatnonzero(base == 0), np.flatnonzero(base == 1)
    noisy[zeros[:10]], noisy[ones[:8]] = 1.0, 0.0  # half a point better: within one SE of the paired difference
    q = np.column_stack([base, noisy, np.r_[np.ones(242), np.zeros(158)]])
    c = np.tile([1.0, 2.0, 3.0], (400, 1))
    t = np.zeros(400, int)
    np.testing.assert_array_equal(learn_chains(q, c, t, 1), [[True, True, True]])
    np.testing.assert_array_equal(learn_chains(q, c, t, 1, min_gain_se=1.0), [[True, False, True]])
    # the reference joins whenever it is better (0.605 vs 0.59), without the SE margin
    assert q[:, 2].mean() - base.mean() < np.std(q[:, 2] - base, ddof=1) / 20
