"""`routenlp data convert SOURCE --out FILE`: turn public routing data into the outcome-table format.

Sources (read in place from the shared data folder, never copied into the repository):

- `mmlu-pro-model-outputs`: MMLU-Pro per-model outputs (zips of JSON lists). task = `category`, quality = 1 iff the
  harness-parsed `pred` equals the gold `answer` (a null `pred` is wrong), response = the model's chain of thought.
  Tokens are estimated as ceil(characters / 4) (`outcomes.chars_to_tokens`; no model's own tokenizer is available
  offline for all 8 models, and one rule for all keeps the comparison fair). Input tokens = the 5-shot prefix of the
  question's category + question + options; the prefix (the prompt is not stored) is estimated as 5 x (mean
  question+options tokens of that category + mean output tokens of that category over all models) + 50 tokens of
  instructions. Output tokens = tokens of the model's output. Cost = tokens x prices.yaml.
- `financebench`: human-labelled answers of several LLMs to FinanceBench's 150 questions, one retrieval mode
  (`--mode`, default singleStore). quality = 1 iff the label is `Correct Answer` (Incorrect and Refusal = 0).
  Tokens: question + a fixed retrieved-context budget per mode (`--context-tokens`; the contexts are not in the
  files) as input, the model's answer as output, both ceil(chars / 4). task = one task (`financebench`) unless
  `--task-field` names a question field (e.g. question_type).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from .outcomes import OutcomeError, chars_to_tokens, find_price, load_prices, write_rows

LETTERS = "ABCDEFGHIJ"
PREFIX_INSTRUCTION_TOKENS = 50
SHOTS = 5
# Retrieved context per question (tokens) assumed for each FinanceBench mode; the contexts are not stored.
CONTEXT_TOKENS = {"closedBook": 0, "singleStore": 2000, "sharedStore": 2000, "oracle": 1500, "inContext": 60000}


def shared_data_dir() -> Path:
    """`<repo>/../shared/data`, or $ROUTENLP_SHARED_DATA."""
    env = os.environ.get("ROUTENLP_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def _options(opts) -> list[str]:
    if isinstance(opts, str):  # some files store the list as its Python repr
        try:
            opts = ast.literal_eval(opts)
        except (ValueError, SyntaxError):
            return [opts]
    return [str(o) for o in opts]


def mmlu_query_text(rec: dict) -> str:
    """The question as the model saw it (without the few-shot prefix): question + lettered options."""
    lines = [str(rec["question"]).strip(), "Options:"]
    lines += [f"{LETTERS[i]}. {o}" for i, o in enumerate(_options(rec["options"])[: len(LETTERS)])]
    return "\n".join(lines)


def model_name_from_zip(path: Path) -> str:
    """`model_outputs_Meta-Llama-3_1-8B-Instruct_5shots.zip` -> `Meta-Llama-3_1-8B-Instruct`."""
    stem = path.name.removesuffix(".zip")
    return stem.removeprefix("model_outputs_").removesuffix("_5shots")


def read_mmlu_zip(path: Path) -> list[dict]:
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith(".json")]
        if len(names) != 1:
            raise OutcomeError(f"{path}: expected one JSON file inside, found {names}")
        return json.loads(z.read(names[0]))


def convert_mmlu_records(per_model: dict[str, list[dict]], prices: dict, limit: int | None = None,
                         skipped: dict | None = None) -> list[dict]:
    """Pure part of the MMLU-Pro converter: {model: records} -> outcome rows (see the module docstring).

    List entries that are not records (DeepSeek-Coder-V2's file holds 43 strings) are skipped and counted per model
    in `skipped` when given."""
    per_model = {m: _records(m, recs, skipped) for m, recs in per_model.items()}
    queries: dict[str, dict] = {}
    for recs in per_model.values():
        for r in recs:
            queries.setdefault(str(r["question_id"]), r)
    qids = sorted(queries, key=lambda q: int(q) if q.isdigit() else q)
    if limit:
        qids = qids[:limit]
    keep = set(qids)
    text = {q: mmlu_query_text(queries[q]) for q in qids}
    # Per-category means for the few-shot prefix estimate.
    q_tok, o_tok = defaultdict(list), defaultdict(list)
    for q in qids:
        q_tok[queries[q]["category"]].append(chars_to_tokens(text[q]))
    outputs: dict[str, dict[str, dict]] = {}
    for model, recs in per_model.items():
        outputs[model] = {}
        for r in recs:
            qid = str(r["question_id"])
            if qid in keep:
                outputs[model][qid] = r
                o_tok[r["category"]].append(chars_to_tokens(_response(r)))
    prefix = {c: SHOTS * (np.mean(q_tok[c]) + np.mean(o_tok[c] or [0])) + PREFIX_INSTRUCTION_TOKENS for c in q_tok}
    rows = []
    for model, recs in outputs.items():
        price = find_price(prices, model)
        if price is None:
            raise OutcomeError(f"model {model!r} has no entry in the price table")
        display = _price_name(prices, model)
        for qid in qids:
            r = recs.get(qid)
            if r is None:
                continue
            cat = queries[qid]["category"]
            resp = _response(r)
            tin = int(round(prefix[cat])) + chars_to_tokens(text[qid])
            tout = chars_to_tokens(resp)
            pred = r.get("pred")
            rows.append({
                "query_id": qid, "task": cat, "query": text[qid], "model": display,
                "quality": float(pred is not None and str(pred) == str(queries[qid]["answer"])),
                "cost_usd": price.cost(tin, tout), "response": resp, "input_tokens": tin, "output_tokens": tout,
            })
    return rows


def _records(model: str, recs: list, skipped: dict | None) -> list[dict]:
    keep = [r for r in recs if isinstance(r, dict) and "question_id" in r]
    if skipped is not None and len(keep) < len(recs):
        skipped[model] = len(recs) - len(keep)
    return keep


def _response(r: dict) -> str:
    return str(r.get("generated_text") or r.get("model_outputs") or "")


def _price_name(prices: dict, model: str) -> str:
    from .outcomes import normalise_model_name

    for name in prices:
        if normalise_model_name(name) == normalise_model_name(model):
            return name
    return model


def convert_mmlu(src: Path, prices: dict, limit: int | None = None, progress: bool = True,
                 extra: list[Path] = ()) -> list[dict]:
    """MMLU-Pro zips of `src/eval_results`, plus those directly in each `extra` folder (mmlu-pro-more-models)."""
    zips = sorted((src / "eval_results").glob("model_outputs_*.zip"))
    if not zips:
        raise OutcomeError(f"{src}/eval_results has no model_outputs_*.zip files")
    for d in extra:
        more = sorted(Path(d).glob("model_outputs_*.zip"))
        if not more:
            raise OutcomeError(f"--extra {d}: no model_outputs_*.zip files there")
        zips += more
    it = zips
    if progress:
        from tqdm import tqdm

        it = tqdm(zips, desc="read zips", unit="model", file=sys.stderr)
    per_model = {model_name_from_zip(z): read_mmlu_zip(z) for z in it}
    skipped: dict = {}
    rows = convert_mmlu_records(per_model, prices, limit, skipped)
    for model, k in skipped.items():
        print(f"{model}: skipped {k} list entries that are not records", file=sys.stderr)
    return rows


def convert_financebench_records(questions: list[dict], results: dict[str, list[dict]], prices: dict,
                                 context_tokens: int, task_field: str | None = None) -> list[dict]:
    """Pure part of the FinanceBench converter: questions + {model: labelled answers} -> outcome rows."""
    qmeta = {q["financebench_id"]: q for q in questions}
    rows = []
    for model, answers in results.items():
        price = find_price(prices, model)
        if price is None:
            raise OutcomeError(f"model {model!r} has no entry in the price table")
        for a in answers:
            qid = a["financebench_id"]
            q = qmeta.get(qid, {})
            label = a.get("label")
            if label not in ("Correct Answer", "Incorrect Answer", "Refusal"):
                raise OutcomeError(f"financebench {model}: {qid} has unknown label {label!r}")
            question = str(q.get("question") or a.get("question") or "")
            resp = str(a.get("model_answer") or "")
            tin = context_tokens + chars_to_tokens(question)
            tout = chars_to_tokens(resp)
            task = str(q.get(task_field) or "none") if task_field else "financebench"
            rows.append({"query_id": qid, "task": task, "query": question, "model": model,
                         "quality": float(label == "Correct Answer"), "cost_usd": price.cost(tin, tout),
                         "response": resp, "input_tokens": tin, "output_tokens": tout, "label": label})
    return rows


def _read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def convert_financebench(src: Path, prices: dict, mode: str, context_tokens: int | None,
                         task_field: str | None) -> list[dict]:
    files = sorted((src / "results").glob(f"*_{mode}.jsonl"))
    if not files:
        modes = sorted({f.stem.split("_", 1)[1] for f in (src / "results").glob("*_*.jsonl")})
        raise OutcomeError(f"--mode {mode!r}: no results/*_{mode}.jsonl in {src} (modes: {', '.join(modes)})")
    results = {f.stem[: -len(mode) - 1]: _read_jsonl(f) for f in files}
    ctx = CONTEXT_TOKENS.get(mode, 2000) if context_tokens is None else context_tokens
    return convert_financebench_records(_read_jsonl(src / "data" / "financebench_open_source.jsonl"), results,
                                        prices, ctx, task_field)


SOURCES = ("mmlu-pro-model-outputs", "financebench")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="routenlp data", description="Convert public routing data to outcome tables.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="convert a public data set (see docs/bench-routing.md)")
    c.add_argument("source", choices=SOURCES)
    c.add_argument("--out", required=True, help="output file: .jsonl, .csv or .parquet (optionally .gz)")
    c.add_argument("--data", default=None, help="source folder (default: <shared data>/SOURCE)")
    c.add_argument("--prices", default=None, help="price table (default: <shared data>/prices.yaml)")
    c.add_argument("--limit", type=int, default=None, help="mmlu: only the first N question ids (for quick tests)")
    c.add_argument("--extra", action="append", default=[],
                   help="mmlu: another folder of model_outputs_*.zip to add (repeatable; e.g. "
                   "<shared data>/mmlu-pro-more-models for the 13-model portfolio)")
    c.add_argument("--mode", default="singleStore", help="financebench retrieval mode (default singleStore)")
    c.add_argument("--context-tokens", type=int, default=None,
                   help="financebench: retrieved-context tokens per question (default per mode, see docs)")
    c.add_argument("--task-field", default=None, help="financebench: question field to use as task (default: one task)")
    args = ap.parse_args(argv)
    shared = shared_data_dir()
    src = Path(args.data) if args.data else shared / args.source
    if not src.is_dir():
        print(f"routenlp data convert: source folder {src} does not exist (--data or ROUTENLP_SHARED_DATA)",
              file=sys.stderr)
        return 2
    try:
        prices = load_prices(args.prices or shared / "prices.yaml")
        if args.source == "mmlu-pro-model-outputs":
            rows = convert_mmlu(src, prices, args.limit, extra=[Path(d) for d in args.extra])
        else:
            rows = convert_financebench(src, prices, args.mode, args.context_tokens, args.task_field)
        write_rows(rows, args.out)
    except OutcomeError as exc:
        print(f"routenlp data convert: {exc}", file=sys.stderr)
        return 2
    n_q = len({r["query_id"] for r in rows})
    n_m = len({r["model"] for r in rows})
    print(f"wrote {len(rows)} rows ({n_q} queries x {n_m} models) to {args.out}", file=sys.stderr)
    return 0
