"""The operator acting on what routers report at /routenlp/rollout: canary promotion and rollback, figures summed
over several gateway pods, the BudgetExceeded condition, and EscalationRate-triggered campaigns (trigger.minFailures)
— first with fake router answers (FakePods), then with the real router app (build_app) serving them."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from kube_emulator.campaigns import set_earlier_run
from kube_emulator.harness import free_port, wait_for
from kube_emulator.specs import campaign, policy, tier

DEP = "/apis/apps/v1"


def _router_pod(cluster, ns: str, name: str, i: int, ip: str) -> None:
    dep = wait_for(lambda: cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/{name}-router"), what="router")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    cluster.api.create(f"/api/v1/namespaces/{ns}/pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": f"{name}-router-{i}", "labels": labels}, "spec": {"containers": [{"name": "router", "image": "x"}]}})
    cluster.api.patch(f"/api/v1/namespaces/{ns}/pods/{name}-router-{i}/status", {"status": {
        "phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}})


def _canary_policy(cluster, ns: str, min_requests: int = 100, **spec) -> None:
    """Policy p (auto versions, 20% canary, guard at `min_requests`) with v1 current and v2 in canary."""
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("s"))
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("t"))
    cluster.api.create(cluster.cr_path("routingpolicies", ns), policy(
        "p", ["s", "t"], router={"version": "auto", "canaryPercent": 20,
                                 "promotionGuard": {"minRequests": min_requests, "minLabels": 20}}, **spec))
    wait_for(lambda: cluster.condition("routingpolicies", ns, "p", "TiersResolved"), what="resolved")
    now = datetime.now(timezone.utc)
    for h, (name, version) in zip((2, 1), (("c1", "v1"), ("c2", "v2"))):
        cluster.api.create(cluster.cr_path("distillationcampaigns", ns),
                           campaign(name, "p", "s", "t", trigger={"mode": "Schedule", "schedule": "0 3 1 1 *"}))
        # 60 s: by this point the shared emulator holds every earlier test's objects and the 1 s resync reconciles
        # them all; under a loaded machine the default 20 s ran out once (a hang guard, not a timing assertion)
        set_earlier_run(cluster, ns, name, {"phase": "Succeeded", "routerVersion": version, "run": 1,
                                            "lastRunTime": (now - timedelta(hours=h)).strftime("%Y-%m-%dT%H:%M:%SZ")},
                        lambda v=version: v in (cluster.get_cr("routingpolicies", ns, "p")["status"].get("router")
                                                or {}).values(), what=f"{version} in status.router")


def test_canary_rolled_back_on_violations_reported_by_the_router(cluster):
    ns = "fig-rollback"
    _canary_policy(cluster, ns)
    url = f"http://p-router.{ns}.svc:9091/routenlp/rollout"
    # Too few canary requests: the guard waits, whatever the rates.
    cluster.pods.json[url] = {"canary": {"version": "v2", "requests": 40, "violationRate": 0.5, "acceptanceRate": 0.1},
                              "stable": {"version": "v1", "requests": 400, "violationRate": 0.01,
                                         "acceptanceRate": 0.7}, "spentUsd24h": 1.0}
    reads = lambda: sum(1 for _, u in list(cluster.pods.calls) if u == url)  # noqa: E731
    before = reads()
    wait_for(lambda: reads() >= before + 2, what="two resyncs reading the figures")
    assert cluster.get_cr("routingpolicies", ns, "p")["status"]["router"]["canary"] == "v2"
    # Enough requests, violation rate above the risk level (0.05 by default): rolled back, Warning Event.
    cluster.pods.json[url] = {"canary": {"version": "v2", "requests": 150, "violationRate": 0.12,
                                         "acceptanceRate": 0.7},
                              "stable": {"version": "v1", "requests": 900, "violationRate": 0.01,
                                         "acceptanceRate": 0.7, "escalationRate": 0.3, "costReduction": 0.4,
                                         "escalations": 270}, "spentUsd24h": 3.0}
    router = wait_for(lambda: (r := cluster.get_cr("routingpolicies", ns, "p")["status"]["router"]).get("canary")
                      is None and r, what="rollback")
    assert router["current"] == "v1"
    assert router["history"][-1]["version"] == "v2" and router["history"][-1]["action"] == "RolledBack"
    assert router["history"][-1]["reason"] == "ViolationRateAboveRisk"
    ev = wait_for(lambda: [e for e in cluster.events(ns, "p") if e["reason"] == "RouterRolledBack"], what="event")
    assert ev[0]["type"] == "Warning"
    st = wait_for(lambda: (s := cluster.get_cr("routingpolicies", ns, "p")["status"]).get("escalations") and s,
                  what="figures in status")
    assert (st["escalations"], st["spentUsd24h"], st["costReduction"]) == (270, 3.0, 0.4)


def test_figures_summed_over_router_pods_and_budget_exceeded(cluster):
    ns = "fig-budget"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("s"))
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("t"))
    cluster.api.create(cluster.cr_path("routingpolicies", ns), policy(
        "p", ["s", "t"], budget={"maxUsdPerDay": 10}, deployment={"replicas": 2}))
    one = {"stable": {"version": "v1", "requests": 100, "accepted": 60, "escalations": 40, "labelled": 10,
                      "violations": 0, "spentUsd": 2.0, "referenceCostUsd": 8.0}, "canary": None, "spentUsd24h": 6.0}
    two = {"stable": {"version": "v1", "requests": 300, "accepted": 240, "escalations": 60, "labelled": 30,
                      "violations": 2, "spentUsd": 4.0, "referenceCostUsd": 12.0}, "canary": None, "spentUsd24h": 7.0}
    for i, (ip, answer) in enumerate((("10.8.0.1", one), ("10.8.0.2", two))):
        cluster.pods.json[f"http://{ip}:9091/routenlp/rollout"] = answer
        _router_pod(cluster, ns, "p", i, ip)
    # Each pod is asked (the Service would answer for one replica only) and the counts summed: 13 USD > 10.
    cond = wait_for(lambda: (c := cluster.condition("routingpolicies", ns, "p", "BudgetExceeded"))
                    and c["status"] == "True" and c, what="BudgetExceeded")
    assert cond["reason"] == "DailyBudgetExceeded"
    assert cond["message"] == "$13.00 spent over the last 24 h, limit spec.budget.maxUsdPerDay $10.00"
    st = cluster.get_cr("routingpolicies", ns, "p")["status"]
    assert (st["spentUsd24h"], st["escalations"], st["escalationRate"]) == (13.0, 100, 0.25)
    assert st["violationRate"] == 0.05 and st["costReduction"] == 0.7
    ev = wait_for(lambda: [e for e in cluster.events(ns, "p") if e["reason"] == "BudgetExceeded"], what="event")
    assert ev[0]["type"] == "Warning" and "$13.00" in ev[0]["message"]
    # Spend falls back under the limit (old buckets leave the 24 h window): condition False, one Normal Event.
    for ip in ("10.8.0.1", "10.8.0.2"):
        cluster.pods.json[f"http://{ip}:9091/routenlp/rollout"] = {**one, "spentUsd24h": 2.0}
    cond = wait_for(lambda: (c := cluster.condition("routingpolicies", ns, "p", "BudgetExceeded"))["status"] == "False"
                    and c, what="within budget")
    assert cond["reason"] == "WithinBudget"
    assert wait_for(lambda: [e for e in cluster.events(ns, "p") if e["reason"] == "WithinBudget"], what="event")
    assert len([e for e in cluster.events(ns, "p") if e["reason"] == "BudgetExceeded"]) == 1  # not one per resync


def test_prefer_cheaper_switch_follows_the_budget_without_restarting_routers(cluster):
    """action PreferCheaper: over budget, the router-state ConfigMap (mounted into the router pods, outside the config
    hash) says preferCheaper; back within budget it says so no more. The router Deployment's template, and so its
    pods and the spend they count, stay as they were."""
    ns = "fig-cheaper"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("s"))
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("t"))
    cluster.api.create(cluster.cr_path("routingpolicies", ns), policy(
        "p", ["s", "t"], budget={"maxUsdPerDay": 10, "action": "PreferCheaper"}, deployment={"replicas": 1}))
    url = "http://10.9.0.1:9091/routenlp/rollout"
    answer = {"stable": {"version": "v1", "requests": 10, "spentUsd": 1.0, "referenceCostUsd": 4.0}, "canary": None,
              "spentUsd24h": 3.0}
    cluster.pods.json[url] = answer
    _router_pod(cluster, ns, "p", 0, "10.9.0.1")

    def state():
        cm = cluster.api.get(f"/api/v1/namespaces/{ns}/configmaps/p-router-state")
        return yaml.safe_load(cm["data"]["state.yaml"]) if cm else None

    def template():
        dep = cluster.api.get(f"/apis/apps/v1/namespaces/{ns}/deployments/p-router")
        return dep and dep["spec"]["template"]

    wait_for(lambda: cluster.condition("routingpolicies", ns, "p", "BudgetExceeded")["status"] == "False",
             what="within budget")
    assert state() == {"preferCheaper": False}
    before = template()
    assert {"name": "router-state", "configMap": {"name": "p-router-state", "optional": True}} in before["spec"]["volumes"]
    assert {"name": "router-state", "mountPath": "/etc/routenlp-state", "readOnly": True} in \
        before["spec"]["containers"][0]["volumeMounts"]
    cluster.pods.json[url] = {**answer, "spentUsd24h": 12.0}
    wait_for(lambda: state() == {"preferCheaper": True}, what="preferCheaper on")
    # the ConfigMap is applied before the status patch of the same reconcile: wait for the condition too
    cond = wait_for(lambda: (c := cluster.condition("routingpolicies", ns, "p", "BudgetExceeded"))["status"] == "True"
                    and c, what="over budget")
    assert "every request starts at the cheapest tier" in cond["message"]
    assert template() == before  # no rollout of the router pods
    cluster.pods.json[url] = {**answer, "spentUsd24h": 5.0}
    wait_for(lambda: state() == {"preferCheaper": False}, what="preferCheaper off")
    assert template() == before


def test_escalation_rate_campaign_waits_for_min_failures_then_starts(cluster):
    ns = "fig-trigger"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("s"))
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("t"))
    cluster.api.create(cluster.cr_path("routingpolicies", ns), policy("p", ["s", "t"]))
    url = f"http://p-router.{ns}.svc:9091/routenlp/rollout"
    cluster.pods.json[url] = {"stable": {"version": "v1", "requests": 500, "escalationRate": 0.4, "escalations": 200},
                              "canary": None, "spentUsd24h": 1.0}
    cluster.api.create(cluster.cr_path("distillationcampaigns", ns), campaign(
        "c", "p", "s", "t", trigger={"mode": "EscalationRate", "escalationRateThreshold": 0.3, "minFailures": 300}))
    cond = wait_for(lambda: (c := cluster.condition("distillationcampaigns", ns, "c")) and "minFailures" in c["message"]
                    and c, what="waiting on minFailures")
    assert cond["reason"] == "WaitingForTrigger"
    assert cond["message"] == ("phase Pending: waiting for the trigger: "
                               "200 escalation failures observed, minFailures 300")
    assert not cluster.get_cr("distillationcampaigns", ns, "c")["status"].get("run")
    cluster.pods.json[url] = {"stable": {"version": "v1", "requests": 800, "escalationRate": 0.4, "escalations": 320},
                              "canary": None, "spentUsd24h": 1.0}
    st = wait_for(lambda: (s := cluster.get_cr("distillationcampaigns", ns, "c")["status"]).get("run") and s,
                  what="run started")
    assert st["run"] == 1 and st["phase"] == "Clustering"
    assert wait_for(lambda: [e for e in cluster.events(ns, "c") if "EscalationRate" in e.get("message", "")],
                    what="start event")


# ---------------------------------------------------------------- the real router serving the figures
LABELLER_TOKEN = "reviewer-token-0123456789abcdef"


@pytest.fixture(scope="module")
def real_router(tmp_path_factory):
    """The router app (build_app) on a loopback port with fake OpenAI-compatible tiers, serving v1 as stable and
    v2 as a 20% canary — the versions and share the operator's status says (the test mirrors the config the operator
    renders; the tiers and artifact paths are local). Shadow labelling on every answer gives labelled traffic."""
    from unit.router.fakes import FakeEncoder, FakeTier
    from unit.router.live import Live

    from routenlp.router.artifacts import Calibration, save_artifact
    from routenlp.api.router_config import RouterAuth, RouterConfig
    from routenlp.router.conformal import ThresholdResult
    from routenlp.router.server import build_app

    tmp = tmp_path_factory.mktemp("router")
    res = ThresholdResult(0.5, 500, 300, 0.01, True)
    for v in ("v1", "v2"):
        save_artifact(tmp / "artifacts", v, router=None,
                      calibration=Calibration(0.05, 0.1, tasks={"intent": {"s": res}}))
    live = Live()
    fakes = [FakeTier("s", 0), FakeTier("t", 2)]
    ports = [live.serve(f.app()) for f in fakes]
    config = RouterConfig.model_validate({
        "policy": "p",
        "tiers": [{"name": n, "servedModelName": f"{n}-model", "baseUrl": f"http://127.0.0.1:{port}/v1",
                   "cost": {"inputPerMillion": c, "outputPerMillion": c}, "timeoutSeconds": 5}
                  for n, port, c in zip(("s", "t"), ports, (0.1, 10.0))],
        "tasks": [{"name": "intent", "kind": "structured", "answers": ["refund", "card"], "qualityTarget": 0.9}],
        "defaultTask": "intent", "shadowSampleRate": 1.0,
        "cascade": {"riskLevel": 0.05, "delta": 0.1, "minCalibrationSamples": 200},
        "router": {"artifactDir": str(tmp / "artifacts"), "current": "v1", "canary": "v2", "canaryPercent": 20},
        "eventLogDir": str(tmp / "events")})
    admin = free_port()  # /metrics and /routenlp/* only there, as the operator renders it (adminPort)
    labellers = tmp / "labellers"  # the mounted labellers Secret: file name = labeller, content = token
    labellers.mkdir()
    (labellers / "reviewer").write_text(LABELLER_TOKEN)
    config = config.model_copy(update={"admin_port": admin, "auth": RouterAuth(labellers_dir=str(labellers))})
    port = live.serve(build_app(config, encoder=FakeEncoder(), admin_host="127.0.0.1"))
    yield live, port, admin
    live.close()


def _serve_traffic(port: int, admin: int, n: int) -> tuple[list[str], list[str]]:
    """n requests to each version (the canary split is a stable hash of the request id); all answered by the
    cheap tier and shadow-labelled acceptable by the reference. Returns the (stable, canary) request ids."""
    from unit.router.live import request

    from routenlp.router import cascade

    ids = [f"req-{i}" for i in range(20 * n)]
    stable = [i for i in ids if cascade.canary_bucket(i) >= 20][:n]
    canary = [i for i in ids if cascade.canary_bucket(i) < 20][:n]
    for rid in stable + canary:
        status, h, _ = request(port, "POST", "/v1/chat/completions",
                               {"model": "intent", "messages": [{"role": "user", "content": "refund please, easy"}]},
                               headers={"x-request-id": rid})
        assert status == 200 and h["x-routenlp-tier"] == "s"
    wait_for(lambda: _figures(admin)["canary"]["labelled"] >= n and _figures(admin)["stable"]["labelled"] >= n,
             what="shadow labels")
    return stable, canary


def _figures(port: int) -> dict:
    from unit.router.live import request

    return json.loads(request(port, "GET", "/routenlp/rollout")[2])


def _point_at(cluster, ns: str, port: int) -> None:
    """A ready router pod at 127.0.0.1: the operator asks http://127.0.0.1:<adminPort>/routenlp/rollout."""
    cluster.pods.real.append(f"http://127.0.0.1:{port}/")
    _router_pod(cluster, ns, "p", 0, "127.0.0.1")


def test_real_router_figures_promote_then_roll_back_a_canary(cluster, real_router):
    from unit.router.live import request

    live, port, admin = real_router
    assert request(port, "GET", "/routenlp/rollout")[0] == 404  # clients' port: no admin endpoints
    stable_ids, canary_ids = _serve_traffic(port, admin, 25)
    served = _figures(admin)
    assert (served["stable"]["version"], served["canary"]["version"]) == ("v1", "v2")
    assert served["canary"]["requests"] == 25 and served["canary"]["violationRate"] == 0.0
    # Namespace A: the guard (20 canary requests, violations <= riskLevel, no acceptance drop) holds -> promoted.
    ns = "fig-real-promote"
    _canary_policy(cluster, ns, min_requests=20,
                   deployment={"replicas": 1, "service": {"port": port}, "adminPort": admin})
    _point_at(cluster, ns, admin)
    router = wait_for(lambda: (r := cluster.get_cr("routingpolicies", ns, "p")["status"]["router"])
                      .get("current") == "v2" and r, what="promotion from real figures")
    assert router["history"][-1] == {**router["history"][-1], "version": "v2", "action": "Promoted",
                                     "reason": "GuardHeld"}
    st = cluster.get_cr("routingpolicies", ns, "p")["status"]
    assert st["costReduction"] == pytest.approx(served["stable"]["costReduction"], abs=1e-9)
    assert st["escalations"] == 0 and st["escalationRate"] == 0.0
    # An authenticated labeller now says the canary's answers were wrong: its labels replace the shadow judge's (one
    # label per attempt), so the canary's violation rate on labelled traffic climbs to 1.
    for rid in canary_ids:
        assert request(port, "POST", "/v1/feedback", {"request_id": rid, "accepted": False},
                       headers={"Authorization": f"Bearer {LABELLER_TOKEN}"})[0] == 202
    assert _figures(admin)["canary"]["violationRate"] == pytest.approx(1.0)
    assert _figures(admin)["canary"]["labelled"] == len(canary_ids)
    # Namespace B, same figures: the canary breaks the guarantee -> rolled back, the stable keeps serving.
    ns = "fig-real-rollback"
    _canary_policy(cluster, ns, min_requests=20,
                   deployment={"replicas": 1, "service": {"port": port}, "adminPort": admin})
    _point_at(cluster, ns, admin)
    router = wait_for(lambda: (r := cluster.get_cr("routingpolicies", ns, "p")["status"]["router"])
                      .get("history", [{}])[-1].get("action") == "RolledBack" and r, what="rollback from real figures")
    assert router["current"] == "v1" and "canary" not in router
    assert router["history"][-1]["reason"] == "ViolationRateAboveRisk"
