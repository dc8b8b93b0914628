"""LoRA adapters loaded into running vLLM pods through vLLM's runtime LoRA API, verified against `/v1/models`.

The HTTP client is injected (`PodHTTP`): production uses aiohttp; tests fake the pods' answers. An adapter is
reported loaded only when every ready pod lists it in `/v1/models` — a 200 from load_lora_adapter is not enough.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from .meta import VLLM_PORT

Obj = dict[str, Any]


class PodHTTP(Protocol):
    async def get_json(self, url: str) -> Any: ...

    async def post_json(self, url: str, body: Obj) -> tuple[int, str]: ...


class AiohttpPodHTTP:
    """Talks to pods directly (pod IP); short timeouts so a stuck pod cannot stall a reconcile."""

    def __init__(self, timeout: float = 5.0):
        self.timeout = timeout

    async def get_json(self, url: str) -> Any:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as s:
            async with s.get(url) as r:
                r.raise_for_status()
                return await r.json()

    async def post_json(self, url: str, body: Obj) -> tuple[int, str]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as s:
            async with s.post(url, json=body) as r:
                return r.status, (await r.text())[:300]


@dataclass(frozen=True)
class WantedAdapter:
    name: str
    source: str
    origin: str  # Spec | Campaign


def adapter_path(source: str, cache_mount: str | None) -> str:
    """Where the pod sees the adapter: pvc://claim/path -> <mount>/path; plain paths unchanged."""
    if source.startswith("pvc://"):
        rest = source[len("pvc://"):].split("/", 1)
        return f"{(cache_mount or '/models').rstrip('/')}/{rest[1] if len(rest) > 1 else ''}".rstrip("/")
    return source


def wanted_adapters(spec_adapters: list[Obj], campaign_adapters: list[Obj], accept_campaign: bool) -> list[WantedAdapter]:
    out = [WantedAdapter(a["name"], a["source"], "Spec") for a in spec_adapters]
    names = {a.name for a in out}
    if accept_campaign:
        out += [WantedAdapter(a["name"], a["source"], "Campaign") for a in campaign_adapters if a["name"] not in names]
    return out


def served_models(models_answer: Any) -> set[str]:
    return {m.get("id") for m in (models_answer or {}).get("data", []) if isinstance(m, dict)}


async def reconcile_adapters(http: PodHTTP, pod_ips: list[str], wanted: list[WantedAdapter],
                             cache_mount: str | None) -> list[Obj]:
    """Load missing adapters into each ready pod, then report per adapter what `/v1/models` really shows."""
    loaded_in: dict[str, int] = {w.name: 0 for w in wanted}
    errors: dict[str, str] = {}
    for ip in pod_ips:
        base = f"http://{ip}:{VLLM_PORT}"
        try:
            have = served_models(await http.get_json(f"{base}/v1/models"))
        except Exception as exc:  # an unreachable pod is reported, not raised
            for w in wanted:
                errors.setdefault(w.name, f"pod {ip}: /v1/models failed: {exc}")
            continue
        for w in wanted:
            if w.name in have:
                continue
            try:
                code, text = await http.post_json(f"{base}/v1/load_lora_adapter",
                                                  {"lora_name": w.name, "lora_path": adapter_path(w.source, cache_mount)})
                if code >= 300:
                    errors[w.name] = f"pod {ip}: load_lora_adapter answered {code}: {text}"
            except Exception as exc:
                errors[w.name] = f"pod {ip}: load_lora_adapter failed: {exc}"
        try:  # verify: only what /v1/models lists counts
            have = served_models(await http.get_json(f"{base}/v1/models"))
        except Exception as exc:
            for w in wanted:
                errors.setdefault(w.name, f"pod {ip}: /v1/models failed: {exc}")
            continue
        for w in wanted:
            if w.name in have:
                loaded_in[w.name] += 1
            else:
                errors.setdefault(w.name, f"pod {ip}: not listed in /v1/models after loading")
    out = []
    for w in wanted:
        n = loaded_in[w.name]
        ok = bool(pod_ips) and n == len(pod_ips)
        msg = "" if ok else (errors.get(w.name) or "no ready pods to load it into")
        out.append({"name": w.name, "source": w.source, "origin": w.origin, "loaded": ok, "loadedPods": n,
                    "message": msg})
    return out
