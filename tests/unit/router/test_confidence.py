"""Answer confidence models: one per (group of tasks, tier), served for every task of the group."""

import numpy as np


def test_fit_confidence_set_pools_the_tasks_of_a_group():
    from routenlp.router.confidence import fit_confidence_set

    rng = np.random.default_rng(0)
    n = 400
    tids = rng.integers(0, 3, n)
    y = np.column_stack([(rng.random(n) < 0.6).astype(float), np.ones(n)])
    feats = {"answer_score": np.column_stack([0.3 * y[:, 0] + 0.7 * rng.random(n), np.full(n, np.nan)])}
    conf = fit_confidence_set(feats, y, tids, ["a", "b", "c"], ["small", "ref"], groups=[["a", "b"]])
    assert conf.get("a", "small") is conf.get("b", "small")  # one model for the group
    assert conf.get("c", "small") is not None and conf.get("c", "small") is not conf.get("a", "small")
    assert conf.get("a", "ref") is None  # the reference is never thresholded
    assert conf.get("a", "small").n == int(np.isin(tids, [0, 1]).sum())
    only = fit_confidence_set(feats, y, tids, ["a", "b", "c"], ["small", "ref"], rows=tids == 2)
    assert only.get("a", "small").n == int((tids == 2).sum())
