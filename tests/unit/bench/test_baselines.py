import numpy as np
import pytest

from routenlp.bench.baselines import BestSingle, FrugalCascade, KNNRouter, MFRouter, Oracle, RandomMix, Split
from routenlp.bench.outcomes import build_outcomes
from routenlp.bench.routing import split_indices, stratified_subsample


def _split(rows, enc, seed=0):
    o = build_outcomes(rows)
    X = enc.encode(o.queries)
    tr, ca, te = split_indices(o.tasks, seed, 0.5, 0.25)
    s = Split(o, X, tr, ca, te, seed, [0, 2])
    return s


def test_splits_are_disjoint_and_stratified(synth_rows):
    o = build_outcomes(synth_rows)
    tr, ca, te = split_indices(o.tasks, 3, 0.5, 0.25)
    assert len(set(tr) | set(ca) | set(te)) == o.n and not set(tr) & set(te) and not set(ca) & set(te)
    assert abs((o.tasks[tr] == 0).mean() - 0.5) < 0.02
    sub = stratified_subsample(ca, o.tasks, 40, 0)
    assert len(sub) == 40 and set(sub) <= set(ca)


def test_oracle_picks_the_cheapest_acceptable_model(synth_rows, fake_encoder):
    s = _split(synth_rows, fake_encoder)
    c, q = Oracle().fit(s).run(s.test)
    Q, C = s.Q[s.test], s.C[s.test]
    assert np.all(q == Q.max(1))
    some = Q.any(1)
    assert np.all(c[some] == np.where(Q[some] >= 0.5, C[some], np.inf).min(1))


def test_best_single_headline_is_the_best_model_per_task(synth_rows, fake_encoder):
    s = _split(synth_rows, fake_encoder)
    m = BestSingle().fit(s)
    for t in range(2):
        assert m.model_for(t, 1.0) == int(np.argmax(m.task_q[t]))
        assert m.model_for(t, 0.0) == 0  # any model qualifies: the cheapest


def test_random_matches_a_cost(synth_rows, fake_encoder):
    s = _split(synth_rows, fake_encoder)
    m = RandomMix().fit(s)
    target = s.C[s.test].mean(0)[[0, 2]].mean()
    p = m.match_cost(s.test, target)
    c, _ = m.run(s.test, p)
    assert 0.3 < p < 0.7 and c.mean() == pytest.approx(target, rel=0.25)


@pytest.mark.parametrize("cls", [KNNRouter, MFRouter])
def test_learned_routers_beat_random_at_equal_cost(synth_rows, fake_encoder, cls):
    s = _split(synth_rows, fake_encoder)
    m = cls().fit(s)
    rnd = RandomMix().fit(s)
    wins = 0
    for lam in (0.05, 0.2, 0.5):
        c, q = m.run(s.test, lam)
        rc, rq = rnd.run(s.test, rnd.match_cost(s.test, c.mean()))
        wins += q.mean() > rq.mean()
    assert wins >= 2  # the first word ("easy"/"hard") is in the embedding: a router must use it


def test_frugal_cascade_with_perfect_scores_reaches_reference_quality_cheaper(synth_rows, fake_encoder):
    s = _split(synth_rows, fake_encoder)
    s.scores = np.column_stack([s.Q[:, 0], np.ones(s.outcomes.n)])  # the scorer knows the truth
    c, q = FrugalCascade().fit(s).run(s.test, 0.5)
    ref = s.test, 2
    assert q.mean() >= s.Q[ref].mean() - 0.02
    assert c.mean() < s.C[ref].mean()
