"""`routenlp train cluster`: group escalation failures into topics and rank them by the cost they cause.

An escalation failure is a request where a cheap tier (any tier but the teacher, or only `--student-tier`) was tried
and its answer rejected (the cascade escalated), or where its accepted answer was later labelled unacceptable
(feedback: an authenticated labeller, shadow comparison or judge; unauthenticated feedback never counts, the
precedence of `routenlp.router.events.resolve_label`). Failures are embedded with the router's MiniLM encoder and
clustered:

- `kmeans` (default): k in 2..maxClusters, chosen by the silhouette score (cosine) on the unit-normalised embeddings;
  clusters smaller than minClusterSize are dropped as noise. Predictable cost, always yields clusters.
- `hdbscan`: sklearn's HDBSCAN with minClusterSize; finds the number of clusters itself and labels sparse points as
  noise, but on small logs it may find none.

Clusters are ranked by the cost they caused: the cost of the failed cheap attempt plus what the escalation paid on
more expensive tiers (for an accepted-but-unacceptable answer, the median cost of a teacher attempt in the log stands
in for the escalation it should have caused). The escalation rate of a cluster is its failures / (its failures + the
cheap-tier successes whose embedding is nearest to its centroid).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from routenlp.router.eventlog import labelled_attempts

from .manifest import Stage, StageError, local_path, print_summary, write_json_atomic, write_jsonl

NOISE = -1


@dataclass
class Failure:
    request_id: str
    task: str
    query: str
    tier: str  # the cheap tier that failed
    reason: str  # "rejected" | "labelled_unacceptable"
    cost_usd: float  # cost this failure caused
    teacher_response: str | None  # the teacher's answer, when the log has one (distillation target)


@dataclass
class Request:
    """A request in which a cheap tier was tried (the denominator of escalation rates)."""

    request_id: str
    task: str
    query: str
    tier: str


def select_failures(
    events: Iterable[Any], teacher_tier: str, student_tier: str | None = None, task: str | None = None,
    router_version: str | None = None,
) -> tuple[list[Failure], list[Request]]:
    """Escalation failures and all cheap-tier requests from routing and feedback events (any order).

    Only the first cheap attempt of a request counts (one failure per request). `task` keeps one task only;
    `router_version` keeps the requests that router version routed (a campaign round learns from the failures of
    the version the previous round rolled out, not from those its adapter already fixed).
    """
    requests: dict[str, Any] = {}
    feedback: list[Any] = []
    shadow_answers: dict[str, str] = {}
    for ev in events:
        if ev.type == "request":
            requests[ev.request_id] = ev
        elif ev.type == "feedback":
            feedback.append(ev)
            if ev.reference_response:
                shadow_answers[ev.request_id] = ev.reference_response
    # The label in force per answer, under the precedence the router applies (events.resolve_label): unauthenticated
    # feedback never counts, a labeller's label stands over the judge's.
    unacceptable = {(la.request_id, la.tier) for la in labelled_attempts([*requests.values(), *feedback])
                    if not la.acceptable}

    teacher_costs = [a.cost_usd for ev in requests.values() for a in ev.attempts if a.tier == teacher_tier and not a.error]
    teacher_cost = statistics.median(teacher_costs) if teacher_costs else 0.0

    def is_cheap(tier: str) -> bool:
        return tier != teacher_tier and (student_tier is None or tier == student_tier)

    failures: list[Failure] = []
    tried: list[Request] = []
    for ev in requests.values():
        if (task is not None and ev.task != task) or (router_version is not None and ev.router_version != router_version):
            continue
        idx = next((i for i, a in enumerate(ev.attempts) if is_cheap(a.tier)), None)
        if idx is None:
            continue
        att = ev.attempts[idx]
        tried.append(Request(ev.request_id, ev.task, ev.query, att.tier))
        teacher = next((a.response for a in ev.attempts if a.tier == teacher_tier and a.accepted and a.response), None)
        teacher = teacher or shadow_answers.get(ev.request_id)
        later = ev.attempts[idx + 1 :]
        if not att.accepted and later:
            cost = att.cost_usd + sum(a.cost_usd for a in later)
            failures.append(Failure(ev.request_id, ev.task, ev.query, att.tier, "rejected", cost, teacher))
            continue
        if att.accepted and (ev.request_id, att.tier) in unacceptable:
            cost = att.cost_usd + teacher_cost
            failures.append(Failure(ev.request_id, ev.task, ev.query, att.tier, "labelled_unacceptable", cost, teacher))
    return failures, tried


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cluster_embeddings(
    x: np.ndarray, method: str = "kmeans", max_clusters: int = 20, min_cluster_size: int = 10, seed: int = 0,
    silhouette_sample: int = 3000,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Cluster labels (NOISE = -1 for dropped points) and how they were chosen (k, silhouette per k)."""
    from sklearn.cluster import HDBSCAN, KMeans
    from sklearn.metrics import silhouette_score

    x = _normalise(np.asarray(x, dtype=np.float64))
    n = len(x)
    info: dict[str, Any] = {"method": method}
    if n < 2 * min_cluster_size or n < 3:
        info["note"] = f"too few failures ({n}) for clusters of at least {min_cluster_size}: one cluster"
        return np.zeros(n, dtype=int), info
    if method == "hdbscan":
        labels = HDBSCAN(min_cluster_size=min_cluster_size, metric="euclidean", copy=True).fit_predict(x)
        info["k"] = int(len(set(labels) - {NOISE}))
        return labels.astype(int), info
    if method != "kmeans":
        raise StageError(f"--method: {method!r} is not one of kmeans, hdbscan")
    rng = np.random.default_rng(seed)
    sample = rng.choice(n, size=min(n, silhouette_sample), replace=False)
    scores: dict[int, float] = {}
    best: tuple[float, int, np.ndarray] | None = None
    for k in range(2, min(max_clusters, n // min_cluster_size, n - 1) + 1):
        labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)
        if len(set(labels[sample])) < 2:
            continue
        s = float(silhouette_score(x[sample], labels[sample], metric="cosine"))
        scores[k] = round(s, 4)
        if best is None or s > best[0]:
            best = (s, k, labels)
    if best is None:
        return np.zeros(n, dtype=int), {**info, "k": 1}
    labels = best[2].copy()
    for c in set(labels):  # small clusters are noise: not worth an adapter of their own
        if (labels == c).sum() < min_cluster_size:
            labels[labels == c] = NOISE
    info.update(k=best[1], silhouette=round(best[0], 4), silhouette_by_k=scores)
    return labels.astype(int), info


def rank_clusters(
    failures: list[Failure], labels: np.ndarray, x_fail: np.ndarray, x_ok: np.ndarray, n_examples: int = 5
) -> list[dict[str, Any]]:
    """Clusters (noise left out) sorted by cost caused, with sizes, escalation rates and example queries.

    x_ok: embeddings of the cheap-tier requests that did NOT fail; each counts for the cluster with the nearest
    centroid, so escalation rate = members / (members + successes nearest to it). Cluster ids are re-numbered by
    rank (0 = costliest) so that reports read top-down.
    """
    ids = sorted(set(labels.tolist()) - {NOISE})
    if not ids:
        return []
    xf = _normalise(x_fail)
    centroids = np.stack([_normalise(xf[labels == c].mean(axis=0, keepdims=True))[0] for c in ids])
    nearest = np.argmax(_normalise(x_ok) @ centroids.T, axis=1) if len(x_ok) else np.array([], dtype=int)
    clusters = []
    for j, c in enumerate(ids):
        members = [i for i, lab in enumerate(labels) if lab == c]
        cost = sum(failures[i].cost_usd for i in members)
        near = int((nearest == j).sum())
        # examples: the members closest to the centroid are the most typical
        order = sorted(members, key=lambda i: -float(xf[i] @ centroids[j]))
        clusters.append({
            "source_label": int(c),
            "size": len(members),
            "cost_usd": round(cost, 8),
            "escalation_rate": round(len(members) / (len(members) + near), 4),
            "tasks": sorted({failures[i].task for i in members}),
            "examples": [failures[i].query[:200] for i in order[:n_examples]],
            "members": members,
            "centroid": centroids[j],
        })
    clusters.sort(key=lambda c: (-c["cost_usd"], -c["size"]))
    for rank, c in enumerate(clusters):
        c["id"] = rank
    return clusters


def cost_cover(clusters: list[dict[str, Any]], total_cost: float, share: float) -> int | None:
    """How many of the ranked clusters hold `share` of all failure cost (None: the clusters together hold less, the
    rest being noise): the `topClusters` that targets most of what failures cost."""
    held = 0.0
    for k, c in enumerate(clusters, 1):
        held += c["cost_usd"]
        if total_cost > 0 and held >= share * total_cost - 1e-12:
            return k
    return None


def embed(texts: list[str], encoder_path: str | None = None, spec=None) -> np.ndarray:
    """The router's MiniLM encoder, so that clusters live in the space the router routes in. `spec`
    (`routenlp.router.encoder.EncoderSpec`): the variant and token budget (default: fp32 MiniLM, 256 tokens)."""
    from routenlp.router.encoder import EncoderSpec, load_encoder, serving_spec

    enc = load_encoder(serving_spec(spec or EncoderSpec()), encoder_path)
    return np.asarray(enc.encode(texts), dtype=np.float32)


def read_log(events_dir: Path) -> list[Any]:
    from routenlp.router.eventlog import read_events

    return list(read_events(events_dir))


def run(args: argparse.Namespace) -> dict[str, Any]:
    params = {
        "teacher_tier": args.teacher_tier, "student_tier": args.student_tier, "task": args.task,
        "method": args.method, "max_clusters": args.max_clusters, "min_cluster_size": args.min_cluster_size,
        "top_clusters": args.top_clusters, "seed": args.seed, "encoder": args.encoder,
        "router_version": args.router_version,
    }
    st = Stage("cluster", local_path(args.out, "--out"), {"events": args.events}, params,
               summary_metrics=("failures", "requests", "clusters", "k", "top_cost_share"))
    if st.done():
        return st.finish_skipped()
    with st.timed("read"):
        events = read_log(local_path(args.events, "--events"))
        failures, tried = select_failures(events, args.teacher_tier, args.student_tier, args.task, args.router_version)
    if not failures:
        under = f" under router version {args.router_version!r}" if args.router_version else ""
        raise StageError(f"--events: no escalation failures of a tier other than {args.teacher_tier!r}{under} in "
                         f"{args.events}")
    failed = {f.request_id for f in failures}
    ok = [r for r in tried if r.request_id not in failed]
    with st.timed("embed"):
        x = embed([f.query for f in failures] + [r.query for r in ok], args.encoder)
        x_fail, x_ok = x[: len(failures)], x[len(failures) :]
    with st.timed("cluster"):
        labels, info = cluster_embeddings(x_fail, args.method, args.max_clusters, args.min_cluster_size, args.seed)
        clusters = rank_clusters(failures, labels, x_fail, x_ok)
    by_member = {i: c["id"] for c in clusters for i in c["members"]}
    total_cost = sum(f.cost_usd for f in failures)
    top = clusters[: args.top_clusters]
    cover = cost_cover(clusters, total_cost, 0.8)
    report = {
        "teacher_tier": args.teacher_tier,
        "failures": len(failures),
        "requests": len(tried),
        "total_cost_usd": round(total_cost, 8),
        "clustering": info,
        "top_clusters": [c["id"] for c in top],
        "cost_cover_80": cover,
        "clusters": [{k: v for k, v in c.items() if k not in ("members", "centroid", "source_label")} for c in clusters],
    }
    st.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(st.output("report", "clusters.json"), report)
    rows = [{**asdict(f), "cluster": by_member.get(i, NOISE)} for i, f in enumerate(failures)]
    write_jsonl(st.output("failures", "failures.jsonl"), rows)
    np.save(st.out_dir / "centroids.npy", np.stack([c["centroid"] for c in clusters]) if clusters else np.zeros((0, x.shape[1])))
    st.output("centroids", "centroids.npy")
    st.metrics.update(
        failures=len(failures), requests=len(tried), clusters=len(clusters), k=info.get("k"),
        noise=int((labels == NOISE).sum()),
        top_cost_share=round(sum(c["cost_usd"] for c in top) / total_cost, 4) if total_cost else None,
        cost_cover_80=cover,
        top=[{"id": c["id"], "size": c["size"], "cost_usd": c["cost_usd"], "escalation_rate": c["escalation_rate"],
              "examples": c["examples"][:3]} for c in top],
    )
    return st.finish()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", required=True, help="event log directory (path or file:// URI)")
    p.add_argument("--out", required=True, help="output directory (clusters.json, failures.jsonl, manifest.json)")
    p.add_argument("--teacher-tier", required=True, help="the reference/teacher tier; every other tier is 'cheap'")
    p.add_argument("--student-tier", help="count failures of this tier only (default: every tier but the teacher)")
    p.add_argument("--task", help="only this task's requests")
    p.add_argument("--router-version", help="only requests this router version routed (a campaign's later rounds)")
    p.add_argument("--method", choices=("kmeans", "hdbscan"), default="kmeans")
    p.add_argument("--max-clusters", type=int, default=20, help="largest k tried (kmeans)")
    p.add_argument("--min-cluster-size", type=int, default=10, help="smallest cluster kept")
    p.add_argument("--top-clusters", type=int, default=5, help="costliest clusters reported for distillation")
    p.add_argument("--encoder", help="all-MiniLM-L6-v2 folder (default: the router's)")
    p.add_argument("--seed", type=int, default=0)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="routenlp train cluster", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    print_summary(run(p.parse_args(argv)))
    return 0
