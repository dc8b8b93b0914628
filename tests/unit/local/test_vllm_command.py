"""VLLMServer's command line and environment (pure), and its start-failure reporting."""

import sys

import pytest

from routenlp.local.vllm import LoRAOptions, VLLMServer, VLLMStartError, build_command, build_env, lora_rank_arg


def _flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_command_has_the_cpu_facts():
    cmd = build_command("/m/smol", "smollm2-135m", 8123)
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert "--enforce-eager" in cmd
    assert _flag(cmd, "--kv-cache-memory-bytes") == "1G"
    assert _flag(cmd, "--served-model-name") == "smollm2-135m"
    assert _flag(cmd, "--port") == "8123" and _flag(cmd, "--host") == "127.0.0.1"
    assert "--enable-lora" not in cmd


def test_command_with_lora_and_extra_args_last():
    cmd = build_command("/m", "s", 1, lora=LoRAOptions(max_lora_rank=12, max_loras=3, modules={"a": "/ad/a"}),
                        extra_args=["--seed", "1"])
    assert "--enable-lora" in cmd
    assert _flag(cmd, "--max-lora-rank") == "16"  # rounded up to a rank vLLM accepts
    assert _flag(cmd, "--max-loras") == "3"
    assert _flag(cmd, "--lora-modules") == "a=/ad/a"
    assert cmd[-2:] == ["--seed", "1"]


@pytest.mark.parametrize("rank,arg", [(1, 1), (2, 8), (8, 8), (9, 16), (300, 320), (512, 512)])
def test_lora_rank_rounding(rank, arg):
    assert lora_rank_arg(rank) == arg


def test_lora_rank_too_large():
    with pytest.raises(ValueError):
        lora_rank_arg(513)


def test_env(tmp_path):
    env = build_env(tmp_path, base={"PATH": "/bin"}, lora=LoRAOptions(), kv_cache_gib=2)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["TMPDIR"] == env["VLLM_RPC_BASE_PATH"] == str(tmp_path)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["PATH"] == "/bin"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in build_env(tmp_path, base={})


def test_start_failure_reports_log_tail(tmp_path):
    # an unknown flag: vLLM exits quickly; the error must carry its log (kept for post-mortems)
    srv = VLLMServer(tmp_path / "no-model", "x", log_path=tmp_path / "vllm.log", startup_timeout=120,
                     extra_args=["--this-flag-does-not-exist"])
    try:
        with pytest.raises(VLLMStartError, match="exited with code") as exc:
            srv.start()
        assert "this-flag-does-not-exist" in str(exc.value)
        assert not srv.running()
    finally:
        import shutil

        shutil.rmtree(srv.scratch_dir, ignore_errors=True)


class SleeperServer(VLLMServer):
    """The process-group handling of VLLMServer around a stand-in command (a parent with a child, no vLLM)."""

    def __init__(self, tmp_path, ignore_term=False, **kw):
        super().__init__(tmp_path / "m", "x", scratch_dir=tmp_path / "s", **kw)
        self.ignore_term = ignore_term

    def command(self):
        child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN) if %s else None; time.sleep(120)"
        code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', %r]); time.sleep(120)"
                % (child % self.ignore_term))
        return [sys.executable, "-c", code]


def _wait_group(pgid, n, timeout=20):
    import time

    from routenlp.local.vllm import group_pids

    deadline = time.monotonic() + timeout
    while len(group_pids(pgid)) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return group_pids(pgid)


def test_stop_kills_the_whole_group_even_if_a_child_ignores_sigterm(tmp_path):
    from routenlp.local.vllm import group_pids

    srv = SleeperServer(tmp_path, ignore_term=True, stop_timeout=2)
    srv.start(wait=False)
    pgid = srv.pgid
    assert len(_wait_group(pgid, 2)) == 2  # parent + child in the server's own group
    srv.stop()
    assert group_pids(pgid) == []


def test_watchdog_stops_the_group_when_the_starter_goes_away(tmp_path):
    """Closing the watchdog's pipe is what the kernel does when the starting process dies (even by SIGKILL)."""
    import time

    from routenlp.local.vllm import group_pids

    srv = SleeperServer(tmp_path, ignore_term=True, stop_timeout=2)
    srv.start(wait=False)
    pgid = srv.pgid
    assert len(_wait_group(pgid, 2)) == 2
    srv._watchdog.stdin.close()
    deadline = time.monotonic() + 20
    while group_pids(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_pids(pgid) == []
    srv.proc.wait()
    srv._watchdog.wait()
    assert not srv.scratch_dir.exists()  # the watchdog removed the server's own scratch folder
