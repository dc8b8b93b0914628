"""Test doubles for what the emulator does not run: vLLM pods' LoRA API, the router's rollout stats, TLS certs."""

from __future__ import annotations

import datetime
import ipaddress
import threading
from pathlib import Path
from typing import Any


class FakePods:
    """Answers like vLLM pods (by pod IP) and routers (by URL). `broken` adapters answer 200 to load_lora_adapter
    but never appear in /v1/models, the failure mode the operator must not report as loaded."""

    def __init__(self) -> None:
        self.models: dict[str, set[str]] = {}
        self.broken: set[str] = set()
        self.json: dict[str, Any] = {}  # url -> answer (e.g. a router's /routenlp/rollout)
        self.calls: list[tuple[str, str]] = []
        self.real: list[str] = []  # URL prefixes served by real processes (e.g. an in-process router): real GET
        self._lock = threading.Lock()

    def add_pod(self, ip: str, base_model: str) -> None:
        with self._lock:
            self.models[ip] = {base_model}

    @staticmethod
    def _ip(url: str) -> str:
        return url.split("//", 1)[1].split(":", 1)[0]

    async def get_json(self, url: str) -> Any:
        if any(url.startswith(p) for p in list(self.real)):
            from routenlp.operator.adapters import AiohttpPodHTTP

            with self._lock:
                self.calls.append(("GET", url))
            return await AiohttpPodHTTP().get_json(url)
        with self._lock:
            self.calls.append(("GET", url))
            if url in self.json:
                return self.json[url]
            ip = self._ip(url)
            if ip not in self.models:
                raise ConnectionError(f"connection refused: {url}")
            return {"object": "list", "data": [{"id": m, "object": "model"} for m in sorted(self.models[ip])]}

    async def post_json(self, url: str, body: dict) -> tuple[int, str]:
        with self._lock:
            self.calls.append(("POST", url))
            ip = self._ip(url)
            if ip not in self.models:
                raise ConnectionError(f"connection refused: {url}")
            if body["lora_name"] not in self.broken:
                self.models[ip].add(body["lora_name"])
            return 200, "Success"


def self_signed(folder: Path, host: str) -> tuple[Path, Path]:
    """A self-signed certificate for the webhook server (host as IP SAN)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "webhook.crt", folder / "webhook.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
