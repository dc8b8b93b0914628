"""NetworkPolicies the operator renders, judged by what they let through: a small pure evaluator of Kubernetes
NetworkPolicy ingress semantics (label selectors, namespace selectors, ipBlocks, ports; policies add up; a pod no
policy selects is open) runs the rendered objects against pods labelled exactly as the builders label them."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import jsonpatch
import kubernetes_validate
import pytest

from routenlp.api import DistillationCampaign, ModelTier, RoutingPolicy
from routenlp.operator import campaign, meta, modeltier, routingpolicy, webhook

API = "routenlp.io/v1alpha1"
NS = "team-a"
OPERATOR_NS = "routenlp-system"
OPERATOR_LABELS = {"app.kubernetes.io/name": "routenlp", "app.kubernetes.io/instance": "rn",
                   "app.kubernetes.io/component": "operator"}
PEERS = meta.NetworkPeers(OPERATOR_NS, OPERATOR_LABELS, "monitoring")


# ---------------------------------------------------------------- the evaluator


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """metav1.LabelSelector semantics ({} selects everything)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


@dataclass(frozen=True)
class Source:
    """Who opens the connection: a pod (namespace + labels) or, with namespace None, an address outside the cluster."""

    namespace: str | None
    labels: dict = field(default_factory=dict)
    ip: str = "10.244.1.9"

    def __hash__(self) -> int:
        return hash((self.namespace, tuple(sorted(self.labels.items())), self.ip))


def namespace_labels(ns: str) -> dict[str, str]:
    return {meta.NAMESPACE_NAME_LABEL: ns}  # what the API server sets on every namespace


def peer_admits(peer: dict, policy_ns: str, src: Source) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        addr = ipaddress.ip_address(src.ip)
        return addr in ipaddress.ip_network(block["cidr"]) and not any(
            addr in ipaddress.ip_network(e) for e in block.get("except") or [])
    if src.namespace is None:  # pod and namespace selectors match pods only
        return False
    if "namespaceSelector" in peer:
        ns_ok = selects(peer["namespaceSelector"], namespace_labels(src.namespace))
    else:
        ns_ok = src.namespace == policy_ns  # a bare podSelector means the policy's own namespace
    return ns_ok and selects(peer.get("podSelector") or {}, src.labels)


def allowed(policies: list[dict], src: Source, dst_ns: str, dst_labels: dict, port: int) -> bool:
    selecting = [p for p in policies if p["metadata"]["namespace"] == dst_ns
                 and "Ingress" in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], dst_labels)]
    if not selecting:
        return True  # not isolated
    for p in selecting:
        for rule in p["spec"].get("ingress") or []:
            ports_ok = not rule.get("ports") or any(r["port"] == port for r in rule["ports"])
            from_ok = not rule.get("from") or any(peer_admits(peer, dst_ns, src) for peer in rule["from"])
            if ports_ok and from_ok:
                return True
    return False


def test_the_evaluator_itself():
    pol = {"metadata": {"namespace": "n"}, "spec": {"podSelector": {"matchLabels": {"app": "db"}},
           "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                                     "ports": [{"protocol": "TCP", "port": 5432}]}]}}
    assert allowed([pol], Source("n", {"app": "web"}), "n", {"app": "db"}, 5432)
    assert not allowed([pol], Source("other", {"app": "web"}), "n", {"app": "db"}, 5432)  # podSelector: same ns
    assert not allowed([pol], Source("n", {"app": "web"}), "n", {"app": "db"}, 22)
    assert allowed([pol], Source("n", {}), "n", {"app": "cache"}, 6379)  # not selected: open
    assert selects({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["x"]}]}, {})
    assert not selects({"matchExpressions": [{"key": "a", "operator": "In", "values": ["x"]}]}, {})


# ---------------------------------------------------------------- the scenario


def mt(name: str, external: bool = False) -> ModelTier:
    spec = {"servedModelName": name, "cost": {"inputPerMillion": 0.1, "outputPerMillion": 0.3}}
    spec.update({"external": {"baseUrl": "https://x.example/v1", "model": name}} if external
                else {"engine": {"model": "org/m"}})
    return ModelTier.model_validate({"apiVersion": API, "kind": "ModelTier", "metadata": {"name": name}, "spec": spec})


def rp(name: str, tiers: tuple[str, ...], **deployment) -> RoutingPolicy:
    return RoutingPolicy.model_validate({"apiVersion": API, "kind": "RoutingPolicy", "metadata": {"name": name},
                                         "spec": {"tiers": [{"name": t} for t in tiers], "tasks": [{"name": "chat"}],
                                                  "deployment": deployment}})


def owner(kind: str, name: str) -> dict:
    return {"apiVersion": API, "kind": kind, "metadata": {"name": name, "uid": "00000000-0000-4000-8000-000000000001"}}


TIERS = {t.metadata.name: t for t in (mt("small"), mt("mid"), mt("large", external=True))}
SUPPORT = rp("support", ("small", "mid", "large"), network={"allowedClientNamespaces": ["apps"],
                                                            "allowedClientCidrs": ["203.0.113.0/24"]})
OTHER = rp("other", ("mid", "large"), mode="sidecar")


def rendered(support: RoutingPolicy = SUPPORT) -> list[dict]:
    objs = [o for t in TIERS.values() for o in modeltier.tier_objects(t, owner("ModelTier", t.metadata.name), NS, PEERS)]
    for policy in (support, OTHER):
        tiers = [TIERS[r.name] for r in policy.spec.tiers]
        objs += routingpolicy.policy_objects(policy, tiers, owner("RoutingPolicy", policy.metadata.name), NS,
                                        peers=PEERS)[0]
    return [o for o in objs if o["kind"] == "NetworkPolicy"]


def template_labels(obj: dict) -> dict:
    return obj["spec"]["template"]["metadata"]["labels"]


def tier_pod(name: str) -> dict:
    return template_labels(modeltier.tier_deployment(TIERS[name], owner("ModelTier", name), NS))


def gateway_router_pod() -> dict:
    return template_labels(routingpolicy.router_deployment(SUPPORT, list(TIERS.values()), owner("RoutingPolicy", "support"),
                                                      NS, "h"))


def sidecar_pod(policy: RoutingPolicy) -> dict:
    """An application pod as the webhook leaves it."""
    pod = {"metadata": {"labels": {"app": "shop", "routenlp.io/policy": policy.metadata.name}},
           "spec": {"containers": [{"name": "app", "image": "shop"}]}}
    return jsonpatch.apply_patch(pod, webhook.sidecar_patch(pod, policy, []))["metadata"]["labels"]


def campaign_pod(policy: str) -> dict:
    spec = {"policyRef": policy, "studentTier": "mid", "teacherTier": "large"}
    c = DistillationCampaign.model_validate({"apiVersion": API, "kind": "DistillationCampaign",
                                             "metadata": {"name": f"{policy}-c"}, "spec": spec})
    ctx = campaign.stage_context(c, SUPPORT, TIERS["mid"], TIERS["large"], NS)
    return template_labels(campaign.stage_job(c, owner("DistillationCampaign", c.metadata.name), NS, "Evaluating", 1,
                                              1, "ev", ctx))


OPERATOR = Source(OPERATOR_NS, OPERATOR_LABELS)
PROMETHEUS = Source("monitoring", {"app.kubernetes.io/name": "prometheus"})
VLLM = meta.VLLM_PORT


def test_every_rendered_network_policy_is_a_valid_object_owned_by_its_resource():
    nps = rendered()
    # Per engine tier one (the tier's); per policy one for its engine tiers, and one for a gateway router.
    assert sorted(o["metadata"]["name"] for o in nps) == ["mid-tier", "other-tiers", "small-tier",
                                                          "support-router", "support-tiers"]
    for o in nps:
        kubernetes_validate.validate(o, "1.37", strict=True)
        assert o["metadata"]["ownerReferences"][0]["controller"] is True
        assert o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "routenlp-operator"


@pytest.mark.parametrize("who,src,tier", [
    ("gateway router of the policy", lambda: Source(NS, gateway_router_pod()), "small"),
    ("gateway router, second tier", lambda: Source(NS, gateway_router_pod()), "mid"),
    ("sidecar-injected pod of a policy using the tier", lambda: Source(NS, sidecar_pod(OTHER)), "mid"),
    ("campaign Job of the policy (student probes)", lambda: Source(NS, campaign_pod("support")), "small"),
    ("the operator (LoRA loading)", lambda: OPERATOR, "small"),
    ("the operator, a tier no policy lists yet", lambda: OPERATOR, "mid"),
])
def test_tier_pods_accept_their_routers_campaign_jobs_and_the_operator(who, src, tier):
    assert allowed(rendered(), src(), NS, tier_pod(tier), VLLM), who


@pytest.mark.parametrize("who,src,tier,port", [
    ("another policy's sidecar pod", lambda: Source(NS, sidecar_pod(OTHER)), "small", VLLM),
    ("another policy's campaign Job", lambda: Source(NS, campaign_pod("other")), "small", VLLM),
    ("an unlabelled pod of the namespace", lambda: Source(NS, {"app": "shop"}), "small", VLLM),
    ("a pod claiming the label from another namespace", lambda: Source("evil", gateway_router_pod()), "small", VLLM),
    ("operator labels in another namespace", lambda: Source("evil", OPERATOR_LABELS), "small", VLLM),
    ("the operator on another port", lambda: OPERATOR, "small", 22),
    ("the outside world", lambda: Source(None, ip="198.51.100.7"), "small", VLLM),
])
def test_tier_pods_deny_everyone_else(who, src, tier, port):
    assert not allowed(rendered(), src(), NS, tier_pod(tier), port), who


ROUTER, ADMIN = 8080, 9091


@pytest.mark.parametrize("src,port,ok", [
    (Source(NS, {"app": "shop"}), ROUTER, True),  # the policy's own namespace
    (Source("apps", {"app": "web"}), ROUTER, True),  # allowedClientNamespaces
    (Source(None, ip="203.0.113.40"), ROUTER, True),  # allowedClientCidrs
    (Source("evil", {"app": "web"}), ROUTER, False),
    (Source(None, ip="198.51.100.7"), ROUTER, False),
    (OPERATOR, ADMIN, True),  # rollout figures
    (PROMETHEUS, ADMIN, True),  # /metrics
    (Source(NS, {"app": "shop"}), ADMIN, False),  # a client never reaches /routenlp/* or /metrics
    (Source("apps", {"app": "web"}), ADMIN, False),
    (Source(None, ip="203.0.113.40"), ADMIN, False),
    (Source("evil", OPERATOR_LABELS), ADMIN, False),
])
def test_gateway_router_accepts_clients_on_its_port_and_only_operator_and_monitoring_on_admin(src, port, ok):
    assert allowed(rendered(), src, NS, gateway_router_pod(), port) is ok


def test_all_namespaces_opens_the_client_port_only():
    wide = rp("support", ("small", "mid", "large"), network={"allowedClientNamespaces": ["*"]})
    assert allowed(rendered(wide), Source("evil", {}), NS, gateway_router_pod(), ROUTER)
    assert not allowed(rendered(wide), Source("evil", {}), NS, gateway_router_pod(), ADMIN)
    assert not allowed(rendered(wide), Source(None, ip="203.0.113.40"), NS, gateway_router_pod(), ROUTER)


def test_no_monitoring_namespace_closes_admin_to_prometheus():
    peers = meta.NetworkPeers(OPERATOR_NS, OPERATOR_LABELS, None)
    np = routingpolicy.router_network_policy(SUPPORT, owner("RoutingPolicy", "support"), NS, peers)
    assert not allowed([np], PROMETHEUS, NS, gateway_router_pod(), ADMIN)
    assert allowed([np], OPERATOR, NS, gateway_router_pod(), ADMIN)


def test_external_only_policy_and_sidecar_mode_render_no_router_policy():
    ext = rp("ext", ("large",), mode="sidecar")
    objs, _ = routingpolicy.policy_objects(ext, [TIERS["large"]], owner("RoutingPolicy", "ext"), NS, peers=PEERS)
    assert [o for o in objs if o["kind"] == "NetworkPolicy"] == []  # nothing to guard: app pods are the app's


def test_network_peers_from_the_operator_environment():
    assert meta.NetworkPeers.from_env({"ROUTENLP_NETWORK_POLICIES": "false"}) is None
    default = meta.NetworkPeers.from_env({})
    assert default == meta.NetworkPeers()
    assert default.operator() == {"namespaceSelector": {},  # any namespace, the chart's operator pod labels
                                  "podSelector": {"matchLabels": meta.DEFAULT_OPERATOR_LABELS}}
    peers = meta.NetworkPeers.from_env({
        "POD_NAMESPACE": OPERATOR_NS, "ROUTENLP_MONITORING_NAMESPACE": "monitoring",
        "ROUTENLP_OPERATOR_POD_LABELS": ",".join(f"{k}={v}" for k, v in OPERATOR_LABELS.items())})
    assert peers == PEERS
