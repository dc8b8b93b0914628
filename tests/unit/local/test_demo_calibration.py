"""The demo reads the thresholds of its whole calibration phase, never those of a periodic recalibration that saw part
of it (the cause of run-to-run different demo thresholds)."""

import asyncio

import aiohttp
import numpy as np

from routenlp.local.demo import expected_labels, wait_calibrated
from routenlp.router.conformal import calibrate_threshold
from ..router.test_server import stack_factory  # noqa: F401  (fixture)


def test_wait_calibrated_waits_for_every_label_and_a_later_recalibration(stack_factory, monkeypatch):
    s = stack_factory(cascade={"riskLevel": 0.2, "minCalibrationSamples": 20, "recalibrationInterval": "1s"},
                      shadowSampleRate=1.0)
    ids = [f"warm-{i}" for i in range(60)]
    for i, rid in enumerate(ids):  # every attempt of the cheap tiers is judged against the reference
        assert s.chat(f"{'hard' if i % 3 == 0 else 'easy'} refund {i}", headers={"x-request-id": rid})[0] == 200
    want = expected_labels(s.state, ids, ["small", "medium"])
    # every request tries the small tier; the medium one only while the small tier escalates (a periodic recalibration
    # may certify the small tier part-way)
    assert want["small"] == 60 and 0 < want["medium"] <= 60

    async def run():
        async with aiohttp.ClientSession() as session:
            return await wait_calibrated(session, f"http://127.0.0.1:{s.port}", "support", "intent",
                                         ["small", "medium"], s.state, ids, timeout=60)

    cal, samples, thr = asyncio.run(run())
    assert samples == {t: float(k) for t, k in want.items()}  # what the published thresholds were computed from
    w = list(s.state.window[("intent", "small")])
    assert len(w) == 60
    ref = calibrate_threshold(np.array([x[0] for x in w]), np.array([x[1] for x in w], dtype=float), 0.2, 0.1, 20,
                               fwer="holm", risk_measure="acceptedAnswers")
    assert cal["small"] == (1.0 if ref.certified else 0.0)
    if ref.certified:
        assert thr["small"] == ref.threshold
