"""The operator benchmark (`python tests/kube_emulator/bench_operator.py`): how fast the operator converges N
ModelTiers and N/5 RoutingPolicies, and its memory.

It runs the real operator (`routenlp operator`, a separate process, so its peak RSS is its own) against the
Kubernetes API emulator beside this file (built on kmock): a developer's tool that lives with the test code it
drives, run from a checkout (the shipped `routenlp` distribution never imports tests/). A small fake Deployment controller (a watch in this process) marks each Deployment's pods ready, as
a cluster would. Converged = every ModelTier and RoutingPolicy has Ready=True. Reconciles/s comes from the
operator's own routenlp_operator_reconciles_total; peak RSS from /proc/<pid>/status (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import the emulator package from tests/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kube_emulator.emulator import Client, EmulatorThread  # noqa: E402
from routenlp.api.crdgen import crds  # noqa: E402

COMMAND = "python tests/kube_emulator/bench_operator.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tier(i: int) -> dict:
    return {"apiVersion": "routenlp.io/v1alpha1", "kind": "ModelTier", "metadata": {"name": f"tier-{i}"},
            "spec": {"servedModelName": f"tier-{i}", "cost": {"inputPerMillion": 0.1 * (i % 5 + 1),
                                                               "outputPerMillion": 0.3 * (i % 5 + 1)},
                     "engine": {"model": "Qwen/Qwen2.5-7B-Instruct"}, "replicas": 1}}


def _policy(j: int) -> dict:
    return {"apiVersion": "routenlp.io/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": f"policy-{j}"},
            "spec": {"tiers": [{"name": f"tier-{5 * j + k}"} for k in range(5)], "tasks": [{"name": "intent"}],
                     "deployment": {"replicas": 1}}}


class FakeDeploymentController(threading.Thread):
    """Watches Deployments and reports every new generation as fully rolled out (no pods run in the emulator)."""

    def __init__(self, url: str, client: Any):
        super().__init__(daemon=True)
        self.url, self.client, self.stop = url, client, threading.Event()

    def run(self) -> None:
        rv = "0"
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(f"{self.url}/apis/apps/v1/deployments?watch=true&resourceVersion={rv}"
                                            f"&timeoutSeconds=30", timeout=60) as stream:
                    buf = b""
                    while not self.stop.is_set():
                        chunk = stream.read1(65536)  # what has arrived: readline() would wait for a full buffer
                        if not chunk:
                            break
                        buf += chunk
                        *lines, buf = buf.split(b"\n")
                        for line in lines:
                            if line.strip():
                                rv = self._handle(json.loads(line), rv)
            except Exception:  # noqa: BLE001  (stream ended or the emulator is stopping)
                time.sleep(0.1)

    def _handle(self, event: dict, rv: str) -> str:
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        if event.get("type") == "DELETED" or "spec" not in obj:
            return meta.get("resourceVersion", rv)
        st = obj.get("status") or {}
        n = obj["spec"].get("replicas", 1)
        if st.get("observedGeneration") != meta.get("generation") or st.get("readyReplicas") != n:
            self.client.patch(f"/apis/apps/v1/namespaces/{meta['namespace']}/deployments/{meta['name']}/status",
                              {"status": {"observedGeneration": meta["generation"], "replicas": n,
                                          "readyReplicas": n, "updatedReplicas": n, "availableReplicas": n}})
        return meta.get("resourceVersion", rv)


def _ready_count(client: Any, plural: str) -> int:
    items = (client.get(f"/apis/routenlp.io/v1alpha1/{plural}") or {}).get("items", [])
    return sum(any(c["type"] == "Ready" and c["status"] == "True" for c in (o.get("status") or {}).get("conditions") or [])
               for o in items)


def _scrape(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("routenlp_operator_reconciles_total{"))


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_size(n: int, timeout: float, progress: bool) -> dict:
    emu = EmulatorThread().start()
    client = Client(emu.url)
    for crd in crds().values():
        client.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    tmp = tempfile.mkdtemp(prefix="routenlp-bench-operator-")
    kubeconfig = emu.kubeconfig(os.path.join(tmp, "kubeconfig"))
    live, metrics_port = _free_port(), _free_port()
    log = open(os.path.join(tmp, "operator.log"), "w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTENLP_WEBHOOK_")}  # no webhook server
    env.update(KUBECONFIG=kubeconfig, ROUTENLP_WATCH_TIMEOUT="600")
    proc = subprocess.Popen([sys.executable, "-m", "routenlp.cli.main", "operator", "--all-namespaces", "--quiet",
                             "--liveness", f"http://127.0.0.1:{live}/healthz", "--metrics-port", str(metrics_port),
                             "--resync-seconds", "3600", "--log-format", "plain"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    controller = FakeDeploymentController(emu.url, Client(emu.url))
    controller.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{live}/healthz", timeout=1)
                break
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"operator did not start; see {log.name}")
                time.sleep(0.2)
        base = _scrape(metrics_port)
        policies = n // 5
        t0 = time.monotonic()
        cpu0 = time.process_time()
        for i in range(n):
            client.create("/apis/routenlp.io/v1alpha1/namespaces/bench/modeltiers", _tier(i))
        for j in range(policies):
            client.create("/apis/routenlp.io/v1alpha1/namespaces/bench/routingpolicies", _policy(j))
        created = time.monotonic() - t0
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n + policies, desc=f"N={n} Ready", unit="obj", leave=False)
        ready_t = ready_p = 0
        converged = None
        while time.monotonic() - t0 < timeout:
            ready_t, ready_p = _ready_count(client, "modeltiers"), _ready_count(client, "routingpolicies")
            if bar is not None:
                bar.n = ready_t + ready_p
                bar.refresh()
            if ready_t == n and ready_p == policies:
                converged = time.monotonic() - t0
                break
            time.sleep(1.0)  # listing every object is not free for the emulator: poll gently
        if bar is not None:
            bar.close()
        elapsed = converged if converged is not None else time.monotonic() - t0
        reconciles = _scrape(metrics_port) - base
        cpu_operator = _cpu_seconds(proc.pid)
        cpu_emulator = time.process_time() - cpu0  # emulator + fake controller + polling (this process)
        return {"modelTiers": n, "routingPolicies": policies, "converged": converged is not None,
                "secondsToConverge": round(elapsed, 2), "secondsToCreate": round(created, 2),
                "readyModelTiers": ready_t, "readyRoutingPolicies": ready_p,
                "reconciles": int(reconciles), "reconcilesPerSecond": round(reconciles / elapsed, 1),
                "operatorPeakRssMiB": round(_peak_rss_mib(proc.pid), 1),
                "operatorCpuSeconds": round(cpu_operator, 1), "benchProcessCpuSeconds": round(cpu_emulator, 1)}
    finally:
        controller.stop.set()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        emu.stop()


def table(rows: list[dict]) -> str:
    out = ["| ModelTiers | RoutingPolicies | converged | time to converge (s) | reconciles | reconciles/s | "
           "operator peak RSS (MiB) | operator CPU (s) | emulator process CPU (s) |",
           "| ---: | ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['modelTiers']} | {r['routingPolicies']} | {'yes' if r['converged'] else 'NO'} | "
                   f"{r['secondsToConverge']} | {r['reconciles']} | {r['reconcilesPerSecond']} | "
                   f"{r['operatorPeakRssMiB']} | {r['operatorCpuSeconds']} | {r['benchProcessCpuSeconds']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100,500,1000", help="comma-separated N (ModelTiers); policies = N/5")
    p.add_argument("--timeout", type=float, default=300, help="give up on a size after this many seconds")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = p.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if not sizes or min(sizes) < 5:
        p.error("--sizes: each N must be >= 5 (one policy per 5 tiers)")
    rows = [run_size(n, args.timeout, progress=not args.json) for n in sizes]
    result = {"benchmark": "operator", "command": f"{COMMAND} --sizes " + ",".join(map(str, sizes)),
              "cpus": os.cpu_count(), "results": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
