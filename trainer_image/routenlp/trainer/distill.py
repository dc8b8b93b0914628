"""`routenlp train distill`: LoRA fine-tune the student tier on the teacher's answers to the costliest clusters.

Training pairs are (the request as the student sees it: `--system-prompt` + the query) -> the teacher's answer, taken
from the log (the teacher's accepted attempt or a shadow reference answer) or, where the log has none, by calling the
teacher tier's OpenAI-compatible endpoint (`--teacher-url`). Each top cluster keeps `--hold-out-fraction` of its
queries back for `evaluate`, and a sample of queries outside the top clusters is held back to catch regressions.

`--mode untargeted` is the control: the same number of pairs and steps, drawn at random from all escalation failures
(never from the held-out queries), so that the two adapters differ only in what they were trained on.

The adapter is written in the layout vLLM loads at runtime (`adapter/adapter_config.json` +
`adapter/adapter_model.safetensors`). Training checkpoints every `--checkpoint-every` steps (LoRA weights, optimizer,
scheduler, RNG) into `checkpoints/`; a restarted run with the same inputs resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

from .manifest import Stage, StageError, local_path, print_summary, read_jsonl, write_json_atomic, write_jsonl

DEFAULT_SYSTEM_PROMPT = "Answer the customer's request."


# ---------------------------------------------------------------- data (pure)


def split_holdout(
    rows: list[dict[str, Any]], top: list[int], hold_out_fraction: float, outside: int, seed: int
) -> tuple[set[str], set[str]]:
    """Held-out request ids: per top cluster `hold_out_fraction` of its queries (at least one when it has two or more),
    and `outside` queries from outside the top clusters. Deterministic in `seed`."""
    rng = random.Random(seed)
    held: set[str] = set()
    for c in top:
        ids = sorted(r["request_id"] for r in rows if r["cluster"] == c)
        rng.shuffle(ids)
        n = math.ceil(hold_out_fraction * len(ids)) if len(ids) >= 2 else 0
        held.update(ids[:n])
    rest = sorted(r["request_id"] for r in rows if r["cluster"] not in top)
    rng.shuffle(rest)
    return held, set(rest[:outside])


def training_rows(
    rows: list[dict[str, Any]], top: list[int], exclude: set[str], mode: str, samples_per_cluster: int, seed: int
) -> list[dict[str, Any]]:
    """Targeted: up to `samples_per_cluster` pairs from each top cluster. Untargeted (the control): as many pairs,
    drawn at random from every failure. Held-out ids are never used."""
    rng = random.Random(seed + 1)
    pool = [r for r in rows if r["request_id"] not in exclude and r.get("teacher_response")]
    targeted: list[dict[str, Any]] = []
    for c in top:
        members = sorted((r for r in pool if r["cluster"] == c), key=lambda r: r["request_id"])
        rng.shuffle(members)
        targeted += members[:samples_per_cluster]
    if mode == "targeted":
        return targeted
    if mode != "untargeted":
        raise StageError(f"--mode: {mode!r} is not one of targeted, untargeted")
    pool = sorted(pool, key=lambda r: r["request_id"])
    rng.shuffle(pool)
    return pool[: len(targeted)]


def messages_for(system_prompt: str, query: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": query}]


def encode_pair(tokenizer: Any, system_prompt: str, query: str, answer: str, max_len: int = 256) -> dict[str, list[int]]:
    """Token ids of prompt + answer as the chat template renders them (the same text vLLM builds for a chat request),
    with labels only on the answer (and the template's end-of-turn)."""
    msgs = messages_for(system_prompt, query)
    prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise StageError("the student's chat template renders the prompt differently with an answer appended")
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(full[len(prompt) :].rstrip("\n"), add_special_tokens=False)["input_ids"]
    ids = (p_ids + c_ids)[-max_len:]
    labels = ([-100] * len(p_ids) + c_ids)[-max_len:]
    return {"input_ids": ids, "labels": labels}


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of optimizer step `step`: epochs are seeded permutations, so a resumed run sees the same batches."""
    start = step * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, n)
        perm = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        out.append(perm[i])
    return out


# ---------------------------------------------------------------- teacher


def ask_teacher(url: str, model: str, system_prompt: str, queries: list[str], api_key: str | None = None) -> list[str]:
    """The teacher tier's answers via its OpenAI-compatible chat endpoint (greedy); a failed call is an error."""
    from .client import chat_many

    answers = chat_many(url, model, [messages_for(system_prompt, q) for q in queries], max_tokens=64,
                        logprobs=False, api_key=api_key)
    failed = [a.error for a in answers if a.error]
    if failed:
        raise StageError(f"--teacher-url: {len(failed)} of {len(queries)} teacher calls failed, e.g. {failed[0]}")
    return [a.text for a in answers]


# ---------------------------------------------------------------- training


def resolve_model(name_or_path: str) -> Path:
    """A model folder, or a tiny model name the local runtime prepares from its PyPI package (e.g. smollm2-135m)."""
    p = local_path(name_or_path, "--base-model")
    if p.is_dir():
        return p
    from routenlp.local.models import ensure_model

    return Path(ensure_model(name_or_path))


class Interrupted(Exception):
    """Raised by an `on_step` hook to stop training (tests use it to simulate preemption)."""


def train_lora(
    base_model: Path, examples: list[dict[str, list[int]]], out_dir: Path, *, r: int, alpha: int, dropout: float,
    target_modules: list[str], steps: int, learning_rate: float, batch_size: int, seed: int, key: str,
    top_layers: int = 0, checkpoint_every: int = 25, on_step: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """LoRA-train `base_model` (bf16 weights, fp32 adapter) and save the adapter to `out_dir/adapter`.

    Resumes from `out_dir/checkpoints/last.pt` when its `key` matches. Returns training metrics.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16)
    n_layers = model.config.num_hidden_layers
    # Adapters on the top layers only: backpropagation then stops there, which halves a CPU step's cost.
    layers = list(range(n_layers - top_layers, n_layers)) if 0 < top_layers < n_layers else None
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                     layers_to_transform=layers, task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)  # peft keeps adapter weights in fp32 on a bf16 base
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    warmup = max(1, min(10, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - max(0, s - warmup) / max(1, steps - warmup)))

    ckpt_dir = out_dir / "checkpoints"
    ckpt = ckpt_dir / "last.pt"
    start, losses, resumed_from = 0, [], None
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state.get("key") == key:
            model.load_state_dict(state["lora"], strict=False)
            opt.load_state_dict(state["optim"])
            sched.load_state_dict(state["sched"])
            torch.set_rng_state(state["rng"])
            start, losses, resumed_from = state["step"], state["losses"], state["step"]

    def save_checkpoint(step: int) -> None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"key": key, "step": step, "lora": lora, "optim": opt.state_dict(), "sched": sched.state_dict(),
                    "rng": torch.get_rng_state(), "losses": losses}, tmp)
        os.replace(tmp, ckpt)

    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="distill", disable=not progress, unit="step")
    for step in bar:
        batch = [examples[i] for i in batch_indices(len(examples), batch_size, step, seed)]
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.tensor([e["input_ids"] + [pad_id] * (width - len(e["input_ids"])) for e in batch])
        labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in batch])
        mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(float(loss.detach()), 5))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done = step + 1
        if done % checkpoint_every == 0 or done == steps:
            save_checkpoint(done)
        if on_step is not None:
            on_step(done, losses[-1])
    trained = time.perf_counter() - t0
    adapter = out_dir / "adapter"
    model.save_pretrained(adapter)
    _portable_adapter_config(adapter, base_model)
    steps_run = steps - start
    return {
        "steps": steps, "steps_this_run": steps_run, "resumed_from_step": resumed_from,
        "loss_first": losses[0] if losses else None, "loss_last": float(sum(losses[-10:]) / max(1, len(losses[-10:]))),
        "seconds_per_step": round(trained / steps_run, 4) if steps_run else None,
        "trainable_parameters": int(sum(p.numel() for p in params)),
    }


def _portable_adapter_config(adapter: Path, base_model: Path) -> None:
    """peft records the base model's local path, meaningless where the adapter is served: keep the folder name only,
    so the adapter is the same file wherever the model folder lived (vLLM serves it on the tier's own base model)."""
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_model.name
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- stage


def run(args: argparse.Namespace, on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    base = resolve_model(args.base_model)
    params = {
        "mode": args.mode, "top_clusters": args.top_clusters, "samples_per_cluster": args.samples_per_cluster,
        "hold_out_fraction": args.hold_out_fraction, "outside_holdout": args.outside_holdout,
        "system_prompt": args.system_prompt, "r": args.r, "alpha": args.alpha, "dropout": args.dropout,
        "target_modules": args.target_modules, "steps": args.steps, "learning_rate": args.learning_rate,
        "batch_size": args.batch_size, "top_layers": args.top_layers, "seed": args.seed,
        "adapter_name": args.adapter_name,
        "teacher_url": args.teacher_url, "teacher_model": args.teacher_model,
    }
    st = Stage("distill", local_path(args.out, "--out"), {"clusters": args.clusters, "base_model": str(base)}, params,
               summary_metrics=("mode", "train_pairs", "holdout_cluster", "holdout_outside", "steps",
                                "resumed_from_step", "loss_first", "loss_last", "seconds_per_step"))
    if st.done():
        return st.finish_skipped()
    cdir = local_path(args.clusters, "--clusters")
    report = json.loads((cdir / "clusters.json").read_text())
    rows = read_jsonl(cdir / "failures.jsonl")
    top = report["top_clusters"][: args.top_clusters]
    if not top:
        raise StageError(f"--clusters: {cdir} has no clusters to distill")

    with st.timed("teacher"):
        missing = [r for r in rows if not r.get("teacher_response")]
        if missing and args.teacher_url:
            key = os.environ.get(args.teacher_api_key_env) if args.teacher_api_key_env else None
            for r, a in zip(missing, ask_teacher(args.teacher_url, args.teacher_model, args.system_prompt,
                                                 [r["query"] for r in missing], key)):
                r["teacher_response"] = a
    held_cluster, held_outside = split_holdout(rows, top, args.hold_out_fraction, args.outside_holdout, args.seed)
    train = training_rows(rows, top, held_cluster | held_outside, args.mode, args.samples_per_cluster, args.seed)
    if not train:
        raise StageError("--clusters: no training pairs (the log has no teacher answers for the top clusters and "
                         "no --teacher-url was given)")
    holdout = [{"request_id": r["request_id"], "query": r["query"], "target": r["teacher_response"],
                "cluster": r["cluster"] if r["request_id"] in held_cluster else None}
               for r in rows if r["request_id"] in (held_cluster | held_outside) and r.get("teacher_response")]
    st.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(st.output("train", "train.jsonl"),
                [{"request_id": r["request_id"], "query": r["query"], "target": r["teacher_response"],
                  "cluster": r["cluster"]} for r in train])
    write_jsonl(st.output("holdout", "holdout.jsonl"), holdout)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    examples = [encode_pair(tok, args.system_prompt, r["query"], r["teacher_response"]) for r in train]
    with st.timed("train"):
        m = train_lora(base, examples, st.out_dir, r=args.r, alpha=args.alpha, dropout=args.dropout,
                       target_modules=args.target_modules, steps=args.steps, learning_rate=args.learning_rate,
                       batch_size=args.batch_size, seed=args.seed, key=st.key, top_layers=args.top_layers,
                       checkpoint_every=args.checkpoint_every,
                       on_step=on_step, progress=not args.quiet)
    st.output("adapter", "adapter")
    write_json_atomic(st.out_dir / "adapter.json", {"name": args.adapter_name, "base_model": str(base),
                                                   "system_prompt": args.system_prompt, "top_clusters": top})
    st.output("adapter_info", "adapter.json")
    st.metrics.update(mode=args.mode, top_clusters=top, train_pairs=len(train),
                      holdout_cluster=sum(1 for h in holdout if h["cluster"] is not None),
                      holdout_outside=sum(1 for h in holdout if h["cluster"] is None), adapter_name=args.adapter_name,
                      **m)
    return st.finish()


def add_lora_arguments(p: argparse.ArgumentParser) -> None:
    """The DistillationCampaign's `spec.lora` fields, as flags (camelCase field -> --kebab-case flag)."""
    p.add_argument("--r", type=int, default=16, help="LoRA rank (spec.lora.r)")
    p.add_argument("--alpha", type=int, default=32, help="LoRA alpha (spec.lora.alpha)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (spec.lora.dropout)")
    p.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"], help="spec.lora.targetModules")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (spec.lora.steps)")
    p.add_argument("--learning-rate", type=float, default=2e-4, help="peak learning rate (spec.lora.learningRate)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (spec.lora.batchSize)")
    p.add_argument("--samples-per-cluster", type=int, default=200, help="spec.lora.samplesPerCluster")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="routenlp train distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--clusters", required=True, help="output directory of `routenlp train cluster`")
    p.add_argument("--out", required=True, help="output directory (adapter/, train/holdout JSONL, manifest.json)")
    p.add_argument("--base-model", default="smollm2-135m", help="student model folder or tiny-model name")
    p.add_argument("--adapter-name", default="distilled", help="name the adapter is served under")
    p.add_argument("--mode", choices=("targeted", "untargeted"), default="targeted")
    p.add_argument("--top-clusters", type=int, default=5, help="spec.clustering.topClusters")
    p.add_argument("--hold-out-fraction", type=float, default=0.2, help="spec.evaluation.holdOutFraction")
    p.add_argument("--outside-holdout", type=int, default=100, help="queries outside the clusters held out")
    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="system message the student is sent")
    p.add_argument("--teacher-url", help="teacher's OpenAI-compatible base URL (…/v1) for queries without answers")
    p.add_argument("--teacher-model", default="teacher", help="model name sent to the teacher")
    p.add_argument("--teacher-api-key-env", help="environment variable holding the teacher's API key")
    p.add_argument("--checkpoint-every", type=int, default=25, help="steps between training checkpoints")
    p.add_argument("--top-layers", type=int, default=0,
                   help="put adapters on the top N transformer layers only (0: all); cheaper steps on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_lora_arguments(p)
    args = p.parse_args(argv)
    for name in ("r", "alpha", "steps", "batch_size", "samples_per_cluster", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise StageError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if not 0 < args.hold_out_fraction < 1:
        raise StageError(f"--hold-out-fraction: must be between 0 and 1, got {args.hold_out_fraction}")
    print_summary(run(args))
    return 0
