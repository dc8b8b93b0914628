"""The local runtime trusts one labeller, whose token it generates in the run's work dir; the demo's gold-label
feedback carries it, so those labels move thresholds (and anonymous ones do not)."""

import stat

import aiohttp

from routenlp.local import banking77 as b77
from routenlp.local import demo, up
from routenlp.router.auth import KeyDir
from routenlp.router.events import FeedbackEvent

from ..router.live import request
from ..router.test_server import Stack


def stack_metrics(stack) -> str:
    return request(stack.port, "GET", "/metrics")[2].decode()


def test_token_is_generated_once_owner_only_in_the_folder_the_config_names(tmp_path):
    token = up.ensure_labeller_token(tmp_path)
    path = tmp_path / up.LABELLERS_DIR / up.LOCAL_LABELLER
    assert len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert up.ensure_labeller_token(tmp_path) == token  # kept across runs of the same work dir
    assert KeyDir(tmp_path / up.LABELLERS_DIR).match(token) == up.LOCAL_LABELLER


def test_demo_feedback_carries_the_labeller_token(tmp_path):
    (tmp_path / "s").mkdir()
    token = up.ensure_labeller_token(tmp_path)
    stack = Stack(tmp_path / "s", shadowSampleRate=1.0, auth={"labellersDir": str(tmp_path / up.LABELLERS_DIR)})
    try:
        url = f"http://127.0.0.1:{stack.port}"
        pool = b77.sample("test", 3, seed=1)

        async def run():
            async with aiohttp.ClientSession() as s:
                return await demo.calibrate(s, url, "intent", pool, ["refund", "card"], stack.state, ["small"],
                                            stack.config.cascade, concurrency=1, labeller_token=token)

        rows = stack.live.run(run(), timeout=60)
        assert len(rows) == 3
        fbs = [e for e in stack.events() if isinstance(e, FeedbackEvent) and e.source == "user"]
        assert [e.labeller for e in fbs] == [up.LOCAL_LABELLER] * 3
        # each gold label counted (it labels the final tier's answer, the reference's; the judge labels the
        # cheaper ones), none as unauthenticated
        counted = sum(float(line.rsplit(" ", 1)[1]) for line in stack_metrics(stack).splitlines()
                      if line.startswith("routenlp_feedback_total{") and 'tier="big"' in line)
        assert counted == 3 and stack.metric("routenlp_feedback_not_applied_total") is None
    finally:
        stack.close()
