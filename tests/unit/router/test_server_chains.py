"""Per-task chains in the router: pinned in the policy or learnt by the trainer (artifact metadata), only the chain's
tiers are called, and thresholds fitted on another chain (or not for the task's quality floor) are never applied."""

from routenlp.router.artifacts import Calibration
from routenlp.router.conformal import ThresholdResult

from .test_server import stack_factory  # noqa: F401  (fixture)

THR = ThresholdResult(0.5, 500, 300, 0.01, True)
CAL = Calibration(0.05, 0.1, tasks={"intent": {"small": THR, "medium": THR}})


def intent(**extra):
    return [{"name": "intent", "kind": "structured", "answers": ["refund", "card"], "qualityTarget": 0.9,
             "match": {"models": ["support-intent"]}, **extra}]


def calls(s):
    return [len(f.calls) for f in s.fakes]


def test_pinned_chain_skips_tiers_off_it(stack_factory):
    meta = {"chains": {"intent": ["medium", "big"]}}
    s = stack_factory(tasks=intent(chain=["medium", "big"]),
                      artifacts=[("v1", {"router": None, "calibration": CAL, "metadata": meta})])
    code, h, _ = s.chat("refund, easy")
    assert code == 200 and h["x-routenlp-tier"] == "medium" and calls(s) == [0, 1, 0]
    code, h, _ = s.chat("refund, hard")  # medium unsure -> the chain's end
    assert h["x-routenlp-tier"] == "big" and calls(s) == [0, 2, 1]


def test_learnt_chain_from_the_artifact(stack_factory):
    meta = {"chains": {"intent": ["small", "big"]}}
    s = stack_factory(tasks=intent(), artifacts=[("v1", {"router": None, "calibration": CAL, "metadata": meta})])
    code, h, _ = s.chat("refund, medium")  # small is unsure; medium is off the learnt chain
    assert code == 200 and h["x-routenlp-tier"] == "big" and calls(s) == [1, 0, 1]


def test_thresholds_fitted_on_another_chain_are_not_used(stack_factory):
    # the artifact was calibrated on every tier (no chains); the policy pins another chain: its thresholds saw
    # other requests, so none is in force and the chain's end answers
    s = stack_factory(tasks=intent(chain=["medium", "big"]),
                      artifacts=[("v1", {"router": None, "calibration": CAL})])
    code, h, _ = s.chat("refund, easy")
    assert code == 200 and h["x-routenlp-tier"] == "big" and calls(s) == [0, 0, 1]
    assert s.metric("routenlp_calibrated", task="intent", tier="medium") == 0


def test_a_quality_floor_needs_thresholds_calibrated_for_it(stack_factory):
    s = stack_factory(tasks=intent(qualityFloor=0.95), artifacts=[("v1", {"router": None, "calibration": CAL})])
    _, h, _ = s.chat("refund, easy")
    assert h["x-routenlp-tier"] == "big"  # no floor certificate in the artifact: nothing certified
    floor = {"floor_certificates": {"intent": {"floor": 0.95, "scope": "task", "level": 0.5}}}
    s2 = stack_factory(tasks=intent(qualityFloor=0.95),
                       artifacts=[("v1", {"router": None, "calibration": CAL, "metadata": floor})])
    _, h, _ = s2.chat("refund, easy")
    assert h["x-routenlp-tier"] == "small"
    # certified for the task's own floor: not valid for a policy-wide floor (another scope, another sample)
    s3 = stack_factory(tasks=intent(), cascade={"qualityFloor": 0.95},
                       artifacts=[("v1", {"router": None, "calibration": CAL, "metadata": floor})])
    _, h, _ = s3.chat("refund, easy")
    assert h["x-routenlp-tier"] == "big"


def test_the_exploration_sample_tries_tiers_off_the_chain(stack_factory):
    """Logs must show what a tier off a task's chain could do, or no retrain could ever put it on the chain."""
    s = stack_factory(tasks=intent(chain=["medium", "big"]), shadowSampleRate=1.0,
                      artifacts=[("v1", {"router": None, "calibration": CAL,
                                         "metadata": {"chains": {"intent": ["medium", "big"]}}})])
    code, h, _ = s.chat("refund, hard")
    assert code == 200 and calls(s)[0] == 1  # small, off the chain, was tried on the exploration sample
