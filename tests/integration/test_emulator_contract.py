"""Where the emulator must answer as the API server does for kopf to behave as it would on a cluster."""

from __future__ import annotations

import urllib.error

import pytest


def test_failed_json_patch_test_op_is_a_422(cluster):
    # kopf guards its JSON patches with a `test` on metadata.resourceVersion and treats 422 as "newer changes exist,
    # retry next cycle"; any other status sends it into a slow retry backoff.
    # a ConfigMap nobody else writes (the operator would race a ModelTier's resourceVersion)
    path = "/api/v1/namespaces/emu-contract/configmaps"
    obj = cluster.api.create(path, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c1"},
                                    "data": {"k": "v"}})
    rv = obj["metadata"]["resourceVersion"]
    item = f"{path}/c1"
    ok = cluster.api.request("PATCH", item, [{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
                                             {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}],
                             "application/json-patch+json")
    assert ok["metadata"]["labels"] == {"a": "b"}
    with pytest.raises(urllib.error.HTTPError) as err:
        cluster.api.request("PATCH", item, [{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
                                            {"op": "add", "path": "/metadata/labels/c", "value": "d"}],
                            "application/json-patch+json")
    assert err.value.code == 422
    assert "c" not in cluster.api.get(item)["metadata"]["labels"]
