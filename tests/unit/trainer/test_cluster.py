import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from routenlp.router.eventlog import read_events
from routenlp.trainer import cluster
from routenlp.trainer.cluster import NOISE, cluster_embeddings, select_failures



@pytest.mark.parametrize("method", ["kmeans", "hdbscan"])
def test_finds_planted_clusters(method, helpers):
    x, truth = helpers.planted_embeddings(n_per=25)
    labels, info = cluster_embeddings(x, method=method, max_clusters=8, min_cluster_size=5)
    kept = labels != NOISE
    assert info["k"] == 3
    assert kept.mean() > 0.9
    assert adjusted_rand_score(truth[kept], labels[kept]) == pytest.approx(1.0)


def test_kmeans_reports_silhouette_per_k_and_drops_small_clusters(helpers):
    x, _ = helpers.planted_embeddings(n_per=25)
    x = np.concatenate([x, x[:2] * -1])  # two outliers: a cluster of 2 is below min size -> noise if formed
    labels, info = cluster_embeddings(x, method="kmeans", max_clusters=6, min_cluster_size=5)
    assert set(info["silhouette_by_k"]) >= {2, 3, 4}
    for c in set(labels) - {NOISE}:
        assert (labels == c).sum() >= 5


def test_selects_rejected_and_labelled_unacceptable_answers(tmp_path, helpers):
    helpers.write_log(tmp_path, n_per=4, labelled_bad=3)
    failures, tried = select_failures(read_events(tmp_path), teacher_tier="reference")
    reasons = sorted({f.reason for f in failures})
    assert reasons == ["labelled_unacceptable", "rejected"]
    assert sum(f.reason == "rejected" for f in failures) == 12
    assert sum(f.reason == "labelled_unacceptable" for f in failures) == 3
    assert len(tried) == 12 + 6 + 3  # every request that tried the student
    rejected = next(f for f in failures if f.request_id == "card_arrival-0")
    assert rejected.teacher_response == "card_arrival"
    assert rejected.cost_usd == pytest.approx(0.00001 + 0.003)
    # an accepted-but-bad answer is charged the median teacher cost in the log (what escalating would have cost)
    bad = next(f for f in failures if f.request_id == "bad-0")
    assert bad.cost_usd == pytest.approx(0.002)
    # the teacher's own attempts are never failures; a student-tier filter keeps only that tier
    assert select_failures(read_events(tmp_path), "reference", student_tier="other")[0] == []


def test_stage_ranks_clusters_by_cost_and_writes_a_complete_manifest(tmp_path, topic_embed, helpers):
    helpers.write_log(tmp_path / "events", n_per=12)
    out = tmp_path / "out"
    argv = ["--events", str(tmp_path / "events"), "--out", str(out), "--teacher-tier", "reference",
            "--max-clusters", "6", "--min-cluster-size", "5", "--top-clusters", "2"]
    assert cluster.main(argv) == 0
    report = json.loads((out / "clusters.json").read_text())
    assert report["clustering"]["k"] == 3
    sizes = [c["size"] for c in report["clusters"]]
    assert sizes == [12, 12, 12]
    costs = [c["cost_usd"] for c in report["clusters"]]
    assert costs == sorted(costs, reverse=True)
    # card_arrival costs most per escalation, then pin_blocked
    assert all("card" in e for e in report["clusters"][0]["examples"])
    assert all("pin" in e for e in report["clusters"][1]["examples"])
    assert report["top_clusters"] == [0, 1]
    # costs 0.036 / 0.024 / 0.012 per topic (+ the failed student attempts): the top two hold 83 %
    assert report["cost_cover_80"] == 2
    # the 6 requests the student answered well fall nearest to one cluster: 12 failures of 18 requests there
    assert sorted(c["escalation_rate"] for c in report["clusters"]) == [0.6667, 1.0, 1.0]
    m = helpers.read_manifest(out)
    assert set(m["outputs"]) == {"report", "failures", "centroids"}
    assert m["metrics"]["failures"] == 36 and m["metrics"]["clusters"] == 3
    assert m["inputs"]["events"]["sha256"]
    # same inputs: a no-op
    st = cluster.run(cluster_args(argv))
    assert st["skipped"] is True


def cluster_args(argv):
    import argparse

    p = argparse.ArgumentParser()
    cluster.add_arguments(p)
    return p.parse_args(argv)


def test_stage_refuses_a_log_without_failures(tmp_path, topic_embed):
    from routenlp.trainer.manifest import StageError

    (tmp_path / "events").mkdir()
    with pytest.raises(StageError, match="no escalation failures"):
        cluster.run(cluster_args(["--events", str(tmp_path / "events"), "--out", str(tmp_path / "o"),
                                  "--teacher-tier", "reference"]))


def test_a_later_round_clusters_only_the_failures_of_the_previous_rounds_router():
    from routenlp.router.events import RoutingEvent, TierAttempt

    def ev(rid, version):
        return RoutingEvent(request_id=rid, time=1.0, policy="p", task="intent", query=rid, final_tier="reference",
                            router_version=version, escalations=1, attempts=[
                                TierAttempt(tier="student", model="s", accepted=False, cost_usd=0.001),
                                TierAttempt(tier="reference", model="r", accepted=True, response="x", cost_usd=0.01)])

    events = [ev("a", "v1"), ev("b", "v2"), ev("c", "v2"), ev("d", None)]
    assert {f.request_id for f in select_failures(events, "reference")[0]} == {"a", "b", "c", "d"}
    failures, tried = select_failures(events, "reference", router_version="v2")
    assert {f.request_id for f in failures} == {"b", "c"} and len(tried) == 2


def test_cost_cover_counts_the_clusters_holding_most_failure_cost():
    from routenlp.trainer.cluster import cost_cover

    ranked = [{"cost_usd": 5.0}, {"cost_usd": 3.0}, {"cost_usd": 1.0}]
    assert cost_cover(ranked, 10.0, 0.5) == 1
    assert cost_cover(ranked, 10.0, 0.8) == 2
    assert cost_cover(ranked, 10.0, 0.9) == 3
    assert cost_cover(ranked, 20.0, 0.8) is None  # most of the cost is noise: no top-k covers it
