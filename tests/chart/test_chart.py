"""The Helm charts: lint, strict schema validation of what they render, values.schema.json, CRDs == crds/,
RBAC == routenlp.operator.rbac.RULES, pod security, webhook certificates, and PromQL that only names real metrics."""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import tempfile
import threading
from pathlib import Path

import pytest
import yaml

# Value sets every check renders. Each is a realistic installation, not a toggle soup.
VALUE_SETS: dict[str, dict] = {
    "default": {},
    "namespaced": {"operator": {"scope": "namespaced", "watchNamespaces": ["team-a", "team-b"],
                                "peering": {"enabled": False, "name": "routenlp"}}},
    "namespaced-peering": {"operator": {"scope": "namespaced", "watchNamespaces": ["team-a", "team-b"]}},
    "webhook-cert-manager": {"webhook": {"certManager": {"enabled": True}}},
    "webhook-cert-manager-issuer": {
        "webhook": {"certManager": {"enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}}
    },
    "monitoring": {
        "monitoring": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
            "routerMonitor": {"enabled": True},
            "podMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
            "dashboards": {"enabled": True},
        }
    },
    # Cluster-wide, with Secret `get` only in the namespaces that hold RoutingPolicies / external tiers.
    "cluster-secrets": {"rbac": {"secretNamespaces": ["team-a", "team-b"]}},
    "cluster-secrets-everywhere": {"rbac": {"secretNamespaces": ["*"]}},
    "no-network-policies": {"networkPolicy": {"enabled": False, "monitoringNamespace": ""}},
    "crds-off": {"crds": {"install": False}},
    "minimal": {
        "replicaCount": 1,
        "operator": {"peering": {"enabled": False, "name": "routenlp"}, "logFormat": "plain", "verbose": True},
        "webhook": {"enabled": False},
        "metrics": {"enabled": False, "port": 9090},
        "crds": {"keep": False},
        "image": {"repository": "registry.example.com/routenlp/operator",
                  "digest": "sha256:" + "a" * 64},
    },
    "namespaced-monitoring": {
        "operator": {"scope": "namespaced", "peering": {"enabled": False, "name": "routenlp"}},
        "monitoring": {"serviceMonitor": {"enabled": True}, "routerMonitor": {"enabled": True},
                       "podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    },
}

# Bad values and (part of) the message helm prints: each names the field and says what is wrong.
BAD_VALUES = {
    "unknown-key": ({"replicas": 2}, "additional properties 'replicas' not allowed"),
    "bad-scope": ({"operator": {"scope": "everywhere"}}, "at '/operator/scope': value must be one of 'cluster', 'namespaced'"),
    "privileged-port": ({"webhook": {"port": 443}}, "at '/webhook/port': minimum: got 443, want 1,024"),
    "root-user": ({"podSecurityContext": {"runAsNonRoot": False}}, "at '/podSecurityContext/runAsNonRoot': value must be true"),
    "writable-root": ({"securityContext": {"readOnlyRootFilesystem": False}},
                      "at '/securityContext/readOnlyRootFilesystem': value must be true"),
    "escalation-threshold": ({"monitoring": {"prometheusRule": {"escalationRateThreshold": 1.5}}},
                             "at '/monitoring/prometheusRule/escalationRateThreshold': exclusiveMaximum: got 1.5, want 1"),
    # kopf peering pauses every replica that sees a same-priority peer: more than one would stop the operator
    "two-replicas": ({"replicaCount": 2}, "at '/replicaCount': maximum: got 2, want 1"),
    "bad-log-format": ({"operator": {"logFormat": "text"}}, "at '/operator/logFormat': value must be one of 'json', 'plain'"),
    "watch-namespaces-cluster-scope": ({"operator": {"watchNamespaces": ["a"]}},
                                       "at '/operator/watchNamespaces': maxItems: got 1, want 0"),
    "bad-digest": ({"image": {"digest": "latest"}}, "at '/image/digest': 'latest' does not match pattern"),
    "bad-failure-policy": ({"webhook": {"failurePolicy": "Retry"}}, "at '/webhook/failurePolicy': value must be one of 'Fail', 'Ignore'"),
    "webhook-timeout": ({"webhook": {"timeoutSeconds": 60}}, "at '/webhook/timeoutSeconds': maximum: got 60, want 30"),
    "issuer-without-kind": ({"webhook": {"certManager": {"enabled": True, "issuerRef": {"name": "x"}}}},
                            "at '/webhook/certManager/issuerRef'"),
    "servicemonitor-without-metrics": (
        {"metrics": {"enabled": False}, "monitoring": {"serviceMonitor": {"enabled": True}}},
        "at '/metrics/enabled': value must be true",
    ),
    "bad-window": ({"monitoring": {"prometheusRule": {"violationWindow": "half an hour"}}},
                   "at '/monitoring/prometheusRule/violationWindow': 'half an hour' does not match pattern"),
    "bad-namespace": ({"operator": {"scope": "namespaced", "watchNamespaces": ["Team_A"]}},
                      "at '/operator/watchNamespaces/0': 'Team_A' does not match pattern"),
    "capability-added": ({"securityContext": {"capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}}},
                         "at '/securityContext/capabilities/add': maxItems: got 1, want 0"),
}

# Checks the templates make where JSON Schema cannot (message from `fail`).
TEMPLATE_FAILURES = {
    "same-ports": ({"metrics": {"port": 8080}}, "healthPort, metrics.port and webhook.port must differ"),
}


@pytest.fixture(scope="module")
def rendered(h) -> dict[str, list[dict]]:
    return {name: h.render(values) for name, values in VALUE_SETS.items()}


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


# ---------------------------------------------------------------- lint and strict validation


@pytest.mark.parametrize("name", ["default", "namespaced", "webhook-cert-manager", "monitoring", "minimal",
                                  "cluster-secrets"])
def test_helm_lint_strict(h, name):
    values = Path(tempfile.mkdtemp()) / "values.yaml"
    values.write_text(yaml.safe_dump(VALUE_SETS[name]))
    out = h.run(h.tool("helm"), "lint", "--strict", str(h.CHART), "-f", str(values), "--namespace", h.NAMESPACE)
    assert "0 chart(s) failed" in out.stdout


def test_crd_chart_lint_strict(h):
    out = h.run(h.tool("helm"), "lint", "--strict", str(h.CRD_CHART))
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rendered_objects_pass_strict_validation(rendered, h, name):
    objs = rendered[name]
    assert len(objs) >= 5, f"{name}: only {len(objs)} objects rendered"
    errors = [e for o in objs for e in h.validation_errors(o)]
    assert not errors, "\n".join(errors)


def test_validation_catches_mistakes(h):
    """The validator itself: a typo in a built-in kind and in a third-party CR are both reported."""
    deployment = by_kind(h.render(), "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert any("imagePullPolicyy" in e for e in h.validation_errors(deployment))
    monitor = by_kind(h.render(VALUE_SETS["monitoring"]), "ServiceMonitor")[0]
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    assert any("intervall" in e for e in h.validation_errors(monitor))
    assert h.validation_errors({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


def test_expected_objects_per_value_set(rendered):
    kinds = lambda name: sorted({o["kind"] for o in rendered[name]})  # noqa: E731
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "CustomResourceDefinition",
            "MutatingWebhookConfiguration", "Secret", "Pod", "ClusterKopfPeering"} <= set(kinds("default"))
    assert {"Role", "RoleBinding"} <= set(kinds("namespaced"))
    assert {"Certificate", "Issuer"} <= set(kinds("webhook-cert-manager"))
    assert "Secret" not in kinds("webhook-cert-manager")  # cert-manager writes it
    assert "Issuer" not in kinds("webhook-cert-manager-issuer")
    assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"} <= set(kinds("monitoring"))
    assert "CustomResourceDefinition" not in kinds("crds-off")
    assert not {"MutatingWebhookConfiguration", "Secret", "ClusterKopfPeering"} & set(kinds("minimal"))
    crds = lambda name: {o["metadata"]["name"] for o in rendered[name] if o["kind"] == "CustomResourceDefinition"}  # noqa: E731
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= crds("default")
    assert not any(n.endswith("kopf.dev") for n in crds("minimal") | crds("crds-off"))


# ---------------------------------------------------------------- values.schema.json


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_are_rejected_with_a_clear_message(h, case):
    values, message = BAD_VALUES[case]
    proc = h.helm_template(values, check=False)
    assert proc.returncode != 0, f"helm accepted {values}"
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize("case", list(TEMPLATE_FAILURES))
def test_template_checks_fail_clearly(h, case):
    values, message = TEMPLATE_FAILURES[case]
    proc = h.helm_template(values, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_values_yaml_documents_every_schema_key(h):
    """values.yaml (what users read) and values.schema.json (what helm enforces) describe the same keys."""
    schema = json.loads((h.CHART / "values.schema.json").read_text())
    values = yaml.safe_load((h.CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"]) - {"global"}
    for key, sub in schema["properties"].items():
        if sub.get("type") == "object" and "properties" in sub and isinstance(values.get(key), dict):
            assert set(values[key]) <= set(sub["properties"]), key


# ---------------------------------------------------------------- CRDs


def _strip_chart_metadata(crd: dict) -> dict:
    crd = json.loads(json.dumps(crd))
    meta = crd["metadata"]
    for k in ("app.kubernetes.io/part-of", "app.kubernetes.io/managed-by", "helm.sh/chart"):
        meta.get("labels", {}).pop(k, None)
    meta.get("annotations", {}).pop("helm.sh/resource-policy", None)
    for k in ("labels", "annotations"):
        if k in meta and not meta[k]:
            del meta[k]
    return crd


def test_chart_crd_files_are_byte_copies_of_crds_dir(h, crds_dir):
    sync = _load_sync(h)
    problems = sync.drift(h.ROOT, with_rbac=False)
    assert not problems, "charts drifted from crds/ (run .venv/bin/python charts/sync.py):\n" + "\n".join(problems)


@pytest.mark.parametrize("chart", ["routenlp", "routenlp-crds"])
def test_rendered_crds_equal_crds_dir(h, crds_dir, chart):
    source = {d["metadata"]["name"]: d for f in sorted(crds_dir.glob("*.yaml")) for d in h.docs(f.read_text())}
    objs = h.render({}, chart=h.ROOT / "charts" / chart)
    crds = {o["metadata"]["name"]: o for o in by_kind(objs, "CustomResourceDefinition")}
    kopf = {n for n in crds if n.endswith(".kopf.dev")}  # kopf's peering CRDs, from files/kopf-peering-crds.yaml
    assert kopf == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    crds = {n: c for n, c in crds.items() if n not in kopf}
    assert set(crds) == set(source)
    for name, crd in crds.items():
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert _strip_chart_metadata(crd) == source[name], f"{chart}: {name} differs from crds/"


def test_crds_not_kept_when_asked(h):
    crds = by_kind(h.render({"crds": {"keep": False}}), "CustomResourceDefinition")
    assert crds and all("helm.sh/resource-policy" not in c["metadata"].get("annotations", {}) for c in crds)


# ---------------------------------------------------------------- RBAC


def _load_sync(h):
    import importlib.util

    spec = importlib.util.spec_from_file_location("routenlp_chart_sync", h.ROOT / "charts" / "sync.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rule_set(rules: list[dict]) -> set[tuple[str, str, str]]:
    """Rules as (apiGroup, resource, verb) triples: equal sets grant exactly the same."""
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_rbac_file_is_generated_from_operator_rules(h):
    sync = _load_sync(h)
    want = sync.expected_files(h.ROOT)[h.ROOT / sync.RBAC_FILE]
    have = (h.ROOT / sync.RBAC_FILE).read_bytes()
    assert have == want, "charts/routenlp/files/rbac-rules.yaml drifted from routenlp.operator.rbac.RULES: run charts/sync.py"


def test_cluster_scope_grants_exactly_the_rules(h, rendered):
    rules = yaml.safe_load((h.CHART / "files" / "rbac-rules.yaml").read_text())
    roles = by_kind(rendered["default"], "ClusterRole")
    assert len(roles) == 1 and not by_kind(rendered["default"], "Role")
    peering = rules["peering"]["cluster"]  # default: peering enabled, through the ClusterKopfPeering only
    assert _rule_set(roles[0]["rules"]) == _rule_set(rules["cluster"] + rules["namespaced"] + peering)
    assert not any(r == "kopfpeerings" for _, r, _ in _rule_set(roles[0]["rules"]))
    assert ("", "secrets", "get") not in _rule_set(roles[0]["rules"])  # default: no Secret is readable anywhere
    minimal = by_kind(rendered["minimal"], "ClusterRole")[0]  # peering off: no kopf.dev permissions
    assert _rule_set(minimal["rules"]) == _rule_set(rules["cluster"] + rules["namespaced"])
    binding = by_kind(rendered["default"], "ClusterRoleBinding")[0]
    sa = by_kind(rendered["default"], "ServiceAccount")[0]["metadata"]["name"]
    assert binding["roleRef"]["name"] == roles[0]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": h.NAMESPACE}]


def test_cluster_scope_grants_secret_get_only_where_asked(h, rendered):
    rules = yaml.safe_load((h.CHART / "files" / "rbac-rules.yaml").read_text())
    assert _rule_set(rules["secrets"]) == {("", "secrets", "get")}
    objs = rendered["cluster-secrets"]
    cluster = by_kind(objs, "ClusterRole")[0]
    want = rules["cluster"] + rules["namespaced"] + rules["peering"]["cluster"]
    assert _rule_set(cluster["rules"]) == _rule_set(want)
    roles = by_kind(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert _rule_set(role["rules"]) == _rule_set(rules["secrets"])
    bindings = by_kind(objs, "RoleBinding")
    assert sorted((b["metadata"]["namespace"], b["roleRef"]["name"]) for b in bindings) == [
        (ns, roles[0]["metadata"]["name"]) for ns in ("team-a", "team-b")]
    everywhere = rendered["cluster-secrets-everywhere"]
    assert not by_kind(everywhere, "Role")
    assert ("", "secrets", "get") in _rule_set(by_kind(everywhere, "ClusterRole")[0]["rules"])


def test_namespaced_scope_grants_namespaced_rules_per_namespace(h, rendered):
    rules = yaml.safe_load((h.CHART / "files" / "rbac-rules.yaml").read_text())
    objs = rendered["namespaced"]
    roles = by_kind(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:  # Secret `get` in the watched namespaces only
        assert _rule_set(role["rules"]) == _rule_set(rules["namespaced"] + rules["secrets"])
    bindings = by_kind(objs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    cluster_roles = by_kind(objs, "ClusterRole")
    if rules["cluster"]:
        assert len(cluster_roles) == 1 and _rule_set(cluster_roles[0]["rules"]) == _rule_set(rules["cluster"])
    else:
        assert not cluster_roles
    # the release namespace is the default watched namespace
    default_ns = by_kind(h.render({"operator": {"scope": "namespaced", "peering": {"enabled": False, "name": "x"}}}),
                         "Role")
    assert [r["metadata"]["namespace"] for r in default_ns] == [h.NAMESPACE]


def test_namespaced_peering_grants_kopfpeerings_per_namespace(h, rendered):
    """kopf peers through the KopfPeering of each served namespace when namespaced (-n): each watched namespace gets
    one, and its Role grants exactly the namespaced rules + rbac.NAMESPACED_PEERING_RULES; nothing cluster-wide."""
    rules = yaml.safe_load((h.CHART / "files" / "rbac-rules.yaml").read_text())
    assert _rule_set(rules["peering"]["namespaced"]) == {("kopf.dev", "kopfpeerings", v) for v in ("list", "watch",
                                                                                                  "patch")}
    objs = rendered["namespaced-peering"]
    roles = by_kind(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert _rule_set(role["rules"]) == _rule_set(rules["namespaced"] + rules["secrets"]
                                                      + rules["peering"]["namespaced"])
    assert sorted(o["metadata"]["namespace"] for o in by_kind(objs, "KopfPeering")) == ["team-a", "team-b"]
    assert not by_kind(objs, "ClusterKopfPeering")
    for role in by_kind(objs, "ClusterRole"):  # only the cluster-scoped rules (CRD discovery), no peering
        assert _rule_set(role["rules"]) == _rule_set(rules["cluster"])
    dep = by_kind(objs, "Deployment")[0]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--peering=routenlp" in args and "--namespace=team-a" in args and "--all-namespaces" not in args, args


def test_rbac_has_no_wildcards_or_escalation_verbs(rendered):
    for name, objs in rendered.items():
        for role in by_kind(objs, "ClusterRole") + by_kind(objs, "Role"):
            for g, r, v in _rule_set(role["rules"]):
                assert "*" not in (g, r, v), f"{name}: wildcard in {role['metadata']['name']}"
                assert v not in ("escalate", "bind", "impersonate"), f"{name}: {v} on {r}"
                assert not (r == "secrets" and v in ("list", "watch")), f"{name}: {v} on secrets reads every secret"


# ---------------------------------------------------------------- pod security


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_pod_is_locked_down(h, rendered, name):
    specs = h.pod_specs(rendered[name])
    assert specs, "no pod templates rendered"
    for obj, spec in specs:
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, obj
        assert psc.get("runAsUser", 0) > 0, obj
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", obj
        assert spec.get("hostNetwork") is not True and spec.get("hostPID") is not True, obj
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            where = f"{obj} container {c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("privileged", False) is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            assert c.get("resources", {}).get("requests", {}).get("memory"), f"{where}: no memory request"
            assert c.get("resources", {}).get("limits", {}).get("memory"), f"{where}: no memory limit"
            # a read-only root needs a writable /tmp for Python
            assert any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])), f"{where}: no writable /tmp"
        assert spec.get("automountServiceAccountToken") in (True, False), f"{obj}: token mount not explicit"


def test_operator_deployment_settings(h, rendered):
    dep = by_kind(rendered["default"], "Deployment")[0]
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    assert c["livenessProbe"]["httpGet"]["port"] == "health" and c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["image"] == "ghcr.io/routenlp/operator:" + yaml.safe_load((h.CHART / "Chart.yaml").read_text())["appVersion"]
    assert {"--peering=routenlp", "--priority=0", "--all-namespaces", "--metrics-port=9090"} <= set(c["args"])
    assert any(e["name"] == "POD_ID" for e in c["env"]), "kopf names peers after POD_ID"
    peering = by_kind(rendered["default"], "ClusterKopfPeering")[0]
    assert peering["metadata"]["name"] == "routenlp"
    assert peering["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    ns = by_kind(rendered["namespaced"], "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in ns and "--namespace=team-b" in ns and "--all-namespaces" not in ns
    minimal = by_kind(rendered["minimal"], "Deployment")[0]
    mc = minimal["spec"]["template"]["spec"]["containers"][0]
    assert not any(a.startswith(("--peering", "--webhook")) for a in mc["args"])
    assert {"--metrics-port=0", "--verbose", "--log-format=plain"} <= set(mc["args"])
    assert mc["image"] == "registry.example.com/routenlp/operator@sha256:" + "a" * 64


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_operator_accepts_the_arguments(rendered, name):
    """`routenlp operator`'s own argument parser accepts what the chart passes, and reads it as meant."""
    from routenlp.operator.main import parser

    dep = by_kind(rendered[name], "Deployment")[0]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    args = parser().parse_args(c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert args.liveness.endswith(f":{ports['health']}/healthz")
    assert args.metrics_port == ports.get("metrics", 0)
    assert args.webhook_port == ports.get("webhook", 0)
    if args.webhook_port:
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert args.webhook_cert == mounts["webhook-tls"] + "/tls.crt"
        assert args.webhook_key == mounts["webhook-tls"] + "/tls.key"
    assert bool(args.namespace) != bool(args.all_namespaces)
    # NetworkPolicies let the operator in by the labels of the pods this Deployment makes.
    from routenlp.operator.meta import NetworkPeers
    from routenlp.operator.main import handler_env

    peers = NetworkPeers.from_env(handler_env(args))
    if name == "no-network-policies":
        assert peers is None
    else:
        assert peers.operator_labels.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        assert dict(peers.operator_labels) != {}
        assert any(e["name"] == "POD_NAMESPACE" for e in c["env"])  # the operator's namespace, for the same peer


# ---------------------------------------------------------------- webhook and certificates


def _handshake(cert_pem: bytes, key_pem: bytes, ca_pem: bytes, hostname: str) -> None:
    """A real TLS handshake: a server with the chart's certificate, a client that trusts only the caBundle and checks
    the hostname, as the API server does when it calls the webhook."""
    tmp = Path(tempfile.mkdtemp())
    (tmp / "tls.crt").write_bytes(cert_pem)
    (tmp / "tls.key").write_bytes(key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp / "tls.crt", tmp / "tls.key")
    client_ctx = ssl.create_default_context(cadata=ca_pem.decode())
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve():
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                s.sendall(s.recv(5))
        except BaseException as exc:  # noqa: BLE001 - reported by the client side
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=hostname) as c:
            c.sendall(b"hello")
            assert c.recv(5) == b"hello"
    finally:
        t.join(10)
    assert not errors, errors


def test_self_signed_webhook_certificate_works_for_the_service(h, rendered):
    objs = rendered["default"]
    secret = by_kind(objs, "Secret")[0]
    mwc = by_kind(objs, "MutatingWebhookConfiguration")[0]
    webhook = mwc["webhooks"][0]
    svc = webhook["clientConfig"]["service"]
    assert webhook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    _handshake(data["tls.crt"], data["tls.key"], data["ca.crt"], f"{svc['name']}.{svc['namespace']}.svc")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(data["tls.crt"], data["tls.key"], data["ca.crt"], "someone-else.default.svc")
    # the Deployment mounts that Secret and the Service behind the webhook selects the operator pods
    dep = by_kind(objs, "Deployment")[0]
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["webhook-tls"]["secret"]["secretName"] == secret["metadata"]["name"]
    service = next(s for s in by_kind(objs, "Service") if s["metadata"]["name"] == svc["name"])
    assert service["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "webhook"


def test_webhook_only_sees_labelled_pods(rendered):
    for name in ("default", "namespaced", "webhook-cert-manager"):
        webhook = by_kind(rendered[name], "MutatingWebhookConfiguration")[0]["webhooks"][0]
        assert webhook["objectSelector"] == {
            "matchExpressions": [
                {"key": "routenlp.io/policy", "operator": "Exists"},
                # the operator's own router/tier/Job pods carry routenlp.io labels: never inject into them
                {"key": "app.kubernetes.io/managed-by", "operator": "NotIn", "values": ["routenlp-operator"]},
            ]
        }
        assert webhook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                     "resources": ["pods"], "scope": "Namespaced"}]
        assert webhook["sideEffects"] == "None" and webhook["admissionReviewVersions"] == ["v1"]
    ns_sel = by_kind(rendered["namespaced"], "MutatingWebhookConfiguration")[0]["webhooks"][0]["namespaceSelector"]
    assert ns_sel["matchExpressions"][0]["values"] == ["team-a", "team-b"]


def test_deprecation_webhook_only_warns_about_routing_policies(rendered):
    """The ValidatingWebhookConfiguration of the deprecation warnings: RoutingPolicy writes only, never blocking one
    (Ignore), through the same Service and CA as the sidecar webhook; none without the webhook server."""
    for name in ("default", "namespaced", "webhook-cert-manager"):
        [vwc] = by_kind(rendered[name], "ValidatingWebhookConfiguration")
        [mwc] = by_kind(rendered[name], "MutatingWebhookConfiguration")
        [webhook] = vwc["webhooks"]
        assert webhook["rules"] == [{"operations": ["CREATE", "UPDATE"], "apiGroups": ["routenlp.io"],
                                     "apiVersions": ["v1alpha1"], "resources": ["routingpolicies"],
                                     "scope": "Namespaced"}]
        assert webhook["failurePolicy"] == "Ignore" and webhook["sideEffects"] == "None"
        sidecar = mwc["webhooks"][0]["clientConfig"]
        assert {k: v for k, v in webhook["clientConfig"]["service"].items() if k != "path"} == {
            k: v for k, v in sidecar["service"].items() if k != "path"}
        assert webhook["clientConfig"].get("caBundle") == sidecar.get("caBundle")
        assert vwc["metadata"].get("annotations") == mwc["metadata"].get("annotations")  # cert-manager's CA
        assert webhook.get("namespaceSelector") == mwc["webhooks"][0].get("namespaceSelector")
    assert not by_kind(rendered["minimal"], "ValidatingWebhookConfiguration")


def test_cert_manager_certificate_matches_webhook(h, rendered):
    objs = rendered["webhook-cert-manager"]
    mwc = by_kind(objs, "MutatingWebhookConfiguration")[0]
    cert = next(c for c in by_kind(objs, "Certificate") if not c["spec"].get("isCA"))
    svc = mwc["webhooks"][0]["clientConfig"]["service"]
    assert "caBundle" not in mwc["webhooks"][0]["clientConfig"]  # cert-manager's cainjector fills it
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{h.NAMESPACE}/{cert['metadata']['name']}"
    assert f"{svc['name']}.{svc['namespace']}.svc" in cert["spec"]["dnsNames"]
    # self-signed root -> CA certificate -> CA Issuer -> serving certificate (a renewal keeps the caBundle valid)
    certs = {c["metadata"]["name"]: c for c in by_kind(objs, "Certificate")}
    issuers = {i["metadata"]["name"]: i for i in by_kind(objs, "Issuer")}
    cert = certs[mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")[1]]
    ca_issuer = issuers[cert["spec"]["issuerRef"]["name"]]
    ca_cert = next(c for c in certs.values() if c["spec"].get("isCA"))
    assert ca_issuer["spec"]["ca"]["secretName"] == ca_cert["spec"]["secretName"]
    assert "selfSigned" in issuers[ca_cert["spec"]["issuerRef"]["name"]]["spec"]
    dep = by_kind(objs, "Deployment")[0]
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["webhook-tls"]["secret"]["secretName"] == cert["spec"]["secretName"]
    assert not by_kind(rendered["webhook-cert-manager-issuer"], "Issuer")
    ext = by_kind(rendered["webhook-cert-manager-issuer"], "Certificate")[0]
    assert ext["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}


@pytest.mark.parametrize("kind", ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"])
def test_webhook_path_is_served_by_the_operator(h, rendered, kind):
    """The path each webhook calls is the id of an operator handler (kopf serves /<id>): sidecar injection, and the
    deprecation warnings on RoutingPolicy writes."""
    path = by_kind(rendered["default"], kind)[0]["webhooks"][0]["clientConfig"]["service"]["path"]
    handler_id = path.lstrip("/")
    sources = "\n".join(p.read_text() for p in (h.ROOT / "operator" / "routenlp" / "operator").rglob("*.py"))
    assert re.search(r"""id\s*=\s*['"]%s['"]""" % re.escape(handler_id), sources) or re.search(
        r"""['"]%s['"]""" % re.escape(path), sources
    ), f"no operator handler serves {path}"


# ---------------------------------------------------------------- monitoring


def _defined_metrics(root: Path) -> set[str]:
    """Series names the code exports: prometheus_client Counter/Gauge/Histogram/Summary/Info definitions with a
    literal routenlp_* name, with the suffixes Prometheus adds."""
    pattern = re.compile(r"""\b(Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*['"](routenlp_\w+)['"]""")
    names: set[str] = set()
    for folder in ("operator", "router_image"):
        for path in (root / folder).rglob("*.py"):
            for kind, name in pattern.findall(path.read_text()):
                if kind == "Counter":
                    base = name.removesuffix("_total")
                    names |= {base + "_total", base + "_created"}
                elif kind in ("Histogram", "Summary"):
                    names |= {name + s for s in ("_bucket", "_sum", "_count", "_created")} | {name}
                elif kind == "Info":
                    names |= {name.removesuffix("_info") + "_info"}
                else:
                    names.add(name)
    return names


def _promql_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\b(routenlp_[a-z0-9_]+)\b", expr))


def _all_exprs(h) -> list[str]:
    rule = by_kind(h.render(VALUE_SETS["monitoring"]), "PrometheusRule")[0]
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    for path in (h.CHART / "dashboards").glob("*.json"):
        dash = json.loads(path.read_text())
        exprs += [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
        exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v.get("type") == "query"]
    return exprs


def test_promql_names_only_metrics_the_code_defines(h):
    defined = _defined_metrics(h.ROOT)
    used = set().union(*(_promql_metrics(e) for e in _all_exprs(h)))
    assert used, "no routenlp metric in alerts or dashboards"
    missing = sorted(used - defined)
    assert not missing, f"alerts/dashboards use metrics no code defines: {missing} (defined: {sorted(defined)})"


def test_promql_is_balanced(h):
    for expr in _all_exprs(h):
        depth = 0
        for ch in expr:
            depth += {"(": 1, ")": -1}.get(ch, 0)
            assert depth >= 0, expr
        assert depth == 0 and expr.count("{") == expr.count("}") and expr.count("[") == expr.count("]"), expr


def test_alerts_cover_the_agreed_cases(h):
    rule = by_kind(h.render(VALUE_SETS["monitoring"]), "PrometheusRule")[0]
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    violated = alerts["RouteNLPGuaranteeViolated"]["expr"]
    assert "routenlp_violation_rate" in violated and "routenlp_risk_level" in violated and "avg_over_time" in violated
    assert "routenlp_escalations_total" in alerts["RouteNLPEscalationRateHigh"]["expr"]
    assert "routenlp_tier_up" in alerts["RouteNLPTierDown"]["expr"]
    assert "routenlp_campaign_runs_total" in alerts["RouteNLPCampaignFailed"]["expr"]
    for name, r in alerts.items():
        assert r["labels"]["severity"] in ("critical", "warning", "info"), name
        assert r["annotations"]["summary"] and "docs/operations.md" in r["annotations"]["description"] or \
            "kubectl" in r["annotations"]["description"] or "logs" in r["annotations"]["description"], name


def test_dashboard_has_the_agreed_panels(h, rendered):
    cm = by_kind(rendered["monitoring"], "ConfigMap")[0]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["routenlp-overview.json"])
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for wanted in ("cost saved vs reference", "acceptance", "escalation rate", "violation rate vs risk level",
                   "p50 / p99", "requests per tier"):
        assert wanted in titles, wanted
    latency = next(p for p in dash["panels"] if "p50 / p99" in p["title"])
    starts = [t["expr"].split(",")[0] for t in latency["targets"]]
    assert starts == ["histogram_quantile(0.5", "histogram_quantile(0.99"]
    assert all("routenlp_tier_request_seconds_bucket" in t["expr"] and "tier)" in t["expr"] for t in latency["targets"])
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_alert_label_values_are_ones_the_code_sets(h):
    """`result="Failed"` etc. in alerts must be values the code really writes, else the alert never fires."""
    rule = by_kind(h.render(VALUE_SETS["monitoring"]), "PrometheusRule")[0]
    code = "\n".join(p.read_text() for folder in ("operator", "router_image") for p in (h.ROOT / folder).rglob("*.py"))
    for g in rule["spec"]["groups"]:
        for r in g["rules"]:
            for label, value in re.findall(r'(\w+)="([^"]*)"', r["expr"]):
                assert f'"{value}"' in code or f"'{value}'" in code, f"{r['alert']}: {label}={value!r} is never set"


def test_selectors_match_what_the_operator_builds(rendered):
    """The router ServiceMonitor selects the Services the operator makes for gateway routers (by label and port
    name), and the webhook's exclusion names the operator's managed-by value."""
    from routenlp.api import parse
    from routenlp.operator import routingpolicy
    from routenlp.operator.webhook import sidecar_patch

    policy = parse({"apiVersion": "routenlp.io/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "p"},
                    "spec": {"tiers": [{"name": "a"}, {"name": "b"}], "tasks": [{"name": "t"}]}})
    owner = {"apiVersion": "routenlp.io/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "p", "uid": "u"}}
    service = routingpolicy.router_service(policy, owner, "team-a")
    monitor = next(o for o in by_kind(rendered["monitoring"], "ServiceMonitor") if o["metadata"]["name"].endswith("-routers"))
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    webhook = by_kind(rendered["default"], "MutatingWebhookConfiguration")[0]["webhooks"][0]
    excluded = next(e for e in webhook["objectSelector"]["matchExpressions"] if e["operator"] == "NotIn")
    assert excluded["values"] == [service["metadata"]["labels"][excluded["key"]]]
    # The PodMonitor scrapes sidecar-injected pods on the injected container's admin port, and not gateway pods
    # (the ServiceMonitor has those).
    import jsonpatch

    sidecar = parse({**policy.to_k8s(), "spec": {**policy.to_k8s()["spec"], "deployment": {"mode": "sidecar"}}})
    app = {"metadata": {"labels": {"routenlp.io/policy": "p"}}, "spec": {"containers": [{"name": "a", "image": "a"}]}}
    pod = jsonpatch.apply_patch(app, sidecar_patch(app, sidecar, []))
    pod_monitor = by_kind(rendered["monitoring"], "PodMonitor")[0]["spec"]
    gateway = routingpolicy.router_deployment(policy, [], owner, "team-a", "h")["spec"]["template"]["metadata"]["labels"]
    assert _selects(pod_monitor["selector"], pod["metadata"]["labels"])
    assert not _selects(pod_monitor["selector"], gateway)
    router = next(c for c in pod["spec"]["containers"] if c["name"] == "router")
    assert pod_monitor["podMetricsEndpoints"][0]["port"] in {p["name"] for p in router["ports"]}


def _selects(selector: dict, labels: dict) -> bool:
    ok = all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())
    for e in selector.get("matchExpressions") or []:
        present, values = e["key"] in labels, e.get("values") or []
        ok &= {"Exists": present, "DoesNotExist": not present, "In": present and labels[e["key"]] in values,
               "NotIn": not present or labels[e["key"]] not in values}[e["operator"]]
    return ok


def _test_pod_script(objs: list[dict]) -> str:
    pod = next(o for o in by_kind(objs, "Pod") if o["metadata"]["annotations"].get("helm.sh/hook") == "test")
    c = pod["spec"]["containers"][0]
    assert c["command"] == ["python", "-c"]
    return c["args"][0]


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_test_pod_script_compiles(rendered, name):
    compile(_test_pod_script(rendered[name]), f"helm-test-{name}", "exec")


def test_helm_test_pod_script_passes_against_live_endpoints(h):
    """Run the `helm test` script against a real /healthz and a real prometheus_client /metrics server (service host
    names pointed at 127.0.0.1), and see it fail when /healthz fails."""
    import http.server
    import subprocess
    import sys

    from prometheus_client import CollectorRegistry, Counter, start_http_server

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    health_port, metrics_port = free_port(), free_port()
    status = {"code": 200}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status["code"] if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    registry = CollectorRegistry()
    Counter("routenlp_operator_reconciles_total", "x", ["kind", "result"], registry=registry).labels("ModelTier", "ok").inc()
    metrics_server, metrics_thread = start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
    health = http.server.ThreadingHTTPServer(("127.0.0.1", health_port), Health)
    threading.Thread(target=health.serve_forever, daemon=True).start()
    try:
        objs = h.render({"webhook": {"enabled": False}, "healthPort": health_port,
                         "metrics": {"enabled": True, "port": metrics_port}})
        script = re.sub(r"[\w.-]+\.svc:", "127.0.0.1:", _test_pod_script(objs))
        ok = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0 and "health: ok" in ok.stdout and "metrics: ok" in ok.stdout, ok.stderr
        status["code"] = 500
        bad = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
        assert bad.returncode != 0
    finally:
        health.shutdown()
        metrics_server.shutdown()


def test_packaged_chart_renders_the_same(h, tmp_path):
    """`helm package` keeps everything the templates read (files/, dashboards/): .helmignore drops nothing needed."""
    h.run(h.tool("helm"), "package", str(h.CHART), "-d", str(tmp_path))
    packaged = next(tmp_path.glob("routenlp-*.tgz"))
    values = {**VALUE_SETS["monitoring"], "webhook": {"enabled": False}}  # no random certificates to compare
    assert h.render(values, chart=packaged) == h.render(values)
