"""The quality floor's plan search (`routenlp.router.floor`), which the trainer and the routing benchmark share."""

from __future__ import annotations

import numpy as np
import pytest

from routenlp.router import floor as F
from routenlp.trainer.retrain import floor_plan


def test_start_rules_round_trip_through_the_metadata_json():
    for rule in (0.97, F.END_START, (F.COST_WEIGHT, 0.2)):
        setting = F.FloorSetting("learnt", rule, 0.5)
        assert F.rule_from_json(setting.start_rule_json()) == rule
    assert F.start_rules(False) == list(F.QUALITY_TARGETS)
    assert F.start_rules(True)[-len(F.COST_WEIGHTS):] == [(F.COST_WEIGHT, w) for w in F.COST_WEIGHTS]


def test_chain_sets_cut_learnt_chains_and_keep_pinned_ones():
    q = np.array([[1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]], dtype=float)  # task 0: tier 1 as good as the best
    tasks = np.array([0, 0, 1, 1])
    chains = np.array([[True, True, True], [True, False, True]])
    sets = F.chain_sets(chains, q, tasks)
    assert set(sets) == set(F.CHAIN_SETS)
    np.testing.assert_array_equal(sets["learnt@0.99"], [[True, True, False], [True, False, True]])
    pinned = F.chain_sets(chains, q, tasks, pinned=[True, False])
    for name in F.CHAIN_SETS:
        np.testing.assert_array_equal(pinned[name][0], chains[0])


def test_frontier_orders_by_predicted_z_and_keeps_only_cheaper_settings():
    levels = [1.0, 0.5, 0.0]
    curves = {  # E[y], E[y r], cost per level (strict to loose); reference rate 0.8
        ("learnt", 0.0): (np.array([0.8, 0.78, 0.5]), np.array([0.8, 0.76, 0.45]), np.array([1.0, 0.6, 0.2])),
        ("global", 0.0): (np.array([0.8, 0.79, 0.7]), np.array([0.8, 0.78, 0.65]), np.array([1.0, 0.9, 0.7])),
    }
    seq = F.frontier(curves, levels, 0.8, 0.95, 1000)
    costs = {(cs, lv): curves[(cs, 0.0)][2][levels.index(lv)] for cs, _ in curves for lv in levels}
    walked = [costs[(x.chain_set, x.level)] for x in seq]
    assert walked == sorted(walked, reverse=True) and len(set(walked)) == len(walked)  # strictly cheaper each step
    assert all(x.level != 0.0 or x.chain_set != "learnt" for x in seq)  # 0.5 vs 0.95 x 0.8: far below, left out


def test_choose_takes_the_cheapest_certified_setting_and_falls_back_to_the_reference():
    rng = np.random.default_rng(0)
    ref = (rng.random(3000) < 0.8).astype(float)
    good = ref.copy()  # same quality as the reference
    bad = ref * (rng.random(3000) < 0.7)  # ratio 0.7
    seq = [F.FloorSetting("learnt", 0.0, 1.0), F.FloorSetting("learnt", 0.0, 0.5), F.FloorSetting("learnt", 0.0, 0.0)]
    chosen, cert = F.choose(seq, np.column_stack([good, good, bad]), [0.9, 0.5, 0.1], ref, 0.95, 0.1)
    assert chosen == seq[1] and cert.index == 2  # the walk stops at the setting below the floor
    chosen, cert = F.choose(seq[2:], bad[:, None], [0.1], ref, 0.95, 0.1)
    assert chosen is None and cert.index == 0  # only always-reference is certified


@pytest.mark.parametrize("draw", range(4))
def test_the_trainers_floor_plan_holds_the_floor_on_new_requests(draw):
    """Population check of the whole search (ordering on fit rows, certification on calibration rows): the chosen
    plan's quality ratio on fresh requests from the same distribution is at least the floor (delta = 0.1: at most
    a tenth of draws may miss; these fixed draws all hold), and it saves money against always-reference. Levels
    every 0.1 instead of every 0.02 keep the search small enough for a unit test."""
    rng = np.random.default_rng(100 + draw)
    K, n = 3, 3000

    def sample(m):
        difficulty = rng.random(m)
        ok = np.column_stack([difficulty < 0.45, difficulty < 0.7, difficulty < 0.9]).astype(float)
        score = np.clip(ok + rng.normal(0, 0.6, ok.shape), 0, 1)  # a noisy confidence of each tier's answer
        pred = np.clip(np.column_stack([0.9 - difficulty, 1.2 - difficulty, np.ones(m)]), 0, 1)
        return ok, score, pred

    q, scores, pred = sample(n)
    scores[:, -1] = 1.0
    tasks = np.zeros(n, dtype=int)
    fit = np.arange(n) < n // 2
    chains = np.ones((1, K), dtype=bool)
    chosen, sets, cert = floor_plan(pred, scores, q, tasks, chains, np.array([False]), fit, ~fit, 0.95, 0.1, K - 1,
                                    [0.1, 0.3, 1.0], levels=np.round(np.linspace(1, 0, 11), 2))
    assert chosen is not None
    from routenlp.router.cascade import StartRule, simulate_cascade, start_tiers

    q2, s2, p2 = sample(20000)
    s2[:, -1] = 1.0
    rule = chosen.start_rule
    sr = StartRule(cost_weight=rule[1], relative_cost=[0.1, 0.3, 1.0]) if isinstance(rule, tuple) else \
        StartRule(quality_target=rule)
    ch = sets[chosen.chain_set][0]
    r = simulate_cascade(start_tiers(p2, sr, chain=ch), s2, q2, np.tile([0.1, 0.3, 1.0], (20000, 1)),
                         np.full((20000, K), chosen.level), K - 1, chains=ch)
    assert r.quality.mean() >= 0.95 * q2[:, -1].mean()
    assert r.cost.mean() < 1.0
