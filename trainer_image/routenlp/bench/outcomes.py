"""The outcome table: the benchmark's input format, its loader and its cost model.

One row per (query, model), in JSON Lines (`.jsonl`/`.json`), CSV (`.csv`) or Parquet (`.parquet`), optionally
gzip-compressed (`.jsonl.gz`, `.csv.gz`):

| field | type | required | meaning |
| --- | --- | --- | --- |
| query_id | str | yes | join key across models |
| task | str | yes | task / category (per-task calibration, per-task best model) |
| query | str | yes | the prompt text (what the router embeds) |
| model | str | yes | model (tier) name |
| quality | float in [0, 1] | yes | 1 = acceptable / correct |
| cost_usd | float >= 0 | no* | what that model cost for that query |
| response | str | no | the model's answer text (offline answer scorer) |
| latency_ms, input_tokens, output_tokens | float | no | |

*Rows without `cost_usd` get `input_tokens x price.input + output_tokens x price.output` from a price table
(`prices.yaml`: USD per million tokens per model); a row with neither is an error naming the row and field.
Queries that lack a row for some model are dropped (counted in `Outcomes.dropped`): every method must be able to
pick any model. A quality below `ACCEPTABLE` (0.5) counts as unacceptable for the cascade's guarantee.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

REQUIRED = ("query_id", "task", "query", "model", "quality")
ACCEPTABLE = 0.5  # quality >= this = acceptable answer (binary labels: 1 = acceptable)


class OutcomeError(ValueError):
    """Bad outcome-table input; the message names the file, row and field."""


def chars_to_tokens(text: str) -> int:
    """Token count estimate used by the converters: ceil(characters / 4) (OpenAI's rule of thumb for English)."""
    return int(math.ceil(len(text or "") / 4))


# ---------------------------------------------------------------------------------------------------- prices


@dataclass(frozen=True)
class Price:
    input: float  # USD per million input tokens
    output: float  # USD per million output tokens

    def cost(self, input_tokens: float, output_tokens: float) -> float:
        return (input_tokens * self.input + output_tokens * self.output) / 1e6


def normalise_model_name(name: str) -> str:
    """Names differ only in punctuation across sources (`Meta-Llama-3_1-8B` vs `Meta-Llama-3.1-8B`)."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def load_prices(path: str | Path) -> dict[str, Price]:
    """prices.yaml -> {model: Price}. Format: `models: {NAME: {input: USD/M, output: USD/M}}`."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise OutcomeError(f"price table {path} does not exist") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict):
        raise OutcomeError(f"price table {path}: expected a mapping with a `models` mapping")
    unit = doc.get("unit", "per_million_tokens")
    if unit != "per_million_tokens":
        raise OutcomeError(f"price table {path}: unit {unit!r} is not supported (use per_million_tokens)")
    out = {}
    for name, p in doc["models"].items():
        try:
            out[str(name)] = Price(float(p["input"]), float(p["output"]))
        except (KeyError, TypeError, ValueError):
            raise OutcomeError(f"price table {path}: models.{name} needs numeric `input` and `output`") from None
    return out


# Self-hosted cost model (`routenlp bench routing --prices self-hosted`): a model with `params_b` in the price table
# is priced by the GPU time its tokens take, not by a vendor. A forward pass costs 2 x params FLOPs per token
# (Kaplan et al. 2020, active parameters for mixture-of-experts); prefill runs compute-bound, decode is limited by
# memory bandwidth, so it reaches a smaller share of the peak. Fixed from public figures before any result was
# seen, not tuned: one H100 SXM (989 TFLOP/s dense BF16, NVIDIA datasheet) at 2.50 USD per GPU-hour (2024 on-demand
# cloud price class), 50 % model-FLOPs utilisation in prefill, 15 % in batched decode (vLLM serving range). GPU
# memory (a 236B mixture-of-experts needs several GPUs however few parameters it activates) and idle time are not
# modelled. Models without `params_b` (API-only: Gemini, GPT-4, Claude) keep their list prices.
GPU_USD_PER_HOUR = 2.50
GPU_PEAK_FLOPS = 989e12
MFU_PREFILL = 0.50
MFU_DECODE = 0.15


def self_hosted_price(params_b: float) -> Price:
    """USD per million tokens of a self-hosted model with `params_b` billion (active) parameters."""
    usd_per_flop = GPU_USD_PER_HOUR / 3600.0 / GPU_PEAK_FLOPS
    flops = 2.0 * params_b * 1e9
    return Price(input=1e6 * flops * usd_per_flop / MFU_PREFILL, output=1e6 * flops * usd_per_flop / MFU_DECODE)


def load_self_hosted_prices(path: str | Path) -> dict[str, Price]:
    """prices.yaml -> {model: Price}: `self_hosted_price(params_b)` where the model has `params_b`, else its list
    price."""
    out = load_prices(path)
    doc = yaml.safe_load(Path(path).read_text())
    for name, p in doc["models"].items():
        if isinstance(p, dict) and p.get("params_b") is not None:
            try:
                out[str(name)] = self_hosted_price(float(p["params_b"]))
            except (TypeError, ValueError):
                raise OutcomeError(f"price table {path}: models.{name}.params_b must be a number") from None
    return out


def find_price(prices: dict[str, Price], model: str) -> Price | None:
    if model in prices:
        return prices[model]
    key = normalise_model_name(model)
    for name, p in prices.items():
        if normalise_model_name(name) == key:
            return p
    return None


# ---------------------------------------------------------------------------------------------------- reading


def _open_text(path: Path):
    return io.TextIOWrapper(gzip.open(path), encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_rows(path: str | Path) -> list[dict]:
    """Rows of an outcome table, format chosen by extension."""
    p = Path(path)
    if not p.is_file():
        raise OutcomeError(f"outcome table {p} does not exist")
    suffixes = [s.lower() for s in p.suffixes]
    kind = suffixes[-2] if suffixes and suffixes[-1] == ".gz" and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    if kind in (".jsonl", ".json", ".ndjson"):
        rows = []
        with _open_text(p) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise OutcomeError(f"{p}: line {i} is not JSON ({exc.msg})") from None
        return rows
    if kind == ".csv":
        with _open_text(p) as f:
            return list(csv.DictReader(f))
    if kind == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    raise OutcomeError(f"{p}: unknown extension {kind or '(none)'}; use .jsonl, .csv or .parquet (optionally .gz)")


def write_rows(rows: list[dict], path: str | Path) -> None:
    """Write rows in the format named by the extension (the converters' output)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    name = p.name.lower()
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), p)
        return
    opener = (lambda: io.TextIOWrapper(gzip.open(p, "wb"), encoding="utf-8")) if name.endswith(".gz") else (
        lambda: open(p, "w", encoding="utf-8"))
    with opener() as f:
        if name.endswith((".csv", ".csv.gz")):
            cols = list(dict.fromkeys(k for r in rows for k in r))
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        elif name.endswith((".jsonl", ".jsonl.gz", ".json", ".ndjson")):
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            raise OutcomeError(f"{p}: unknown extension; use .jsonl, .csv or .parquet (optionally .gz)")


def _num(row: dict, name: str, where: str, required: bool) -> float | None:
    v = row.get(name)
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        if required:
            raise OutcomeError(f"{where}: field `{name}` is missing")
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise OutcomeError(f"{where}: field `{name}` must be a number, got {v!r}") from None


# ---------------------------------------------------------------------------------------------------- the table


@dataclass
class Outcomes:
    """The pivoted table: queries x models. Quality/cost matrices are (n_queries, n_models), models sorted by mean
    cost (cheapest first); `reference` is the index of the reference (frontier) model."""

    name: str
    query_ids: list[str]
    tasks: np.ndarray  # (n,) int index into task_names
    task_names: list[str]
    queries: list[str]
    models: list[str]
    quality: np.ndarray  # (n, m) float
    cost: np.ndarray  # (n, m) float USD
    responses: list[list[str]] | None  # [model][query] or None when the table has no `response`
    reference: int
    dropped: dict = field(default_factory=dict)  # why queries were dropped -> count
    cost_from_tokens: int = 0  # rows whose cost came from the price table

    @property
    def n(self) -> int:
        return len(self.query_ids)

    def subset(self, idx: np.ndarray) -> "Outcomes":
        idx = np.asarray(idx)
        return Outcomes(self.name, [self.query_ids[i] for i in idx], self.tasks[idx], self.task_names,
                        [self.queries[i] for i in idx], self.models, self.quality[idx], self.cost[idx],
                        None if self.responses is None else [[r[i] for i in idx] for r in self.responses],
                        self.reference, dict(self.dropped), self.cost_from_tokens)


def build_outcomes(rows: list[dict], name: str = "outcomes", prices: dict[str, Price] | None = None,
                   frontier: str | None = None, where: str = "row", recost: bool = False) -> Outcomes:
    """Validate rows, fill missing costs from tokens x prices, pivot to matrices, drop incomplete queries.
    recost: every row's cost comes from its tokens x `prices`, `cost_usd` ignored (another price model)."""
    if not rows:
        raise OutcomeError(f"{name}: the outcome table is empty")
    cells: dict[tuple[str, str], tuple[float, float, str | None]] = {}
    meta: dict[str, tuple[str, str]] = {}
    models: dict[str, None] = {}
    from_tokens = 0
    has_response = False
    for i, r in enumerate(rows, 1):
        at = f"{name}: {where} {i}"
        for k in REQUIRED:
            if r.get(k) is None or r.get(k) == "":
                raise OutcomeError(f"{at}: field `{k}` is missing")
        qid, model = str(r["query_id"]), str(r["model"])
        q = _num(r, "quality", at, True)
        if not 0.0 <= q <= 1.0:
            raise OutcomeError(f"{at}: field `quality` must be in [0, 1], got {q}")
        cost = None if recost else _num(r, "cost_usd", at, False)
        if cost is None:
            tin, tout = _num(r, "input_tokens", at, False), _num(r, "output_tokens", at, False)
            if tin is None and tout is None:
                raise OutcomeError(f"{at}: field `cost_usd` is missing and there are no `input_tokens`/`output_tokens`")
            price = find_price(prices or {}, model)
            if price is None:
                raise OutcomeError(f"{at}: field `cost_usd` is missing and model {model!r} is not in the price table"
                                   + ("" if prices else " (pass --prices)"))
            cost = price.cost(tin or 0.0, tout or 0.0)
            from_tokens += 1
        if cost < 0:
            raise OutcomeError(f"{at}: field `cost_usd` must be >= 0, got {cost}")
        resp = r.get("response")
        has_response |= resp is not None
        if (qid, model) in cells:
            raise OutcomeError(f"{at}: duplicate row for query_id {qid!r} and model {model!r}")
        cells[(qid, model)] = (q, cost, None if resp is None else str(resp))
        meta.setdefault(qid, (str(r["task"]), str(r["query"])))
        models.setdefault(model, None)
    model_list = list(models)
    complete = [qid for qid in meta if all((qid, m) in cells for m in model_list)]
    dropped = {"missing_some_model": len(meta) - len(complete)}
    if not complete:
        raise OutcomeError(f"{name}: no query has a row for every model ({', '.join(model_list)})")
    Q = np.array([[cells[(qid, m)][0] for m in model_list] for qid in complete], dtype=float)
    C = np.array([[cells[(qid, m)][1] for m in model_list] for qid in complete], dtype=float)
    order = np.argsort(C.mean(0), kind="stable")  # cheapest first
    model_list = [model_list[j] for j in order]
    Q, C = Q[:, order], C[:, order]
    responses = None
    if has_response:
        responses = [[cells[(qid, m)][2] or "" for qid in complete] for m in model_list]
    task_names = sorted({meta[q][0] for q in complete})
    tix = {t: i for i, t in enumerate(task_names)}
    if frontier is None:
        ref = int(np.argmax(C.mean(0)))
    elif frontier in model_list:
        ref = model_list.index(frontier)
    else:
        raise OutcomeError(f"--frontier {frontier!r} is not a model of {name} (models: {', '.join(model_list)})")
    return Outcomes(name, complete, np.array([tix[meta[q][0]] for q in complete]), task_names,
                    [meta[q][1] for q in complete], model_list, Q, C, responses, ref, dropped, from_tokens)


def load_outcomes(path: str | Path, prices: str | Path | None = None, frontier: str | None = None,
                  self_hosted: bool = False) -> Outcomes:
    """Read and pivot an outcome table file (see the module docstring for the format).
    self_hosted: recost every row from its tokens with `load_self_hosted_prices(prices)`."""
    p = Path(path)
    if self_hosted and not prices:
        raise OutcomeError("self-hosted prices need the price table (prices.yaml with params_b)")
    table = (load_self_hosted_prices(prices) if self_hosted else load_prices(prices)) if prices else None
    name = p.name.split(".")[0]
    return build_outcomes(read_rows(p), name=name, prices=table, frontier=frontier,
                          where="line" if ".jsonl" in p.name or ".json" in p.name else "row", recost=self_hosted)


def portfolio_tiers(cost: np.ndarray, reference: int) -> list[int]:
    """Every model no dearer than the reference on mean (train) cost, cheapest first, the reference last: the
    candidates for per-task chains."""
    mc = cost.mean(0)
    rest = [int(j) for j in np.argsort(mc, kind="stable") if j != reference and mc[j] <= mc[reference]]
    return rest + [int(reference)]


def pareto_tiers(quality: np.ndarray, cost: np.ndarray, reference: int) -> list[int]:
    """Cascade tiers: models no cheaper model beats on mean quality, cheaper than the reference, cheapest first,
    ending with the reference. Computed on training data only."""
    mq, mc = quality.mean(0), cost.mean(0)
    tiers, best = [], -np.inf
    for j in np.argsort(mc, kind="stable"):
        if j == reference or mc[j] >= mc[reference]:
            continue
        if mq[j] > best:
            tiers.append(int(j))
            best = mq[j]
    # A tier at least as good as the reference on average is still a useful first try; keep it.
    return tiers + [int(reference)]
