"""Custom resources the integration tests create."""

from __future__ import annotations

from typing import Any

API = "routenlp.io/v1alpha1"


def tier(name: str, replicas: int = 1, **spec: Any) -> dict:
    body = {"servedModelName": name, "cost": {"inputPerMillion": 0.1, "outputPerMillion": 0.2},
            "engine": {"model": "Qwen/Qwen2.5-0.5B-Instruct"}, "replicas": replicas}
    body.update(spec)
    return {"apiVersion": API, "kind": "ModelTier", "metadata": {"name": name}, "spec": body}


def external_tier(name: str, secret: str | None = "frontier-key") -> dict:
    ext: dict[str, Any] = {"baseUrl": "https://api.example.com/v1", "model": "frontier-large"}
    if secret:
        ext["apiKeySecretRef"] = {"name": secret, "key": "apiKey"}
    return {"apiVersion": API, "kind": "ModelTier", "metadata": {"name": name},
            "spec": {"servedModelName": "frontier", "cost": {"inputPerMillion": 3, "outputPerMillion": 15},
                     "external": ext}}


def policy(name: str, tiers: list[str], mode: str = "gateway", **spec: Any) -> dict:
    body = {"tiers": [{"name": t} for t in tiers], "tasks": [{"name": "intent", "kind": "generation"}],
            "deployment": {"mode": mode, "replicas": 1}}
    body.update(spec)
    return {"apiVersion": API, "kind": "RoutingPolicy", "metadata": {"name": name}, "spec": body}


def campaign(name: str, policy_ref: str, student: str, teacher: str, **spec: Any) -> dict:
    body = {"policyRef": policy_ref, "studentTier": student, "teacherTier": teacher, "maxStageRetries": 1}
    body.update(spec)
    return {"apiVersion": API, "kind": "DistillationCampaign", "metadata": {"name": name}, "spec": body}
