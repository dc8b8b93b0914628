"""The webhook handlers (sidecar injection, RoutingPolicy deprecation warnings) follow ROUTENLP_WEBHOOK_PORT whenever
it is read, not only at import.

Regression: in a full test run, pytest collected tests/unit/operator (which imports routenlp.operator.handlers)
before the `cluster` fixture set the port, so the handler never registered and kopf's webhook server answered
404 "no handlers" for pods. Registration is now repeated at operator startup, next to the server's configuration.
"""

from __future__ import annotations

import kopf

from routenlp.operator import webhook


def _handlers(registry: kopf.OperatorRegistry, id: str = "routenlp-sidecar") -> list:
    return [h for h in registry._webhooks.get_all_handlers() if h.id == id]


def test_registers_only_when_a_port_is_configured_and_only_once(monkeypatch):
    registry = kopf.OperatorRegistry()
    monkeypatch.delenv("ROUTENLP_WEBHOOK_PORT", raising=False)
    assert webhook.register_webhooks(registry) is False
    # kopf would refuse to start: handlers but no server
    assert _handlers(registry) == [] and _handlers(registry, "routenlp-deprecations") == []
    monkeypatch.setenv("ROUTENLP_WEBHOOK_PORT", "9443")  # set after the module was imported
    assert webhook.register_webhooks(registry) is True
    assert webhook.register_webhooks(registry) is True  # startup after import: no duplicate
    [handler] = _handlers(registry)
    assert handler.fn is webhook.inject_router
    assert handler.selector.is_specific and handler.selector.select(
        {kopf.Resource("", "v1", "pods")}) == {kopf.Resource("", "v1", "pods")}
    [warner] = _handlers(registry, "routenlp-deprecations")
    policies = kopf.Resource("routenlp.io", "v1alpha1", "routingpolicies")
    assert warner.fn is webhook.warn_deprecated and warner.selector.select({policies}) == {policies}
