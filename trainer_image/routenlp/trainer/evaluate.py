"""`routenlp train evaluate`: does the adapter help on its clusters without hurting elsewhere?

Runs the student with and without the adapter (greedy, in-process: the same weights vLLM serves; "without" is
`--baseline-adapter` when given: a campaign's later round is judged against the adapter it continues) on the held-out
queries of each top cluster and on the held-out sample outside the clusters, and scores the answers against the
teacher's answers (normalised exact match). The teacher itself is scored on the same queries when `--teacher-url`
is given (against `--labels` gold answers where known, else against its logged answers).

Gate (the campaign's `spec.evaluation`): pass when the accuracy gain on the cluster hold-out is at least
`--min-quality-gain` and the accuracy drop outside the clusters is at most `--max-regression`. A failed gate is a
result, not a crash: the exit code is 0 and `metrics.passed` is false.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from typing import Any

from .manifest import Stage, StageError, local_path, print_summary, read_jsonl, write_jsonl

_PUNCT = re.compile(r"[^\w\s]")


def normalise(answer: str) -> str:
    """First line, lower case, punctuation dropped (underscores kept: `card_arrival.` matches `Card_Arrival`),
    spaces collapsed."""
    first = (answer or "").strip().split("\n", 1)[0]
    return " ".join(_PUNCT.sub(" ", first.lower()).split())


def matches(answer: str | None, target: str | None) -> bool:
    return answer is not None and target is not None and normalise(answer) == normalise(target) != ""


def accuracy(answers: list[str | None], targets: list[str | None]) -> float | None:
    return sum(matches(a, t) for a, t in zip(answers, targets)) / len(targets) if targets else None


def gate(before: float | None, after: float | None, out_before: float | None, out_after: float | None,
         min_quality_gain: float, max_regression: float) -> dict[str, Any]:
    """Pass/fail with reasons. No outside sample: regression is unknown and does not block."""
    gain = None if before is None or after is None else after - before
    regression = None if out_before is None or out_after is None else out_before - out_after
    reasons = []
    if gain is None:
        reasons.append("no held-out cluster queries")
    elif gain < min_quality_gain:
        reasons.append(f"quality gain {gain:.3f} < minQualityGain {min_quality_gain}")
    if regression is not None and regression > max_regression:
        reasons.append(f"regression outside the clusters {regression:.3f} > maxRegression {max_regression}")
    return {"passed": not reasons, "quality_gain": gain, "regression": regression, "reasons": reasons}


def generate(model: Any, tok: Any, system_prompt: str, queries: list[str], max_new_tokens: int = 24,
             batch_size: int = 16, desc: str = "generate") -> list[str]:
    """Greedy chat completions, batched with left padding."""
    import torch
    from tqdm import tqdm

    from .distill import messages_for

    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    out: list[str] = []
    model.eval()
    for i in tqdm(range(0, len(queries), batch_size), desc=desc, unit="batch", leave=False):
        texts = [tok.apply_chat_template(messages_for(system_prompt, q), add_generation_prompt=True, tokenize=False)
                 for q in queries[i : i + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out += [s.strip() for s in tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]
    return out


def per_cluster(rows: list[dict[str, Any]], answers: list[str]) -> dict[str, float]:
    groups: dict[Any, list[bool]] = defaultdict(list)
    for r, a in zip(rows, answers):
        groups[r["cluster"]].append(matches(a, r["target"]))
    return {str(c): round(sum(v) / len(v), 4) for c, v in sorted(groups.items(), key=lambda kv: kv[0])}


def served_answers(args: argparse.Namespace, system_prompt: str, queries: list[str], st: Stage,
                   ) -> tuple[list[str], list[str]]:
    """Answers of the running student tier without (`--student-model`) and with (`--adapter-model`) the adapter."""
    from tqdm import tqdm

    from .client import chat_many
    from .distill import messages_for

    convs = [messages_for(system_prompt, q) for q in queries]
    out = []
    for name, model in (("student_before", args.student_model), ("student_after", args.adapter_model)):
        with st.timed(name):
            answers = chat_many(args.student_url, model, convs, max_tokens=args.max_new_tokens, logprobs=False,
                                progress=lambda it, total: tqdm(it, total=total, desc=model, unit="req", leave=False))
        errors = [a.error for a in answers if a.error]
        if errors:
            raise StageError(f"--student-url: {len(errors)} of {len(queries)} calls to {model!r} failed, e.g. {errors[0]}")
        out.append([a.text for a in answers])
    return out[0], out[1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .distill import ask_teacher, resolve_model

    ddir = local_path(args.distill, "--distill")
    inputs = {"distill": args.distill}
    base = None
    if not args.student_url:  # in-process: the base weights are an input; served: the tier's weights are
        base = resolve_model(args.base_model)
        inputs["base_model"] = str(base)
    if args.labels:
        inputs["labels"] = args.labels
    if args.baseline_adapter:
        if args.student_url:
            raise StageError("--baseline-adapter is for in-process evaluation; with --student-url name the baseline "
                             "adapter's served name in --student-model")
        inputs["baseline_adapter"] = args.baseline_adapter
    params = {"min_quality_gain": args.min_quality_gain, "max_regression": args.max_regression,
              "teacher_url": args.teacher_url, "teacher_model": args.teacher_model, "max_new_tokens": args.max_new_tokens,
              "student_url": args.student_url, "student_model": args.student_model, "adapter_model": args.adapter_model}
    st = Stage("evaluate", local_path(args.out, "--out"), inputs, params, input_exclude={"distill": ("checkpoints",)},
               summary_metrics=("passed", "quality_before", "quality_after", "quality_gain", "regression",
                                "teacher_quality"))
    if st.done():
        return st.finish_skipped()
    info = json.loads((ddir / "adapter.json").read_text())
    system_prompt = info["system_prompt"]
    rows = read_jsonl(ddir / "holdout.jsonl")
    gold = {}
    if args.labels:
        gold = {r["request_id"]: r["label"] for r in read_jsonl(local_path(args.labels, "--labels"))}
    queries = [r["query"] for r in rows]

    if args.student_url:
        before, after = served_answers(args, system_prompt, queries, st)
    else:
        tok = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, ddir / "adapter")
        if args.baseline_adapter:
            model.load_adapter(str(local_path(args.baseline_adapter, "--baseline-adapter")), adapter_name="baseline")
            model.set_adapter("baseline")
            with st.timed("student_before"):
                before = generate(model, tok, system_prompt, queries, args.max_new_tokens, desc="student+baseline")
            model.set_adapter("default")
        else:
            with st.timed("student_before"), model.disable_adapter():
                before = generate(model, tok, system_prompt, queries, args.max_new_tokens, desc="student")
        with st.timed("student_after"):
            after = generate(model, tok, system_prompt, queries, args.max_new_tokens, desc="student+adapter")
    teacher: list[str | None] = [None] * len(rows)
    if args.teacher_url:
        with st.timed("teacher"):
            teacher = ask_teacher(args.teacher_url, args.teacher_model, system_prompt, queries)

    inside = [i for i, r in enumerate(rows) if r["cluster"] is not None]
    outside = [i for i, r in enumerate(rows) if r["cluster"] is None]

    def acc(answers: list[Any], idx: list[int], use_gold: bool = False) -> float | None:
        targets = [gold.get(rows[i]["request_id"], rows[i]["target"]) if use_gold else rows[i]["target"] for i in idx]
        return accuracy([answers[i] for i in idx], targets)

    q_before, q_after = acc(before, inside), acc(after, inside)
    o_before, o_after = acc(before, outside), acc(after, outside)
    verdict = gate(q_before, q_after, o_before, o_after, args.min_quality_gain, args.max_regression)
    cl_rows = [rows[i] for i in inside]
    st.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(st.output("answers", "answers.jsonl"),
                [{**r, "before": b, "after": a, "teacher": t} for r, b, a, t in zip(rows, before, after, teacher)])
    st.metrics.update(
        passed=verdict["passed"], reasons=verdict["reasons"],
        quality_before=q_before, quality_after=q_after, quality_gain=verdict["quality_gain"],
        outside_before=o_before, outside_after=o_after, regression=verdict["regression"],
        teacher_quality=acc(teacher, inside, use_gold=True) if args.teacher_url else None,
        per_cluster_before=per_cluster(cl_rows, [before[i] for i in inside]),
        per_cluster_after=per_cluster(cl_rows, [after[i] for i in inside]),
        holdout_cluster=len(inside), holdout_outside=len(outside),
    )
    return st.finish()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="routenlp train evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--distill", required=True, help="output directory of `routenlp train distill`")
    p.add_argument("--out", required=True, help="output directory (answers.jsonl, manifest.json)")
    p.add_argument("--base-model", default="smollm2-135m", help="student model folder or tiny-model name")
    p.add_argument("--min-quality-gain", type=float, default=0.02, help="spec.evaluation.minQualityGain")
    p.add_argument("--max-regression", type=float, default=0.01, help="spec.evaluation.maxRegression")
    p.add_argument("--teacher-url", help="teacher's OpenAI-compatible base URL (…/v1) to score the teacher too")
    p.add_argument("--teacher-model", default="teacher")
    p.add_argument("--labels", help="JSONL of {request_id, label} gold answers (scores the teacher against them)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--student-url", help="evaluate on the running student tier (…/v1) instead of in-process")
    p.add_argument("--student-model", default="smollm2-135m", help="with --student-url: the base model's served name")
    p.add_argument("--adapter-model", help="with --student-url: the name the adapter is loaded under")
    p.add_argument("--baseline-adapter", help="in-process: judge the adapter against this one instead of the bare "
                   "student (a campaign round against the adapter it continues)")
    args = p.parse_args(argv)
    if args.student_url and not args.adapter_model:
        raise StageError("--adapter-model: needed with --student-url (the name the adapter is loaded under)")
    print_summary(run(args))
    return 0
