"""`routenlp bench routing` never loses work: per-seed results are written as they finish, portfolios and chains that
differ between seeds aggregate by tier name, a failing seed is named with its step and the run exits non-zero."""

import json

import numpy as np
import pytest

from routenlp.bench import routing
from routenlp.bench.baselines import FrugalCascade
from routenlp.bench.features import EmbeddingCache, response_tail
from routenlp.bench.outcomes import build_outcomes, write_rows


def _flip_rows(n: int = 600) -> list[dict]:
    """Four models; on task `gen`, `mid_b` is dearer than `mid_a` and disagrees with it on a fifth of the queries,
    half each way, so whether it enters that task's Pareto set (and the portfolio) depends on which of those
    queries the train split holds, i.e. on the seed. Task `math` has a specialist (`mid_a` right more often than
    the reference there)."""
    rng = np.random.default_rng(5)
    rows = []
    p = {"gen": {"cheap": 0.5, "mid_a": 0.7, "ref": 0.85},
         "math": {"cheap": 0.3, "mid_a": 0.9, "mid_b": 0.5, "ref": 0.6}}
    for i in range(n):
        task = "math" if i % 3 == 0 else "gen"
        oks = {m: rng.random() < pm for m, pm in p[task].items()}
        oks["mid_b"] = oks.get("mid_b", oks["mid_a"])
        if task == "gen" and i % 5 == 1:  # discordant, alternating, so equally good over the whole table
            oks["mid_a"] = (i // 5) % 2 == 0
            oks["mid_b"] = not oks["mid_a"]
        for model, price in (("cheap", 1e-4), ("mid_a", 4e-4), ("mid_b", 5e-4), ("ref", 2e-3)):
            ok = oks[model]
            sure = ok if rng.random() < 0.85 else not ok
            rows.append({"query_id": f"q{i}", "task": task, "query": f"question {i} on {task}", "model": model,
                         "quality": float(ok), "cost_usd": price,
                         "response": f"{'sure' if sure else 'unsure'} answer {int(ok)}"})
    return rows


@pytest.fixture(scope="module")
def flip_table(tmp_path_factory, fake_encoder_cls):
    d = tmp_path_factory.mktemp("flip")
    rows = _flip_rows()
    write_rows(rows, d / "flip.jsonl")
    o = build_outcomes(rows)
    cache = EmbeddingCache(d / "cache", encoder=fake_encoder_cls())
    cache.embed(o.queries)
    for j in range(len(o.models)):
        cache.embed([response_tail(r) for r in o.responses[j]])
    return d


ARGS = ["--no-progress", "--epochs", "3", "--alphas", "", "--no-shift", "--json", "--floor", "0.9"]


def test_portfolios_that_differ_between_seeds_aggregate_by_tier_name(flip_table, capsys):
    d = flip_table
    out = d / "out"
    # plain Pareto sets (no standard-error margin), so a tier equally good on average flips in and out by seed
    rc = routing.main([str(d / "flip.jsonl"), "--seeds", "4", "--cache-dir", str(d / "cache"), "--out", str(out),
                       "--chain-min-gain-se", "0", *ARGS])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    per_seed = res["tiers_per_seed"]
    assert len({tuple(t) for t in per_seed}) > 1, per_seed  # the table makes the Pareto set change with the seed
    assert res["tiers"] == [m for m in ["cheap", "mid_a", "mid_b", "ref"] if any(m in t for t in per_seed)]
    share = res["routenlp"]["tier_share"]
    assert set(share) == set(res["tiers"]) and sum(share.values()) == pytest.approx(1.0)
    # a tier a seed did not have counts 0 for that seed
    for t in res["tiers"]:
        seeds = [json.loads((out / "seeds" / f"seed-{i}.json").read_text()) for i in range(4)]
        assert share[t] == pytest.approx(np.mean([p["routenlp"]["tier_share"].get(t, 0.0) for p in seeds]))
    # per-task chains: math's chain ends at its specialist, below the reference
    assert all(c["math"][-1] == "mid_a" for c in res["chains_per_seed"])
    fl = res["methods"]["routenlp"]["floor"]["0.90"]
    assert fl["held_seeds"] + 0 <= 4 and {"cost_reduction", "quality_ratio", "reached_seeds"} <= set(fl)
    capsys.readouterr()


def test_a_failing_seed_is_named_and_the_others_are_kept(flip_table, capsys, monkeypatch):
    d = flip_table
    out = d / "out-fail"
    real = FrugalCascade.run

    def broken(self, idx, knob):
        if self.s.seed == 1:
            raise RuntimeError("disk on fire")
        return real(self, idx, knob)

    monkeypatch.setattr(FrugalCascade, "run", broken)
    rc = routing.main([str(d / "flip.jsonl"), "--seeds", "3", "--cache-dir", str(d / "cache"), "--out", str(out),
                       *ARGS])
    assert rc == 1
    err = capsys.readouterr().err
    assert "seed 1 failed in step 'frugalgpt': RuntimeError: disk on fire" in err
    assert (out / "seeds" / "seed-0.json").is_file() and (out / "seeds" / "seed-2.json").is_file()
    assert "disk on fire" in (out / "seeds" / "seed-1.error.txt").read_text()
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == 2 and res["seed_ids"] == [0, 2]
    assert res["failed_seeds"] == [{"seed": 1, "step": "frugalgpt", "error": "RuntimeError: disk on fire"}]
    assert "Failed seeds: 1" in (out / "report.md").read_text()


def test_test_quality_ratio_standard_error():
    rng = np.random.default_rng(0)
    ref = (rng.random(4000) < 0.7).astype(float)
    q = np.where(rng.random(4000) < 0.9, ref, 1 - ref)
    r, se = routing.quality_ratio_se(q, ref)
    assert r == pytest.approx(q.mean() / ref.mean())
    # the delta-method SE matches the spread of the ratio over bootstrap resamples
    boot = [q[i].mean() / ref[i].mean() for i in (rng.integers(0, 4000, 4000) for _ in range(300))]
    assert se == pytest.approx(np.std(boot), rel=0.2)


def test_resume_reuses_finished_seeds(flip_table, capsys, monkeypatch):
    d = flip_table
    out = d / "out-resume"
    args = [str(d / "flip.jsonl"), "--cache-dir", str(d / "cache"), "--out", str(out), *ARGS]
    assert routing.main([*args, "--seeds", "1"]) == 0
    first = (out / "seeds" / "seed-0.json").read_text()
    ran = []
    real = routing.run_seed
    monkeypatch.setattr(routing, "run_seed", lambda o, X, resp, seed, *a, **k: ran.append(seed) or real(o, X, resp, seed,
                                                                                                       *a, **k))
    assert routing.main([*args, "--seeds", "2", "--resume"]) == 0
    assert ran == [1] and (out / "seeds" / "seed-0.json").read_text() == first
    assert json.loads((out / "results.json").read_text())["seed_ids"] == [0, 1]
    capsys.readouterr()
