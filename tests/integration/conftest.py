"""The real kopf operator (routenlp.operator.handlers) in its own thread, over HTTP, against the kmock-based emulator.

One emulator + one operator per test session; each test works in its own namespace. With `--run-cluster` and a
KUBECONFIG, tests marked `cluster` use that cluster instead (see test_cluster.py).
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

# Timers are fixed when the handlers module is imported: short resyncs for tests.
os.environ["ROUTENLP_RESYNC_SECONDS"] = "1"
os.environ["ROUTENLP_CAMPAIGN_SECONDS"] = "0.5"
os.environ["ROUTENLP_WATCH_TIMEOUT"] = "30"

from kube_emulator.emulator import Client, EmulatorThread  # noqa: E402
from kube_emulator.fakes import FakePods, self_signed  # noqa: E402
from kube_emulator.harness import Cluster, free_port, wait_for  # noqa: E402,F401



@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    from kopf.testing import KopfRunner

    from routenlp.api.crdgen import crds

    tmp = tmp_path_factory.mktemp("operator")
    emu = EmulatorThread().start()
    api = Client(emu.url)
    for crd in crds().values():
        api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    kubeconfig = emu.kubeconfig(str(tmp / "kubeconfig"))
    cert, key = self_signed(tmp, "127.0.0.1")
    webhook_port, live_port = free_port(), free_port()
    saved = {k: os.environ.get(k) for k in ("KUBECONFIG", "ROUTENLP_WEBHOOK_PORT", "ROUTENLP_WEBHOOK_ADDR",
                                            "ROUTENLP_WEBHOOK_CERT", "ROUTENLP_WEBHOOK_KEY")}
    os.environ.update(KUBECONFIG=kubeconfig, ROUTENLP_WEBHOOK_PORT=str(webhook_port), ROUTENLP_WEBHOOK_ADDR="127.0.0.1",
                      ROUTENLP_WEBHOOK_CERT=str(cert), ROUTENLP_WEBHOOK_KEY=str(key))
    # The webhook handler registers at startup from the environment above, even when this module was imported
    # earlier without it (pytest collects tests/unit/operator, which imports handlers, before this runs).
    from routenlp.operator import handlers, runtime  # noqa: F401  (handlers: registers them all)

    pods = FakePods()
    runtime.RT.pod_http = pods
    args = ["run", "--standalone", "--all-namespaces", "-m", "routenlp.operator.handlers",
            f"--liveness=http://127.0.0.1:{live_port}/healthz"]
    with KopfRunner(args, timeout=60) as runner:
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{live_port}/healthz", timeout=1).status == 200,
                 30, "kopf liveness endpoint")
        yield Cluster(emu, pods, ("127.0.0.1", webhook_port, str(cert)), kubeconfig)
    emu.stop()
    for key, value in saved.items():  # leave the environment as we found it for other test folders
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    assert runner.exception is None, runner.output[-3000:]
