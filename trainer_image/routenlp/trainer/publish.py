"""`routenlp train publish`: put the adapter and the router version where the tiers and routers load them.

Destinations are a volume path or a `file://` URI (a mounted PVC in a Job). The adapter lands in
`<adapter-to>/<adapter-name>/` (what a vLLM tier loads at runtime, `POST /v1/load_lora_adapter`), the router version
in `<router-to>/<version>/` (an artifact directory routers hot-reload). Each copy is written to a hidden temporary
sibling and renamed, so a reader sees a whole folder or none. Publishing the same content again is a no-op; a
different folder already at the destination is refused (published artifacts are immutable).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

from .manifest import Stage, StageError, local_path, print_summary, sha256_path



def _source(value: str, flag: str, marker: str, hint: str):
    """The folder to publish, checked to be what the stage expects (it holds `marker`)."""
    src = local_path(value, flag)
    if not (src / marker).is_file():
        raise StageError(f"{flag}: {src} has no {marker} ({hint})")
    return src


def _copy(src, dest) -> dict[str, Any]:
    """Copy atomically; what the manifest records about the copy."""
    return {"uri": dest.resolve().as_uri(), "action": copy_atomic(src, dest), "sha256": sha256_path(src)}

def copy_atomic(src: Path, dest: Path) -> str:
    """Copy folder `src` to `dest` (rename into place); returns 'copied' or 'unchanged'."""
    digest = sha256_path(src)
    if dest.exists():
        if sha256_path(dest) == digest:
            return "unchanged"
        raise StageError(f"{dest} already exists with other content: published artifacts are immutable, "
                         "publish under a new name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.rename(tmp, dest)
    return "copied"


def run(args: argparse.Namespace) -> dict[str, Any]:
    inputs, params = {}, {}
    if args.adapter:
        if not args.adapter_to or not args.adapter_name:
            raise StageError("--adapter-to and --adapter-name are needed with --adapter")
        inputs["adapter"] = args.adapter
        params.update(adapter_to=args.adapter_to, adapter_name=args.adapter_name)
    if args.router_version:
        if not args.router_to:
            raise StageError("--router-to is needed with --router-version")
        inputs["router_version"] = args.router_version
        params["router_to"] = args.router_to
    if not inputs:
        raise StageError("nothing to publish: give --adapter and/or --router-version")
    st = Stage("publish", local_path(args.out, "--out"), inputs, params, summary_metrics=("adapter", "router_version"))
    if st.done():
        return st.finish_skipped()
    published: dict[str, Any] = {}
    if args.adapter:
        src = _source(args.adapter, "--adapter", "adapter_config.json", "give distill's adapter/ folder")
        published["adapter"] = {"name": args.adapter_name,
                                **_copy(src, local_path(args.adapter_to, "--adapter-to") / args.adapter_name)}
    if args.router_version:
        src = _source(args.router_version, "--router-version", "metadata.json", "not a router version folder")
        published["router_version"] = {"version": src.name,
                                       **_copy(src, local_path(args.router_to, "--router-to") / src.name)}
    st.metrics.update(
        adapter=f"{published['adapter']['name']}@{published['adapter']['uri']}" if "adapter" in published else None,
        router_version=published.get("router_version", {}).get("version"), published=published)
    return st.finish()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="routenlp train publish", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="stage output directory (manifest.json)")
    p.add_argument("--adapter", help="adapter folder (distill's adapter/)")
    p.add_argument("--adapter-name", help="name the tier serves the adapter under")
    p.add_argument("--adapter-to", help="adapter root the tier loads from (path or file:// URI)")
    p.add_argument("--router-version", help="router version folder (in retrain's --artifact-dir)")
    p.add_argument("--router-to", help="router artifact directory the routers watch (path or file:// URI)")
    print_summary(run(p.parse_args(argv)))
    return 0
