"""Router building blocks: difficulty router, confidence, cascade decisions, artifacts."""

import math

import numpy as np
import pytest

from routenlp.router import cascade
from routenlp.router.artifacts import Calibration, latest_version, list_versions, load_artifact, save_artifact
from routenlp.router.conformal import ThresholdResult
from routenlp.router.confidence import ConfidenceSet, answer_features, fallback_score, fit_confidence
from routenlp.router.difficulty import DifficultyRouter


def _toy(n=600, seed=0):
    """Queries whose first coordinate says how hard they are; tier 0 fails on hard ones, tier 1 never."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 384)).astype(np.float32)
    hard = x[:, 0] > 0
    quality = np.stack([np.where(hard, 0.0, 1.0), np.ones(n)], axis=1).astype(np.float32)
    return x, np.zeros(n, dtype=int), quality, hard


def test_difficulty_router_learns_and_round_trips(tmp_path):
    x, t, q, hard = _toy()
    q_missing = q.copy()
    q_missing[::7, 1] = np.nan  # unknown labels are masked, not treated as 0
    pairs = np.array([[i, 1, 0] for i in np.flatnonzero(hard)[:100]])
    r = DifficultyRouter(["small", "big"], ["intent"]).fit(x, t, q_missing, pairs=pairs, epochs=15, seed=1)
    p = r.predict_proba(x, t)
    assert p.shape == (len(x), 2) and p.dtype == np.float32
    assert p[hard, 0].mean() < 0.3 < 0.7 < p[~hard, 0].mean()
    assert p[:, 1].mean() > 0.8
    r.save(tmp_path / "r")
    r2 = DifficultyRouter.load(tmp_path / "r")
    assert r2.tier_names == ["small", "big"] and r2.task_names == ["intent"]
    np.testing.assert_allclose(r2.predict_proba(x[:5], t[:5]), p[:5], rtol=1e-6)


def test_difficulty_router_rejects_bad_shapes():
    r = DifficultyRouter(["a", "b"], ["t"])
    with pytest.raises(ValueError):
        r.fit(np.zeros((3, 10)), np.zeros(3), np.zeros((3, 2)))
    with pytest.raises(ValueError):
        r.fit(np.zeros((3, 384)), np.array([0, 1, 0]), np.zeros((3, 2)))


def test_pairwise_loss_orders_heads_without_quality_labels():
    x, t, q, hard = _toy(300)
    none = np.full_like(q, np.nan)
    pairs = np.array([[i, 1, 0] if h else [i, 0, 1] for i, h in enumerate(hard)])
    r = DifficultyRouter(["a", "b"], ["t"]).fit(x, t, none, pairs=pairs, epochs=15, seed=0)
    p = r.predict_proba(x, t)
    assert (p[hard, 1] > p[hard, 0]).mean() > 0.8
    assert (p[~hard, 0] > p[~hard, 1]).mean() > 0.8


def test_early_stopping_keeps_a_weak_signal_router_at_least_as_good_as_the_task_base_rates():
    """Per-query difficulty is a weak signal next to the task's base rate (MMLU-Pro); a fixed epoch count then
    memorises noise. The held-out epoch count keeps the router's held-out log loss near the base rates'."""
    rng = np.random.default_rng(3)
    n, n_tasks = 3000, 4
    x = rng.normal(size=(2 * n, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # unit norm, as the encoder's embeddings
    t = rng.integers(0, n_tasks, size=2 * n)
    rate = np.array([[0.3, 0.8], [0.5, 0.9], [0.7, 0.6], [0.2, 0.4]])[t]
    rate[:, 0] = np.clip(rate[:, 0] + 0.1 * np.tanh(20 * x[:, 0]), 0, 1)  # a little per-query signal
    q = (rng.uniform(size=rate.shape) < rate).astype(np.float32)

    def log_loss(p):
        p = np.clip(p, 1e-4, 1 - 1e-4)
        return float(-(q[n:] * np.log(p) + (1 - q[n:]) * np.log(1 - p)).mean())

    base = np.stack([q[:n][t[:n] == k].mean(0) for k in range(n_tasks)])[t[n:]]
    stopped = DifficultyRouter(["a", "b"], [f"t{k}" for k in range(n_tasks)]).fit(x[:n], t[:n], q[:n], epochs=30)
    fixed = DifficultyRouter(["a", "b"], [f"t{k}" for k in range(n_tasks)]).fit(x[:n], t[:n], q[:n], epochs=30,
                                                                                 holdout=0.0)
    assert stopped.epochs_used is not None and stopped.epochs_used < 30 and fixed.epochs_used == 30
    assert log_loss(stopped.predict_proba(x[n:], t[n:])) <= log_loss(base) + 0.01
    assert log_loss(fixed.predict_proba(x[n:], t[n:])) > log_loss(base) + 0.05


def test_answer_features_and_fallback():
    f = answer_features([-0.1, -2.0, None], structured=True, prior=0.8)
    assert f["mean_logprob"] == pytest.approx(-1.05) and f["min_logprob"] == -2.0
    assert f["label_prob"] == pytest.approx(math.exp(-2.1))
    assert math.isnan(answer_features(None, False, None)["mean_logprob"])
    assert math.isnan(fallback_score(answer_features(None, False, None)))
    assert fallback_score({"prior": 0.9}) == pytest.approx(0.9)
    # monotone: a more confident answer never scores lower
    assert fallback_score(answer_features([-0.1], False, 0.5)) > fallback_score(answer_features([-1.0], False, 0.5))


def test_confidence_model_fits_and_serialises():
    rng = np.random.default_rng(0)
    lp = rng.normal(-1, 0.7, size=500)
    y = (rng.uniform(size=500) < np.exp(lp.clip(max=0))).astype(float)
    feats = {"mean_logprob": lp, "prior": np.full(500, np.nan)}  # prior absent: ignored
    m = fit_confidence(feats, y)
    assert m is not None and m.features == ["mean_logprob"] and m.coef[0] > 0
    s = ConfidenceSet({"t": {"a": m}})
    s2 = ConfidenceSet.from_json(s.to_json())
    one = s2.score("t", "a", {"mean_logprob": -0.5})
    assert one == pytest.approx(s.score_many("t", "a", {"mean_logprob": np.array([-0.5])})[0])
    assert s2.score("t", "missing", {"prior": 0.4}) == pytest.approx(0.4)  # fallback where no model
    assert fit_confidence(feats, np.ones(500)) is None  # one class: nothing to learn


def test_start_tier_rule():
    # quality target 0.9 of the reference's predicted acceptance (0.9): tier needs >= 0.81
    assert cascade.start_tier(np.array([0.5, 0.85, 0.9]), 0.9) == 1
    assert cascade.start_tier(np.array([0.82, 0.85, 0.9]), 0.9) == 0
    assert cascade.start_tier(np.array([0.1, 0.2, 0.9]), 0.9) == 2
    assert cascade.start_tier(None, 0.9) == 0
    np.testing.assert_array_equal(cascade.start_tiers(np.array([[0.5, 0.85, 0.9], [0.1, 0.2, 0.9]]), 0.9), [1, 2])


def test_attempt_plan_limits_and_circuits():
    assert cascade.plan_for(0, 3, 2) == [0, 1, 2]
    assert cascade.plan_for(0, 4, 1) == [0, 3]  # the last allowed attempt goes to the reference
    assert cascade.plan_for(0, 3, 0) == [0]
    assert cascade.plan_for(1, 3, 2, tier_up=[True, False, True]) == [2]  # open circuit skipped
    assert cascade.plan_for(1, 3, 2, tier_up=[True, False, False]) == [0]  # fall back below the start
    assert cascade.plan_for(0, 3, 2, tier_up=[False, False, False]) == []
    # tiers that cannot accept (no certified threshold) are skipped; the reference always stays
    assert cascade.plan_for(0, 3, 2, usable=[False, True, False]) == [1, 2]
    assert cascade.plan_for(0, 4, 1, usable=[False, True, True, True]) == [1, 3]  # the limit counts usable tiers
    assert cascade.plan_for(0, 3, 2, tier_up=[True, True, False], usable=[False, False, True]) == [1]  # fallback
    np.testing.assert_array_equal(cascade.attempt_plan(np.array([0, 0]), 3, 2, usable=[[True, False, True],
                                                                                        [False, True, True]]),
                                  [[True, False, True], [False, True, True]])
    np.testing.assert_array_equal(cascade.usable_tiers([[None, 0.3, None], [np.nan, np.nan, np.nan]]),
                                  [[False, True, True], [False, False, True]])
    np.testing.assert_array_equal(cascade.start_tiers(np.array([[0.9, 0.9, 0.9]]), 1.0, usable=[False, True, True]),
                                  [1])
    plan = cascade.attempt_plan(np.array([0, 2]), 3, 2)
    np.testing.assert_array_equal(plan, [[True, True, True], [False, False, True]])


def test_accept_rule():
    assert cascade.accept(0.2, None, is_end=True)
    assert not cascade.accept(0.99, None, is_end=False)  # uncalibrated: never accept
    assert cascade.accept(0.8, 0.8, False) and not cascade.accept(0.79, 0.8, False)
    assert not cascade.accept(None, 0.5, False)


def test_simulate_cascade_matches_rules():
    scores = np.array([[0.9, 0.9, 0.1], [0.2, 0.9, 0.1], [0.2, 0.3, 0.1], [0.9, 0.9, 0.9]])
    quality = np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1], [1, 1, 1]], dtype=float)
    costs = np.array([[1, 10, 100]] * 4, dtype=float)
    thr = np.array([[0.5, 0.5, np.nan]] * 4)
    r = cascade.simulate_cascade(np.array([0, 0, 0, 2]), scores, quality, costs, thr, max_escalations=2)
    np.testing.assert_array_equal(r.tier, [0, 1, 2, 2])
    np.testing.assert_array_equal(r.cost, [1, 11, 111, 100])
    np.testing.assert_array_equal(r.escalations, [0, 1, 2, 0])
    np.testing.assert_array_equal(r.quality, [1, 1, 1, 1])
    assert r.accepted.all()
    # an uncalibrated tier (NaN) accepts nothing
    r2 = cascade.simulate_cascade(np.zeros(4, int), scores, quality, costs, np.full((4, 3), np.nan), 2)
    np.testing.assert_array_equal(r2.tier, [2, 2, 2, 2])
    # max_escalations 0: the start tier answers as a fallback
    r3 = cascade.simulate_cascade(np.zeros(4, int), scores, quality, costs, thr, 0)
    np.testing.assert_array_equal(r3.tier, [0, 0, 0, 0])
    np.testing.assert_array_equal(r3.accepted, [True, False, False, True])
    assert r.summary()["tier_share"] == [0.25, 0.25, 0.5]


def test_simulate_cascade_agrees_with_per_query_rules():
    rng = np.random.default_rng(3)
    n, K = 500, 4
    scores, quality, costs = rng.uniform(size=(n, K)), rng.integers(0, 2, (n, K)).astype(float), rng.uniform(size=(n, K))
    thr = np.where(rng.uniform(size=(n, K)) < 0.2, np.nan, rng.uniform(size=(n, K)))
    start, up = rng.integers(0, K, n), [True, False, True, True]
    for skip in (True, False):
        r = cascade.simulate_cascade(start, scores, quality, costs, thr, 2, tier_up=up, skip_uncertified=skip)
        for i in range(n):
            cost, chosen = 0.0, -1
            usable = ~np.isnan(thr[i]) if skip else None
            plan = cascade.plan_for(int(start[i]), K, 2, up, usable)
            for j, k in enumerate(plan):
                cost += costs[i, k]
                t = None if np.isnan(thr[i, k]) else thr[i, k]
                if cascade.accept(scores[i, k], t, k == K - 1) or j == len(plan) - 1:
                    chosen = k
                    break
            assert r.tier[i] == chosen and r.cost[i] == pytest.approx(cost)


def test_uncertified_tiers_are_skipped_so_the_floor_is_always_reference():
    rng = np.random.default_rng(4)
    n, K = 300, 3
    scores, costs = rng.uniform(size=(n, K)), np.tile([1.0, 10.0, 100.0], (n, 1))
    quality = np.ones((n, K))
    none = np.full((n, K), np.nan)
    skipped = cascade.simulate_cascade(np.zeros(n, int), scores, quality, costs, none, 2)
    called = cascade.simulate_cascade(np.zeros(n, int), scores, quality, costs, none, 2, skip_uncertified=False)
    assert skipped.cost.sum() == pytest.approx(100.0 * n)  # exactly always-reference
    assert called.cost.sum() == pytest.approx(111.0 * n)  # the old behaviour paid for two useless calls
    assert (skipped.escalations == 0).all() and (skipped.tier == 2).all()
    # tier 1 certified, tier 0 not: start at 0 goes straight to tier 1
    thr = np.tile([np.nan, 0.5, np.nan], (n, 1))
    r = cascade.simulate_cascade(np.zeros(n, int), scores, quality, costs, thr, 2)
    assert set(np.unique(r.tier)) <= {1, 2} and (r.cost >= 10.0).all() and (r.cost <= 110.0).all()


def test_canary_bucket_is_stable():
    assert cascade.canary_bucket("abc") == cascade.canary_bucket("abc")
    buckets = [cascade.canary_bucket(f"r{i}") for i in range(2000)]
    assert 0 <= min(buckets) and max(buckets) <= 99
    assert 0.07 < np.mean(np.array(buckets) < 10) < 0.13


def test_artifacts_round_trip_and_are_immutable(tmp_path):
    r = DifficultyRouter(["a", "b"], ["t"])
    cal = Calibration(0.05, 0.1, tasks={"t": {"a": ThresholdResult(0.7, 300, 120, 0.02, True)}})
    save_artifact(tmp_path, "v1", r, ConfidenceSet(), cal, {"note": "first"})
    save_artifact(tmp_path, "v2", None, None, None)
    (tmp_path / ".tmp-v3-dead").mkdir()  # a crashed writer's leftover is not a version
    assert list_versions(tmp_path) == ["v1", "v2"] and latest_version(tmp_path) == "v2"
    a = load_artifact(tmp_path, "v1")
    assert a.router.tier_names == ["a", "b"] and a.metadata["note"] == "first"
    assert a.calibration.get("t", "a").threshold == 0.7 and a.calibration.get("t", "b") is None
    assert load_artifact(tmp_path).version == "v2" and load_artifact(tmp_path).router is None
    with pytest.raises(FileExistsError):
        save_artifact(tmp_path, "v1", r)
    with pytest.raises(ValueError):
        save_artifact(tmp_path, "../evil", r)
    with pytest.raises(FileNotFoundError):
        load_artifact(tmp_path / "nothing")


def test_fallback_uses_prior_only_without_answer_signals():
    # offline calibration scores (no prior) and served scores (with prior) must agree
    assert fallback_score(answer_features([-0.3], True, 0.2)) == pytest.approx(fallback_score(answer_features([-0.3], True, None)))
    assert fallback_score(answer_features(None, True, 0.2)) == pytest.approx(0.2)
