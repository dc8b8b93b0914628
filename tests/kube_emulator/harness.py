"""Helpers of the integration tests and the operator benchmark: polling and a view of the emulated cluster."""

from __future__ import annotations

import socket
import time
from typing import Any, Callable

from .emulator import Client, EmulatorThread
from .fakes import FakePods

GROUP_PATH = "/apis/routenlp.io/v1alpha1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(fn: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll until fn() is truthy (a guard against hanging, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as exc:  # noqa: BLE001  (object not there yet, etc.)
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")


class Cluster:
    """What a test needs: the API client, the emulator's audit log, fake pods, the webhook address."""

    def __init__(self, emu: EmulatorThread, pods: FakePods, webhook: tuple[str, int, str], kubeconfig: str):
        self.emu = emu
        self.api = Client(emu.url)
        self.pods = pods
        self.webhook_host, self.webhook_port, self.webhook_ca = webhook
        self.kubeconfig = kubeconfig

    @staticmethod
    def cr_path(plural: str, ns: str, name: str | None = None, sub: str | None = None) -> str:
        return f"{GROUP_PATH}/namespaces/{ns}/{plural}" + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    @staticmethod
    def core_path(kind_path: str, ns: str, name: str | None = None, sub: str | None = None) -> str:
        return f"{kind_path}/namespaces/{ns}" + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    def get_cr(self, plural: str, ns: str, name: str) -> dict | None:
        return self.api.get(self.cr_path(plural, ns, name))

    def condition(self, plural: str, ns: str, name: str, type_: str = "Ready") -> dict | None:
        obj = self.get_cr(plural, ns, name) or {}
        return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)

    def events(self, ns: str, name: str) -> list[dict]:
        out = self.api.get(f"/api/v1/namespaces/{ns}/events?fieldSelector=involvedObject.name={name}") or {}
        return out.get("items", [])


