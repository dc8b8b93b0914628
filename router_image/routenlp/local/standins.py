"""Stand-in tiers: small OpenAI-compatible servers for tiers that cannot run on this machine.

- `banking77-oracle`: an ORACLE-QUALITY STAND-IN FOR A FRONTIER MODEL. It answers BANKING77 queries with their gold
  intent label (it looks the query up in the data set). No frontier model runs here; this is what a perfect reference
  tier would answer, and it is named as such wherever it appears (model listing, response header, logs, demo).
- `banking77-classifier`: an encoder-classifier tier (the paper's cheapest tier kind): all-MiniLM-L6-v2 embeddings
  (the router's own `Encoder`) + a logistic regression trained on the BANKING77 train split. It answers with the
  most likely label and OpenAI-style `logprobs` (the label as one token, `top_logprobs` = the next likely labels), so
  the router's confidence code treats it like any tier.

Both report OpenAI `usage` (approximate token counts, `banking77.approx_tokens`) so the router prices them like any
other tier. How a ModelTier asks for one (local runtime only): an external tier whose `baseUrl` is a loopback URL and
the annotation

    metadata.annotations["routenlp.io/local-standin"] = "banking77-oracle"   # or banking77-classifier

`routenlp up` starts the stand-in on that port; a cluster has no such process, so such tiers are local-only.
Run one by hand: `python -m routenlp.local.standins banking77-classifier --port 8101` (`--prepare`: only train and
cache the classifier's weights, as set-up does).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from aiohttp import web

from . import banking77 as b77

ANNOTATION = "routenlp.io/local-standin"
ORACLE = "banking77-oracle"
CLASSIFIER = "banking77-classifier"
KINDS = {
    ORACLE: "oracle-quality stand-in for a frontier model (answers BANKING77 queries with the gold label)",
    CLASSIFIER: "encoder-classifier tier: all-MiniLM-L6-v2 embeddings + logistic regression on BANKING77 train",
}
TOP_LOGPROBS_MAX = 20
MAX_BODY = 1 << 20
REQUESTS = web.AppKey("requests", int)  # answered requests (tests read it)


class UnknownQuery(LookupError):
    pass


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


# --------------------------------------------------------------------------------------------------- answer models
class OracleModel:
    """Gold label of any BANKING77 query (train or test): an oracle-quality stand-in for a frontier model."""

    kind = ORACLE
    description = KINDS[ORACLE]

    def __init__(self, folder: str | None = None):
        self.gold = {_norm(e.text): e.label for split in ("train", "test") for e in b77.load_split(split, folder)}

    def answer(self, query: str) -> list[tuple[str, float]]:
        label = self.gold.get(_norm(query))
        if label is None:
            raise UnknownQuery(
                "the banking77-oracle stand-in only knows BANKING77 queries (it answers with their gold label); "
                "send a query from the data set as the last user message"
            )
        return [(label, 0.0)]  # (label, logprob): certain


class ClassifierModel:
    """all-MiniLM-L6-v2 + multinomial logistic regression; weights cached beside the converted models."""

    kind = CLASSIFIER
    description = KINDS[CLASSIFIER]

    def __init__(self, encoder=None, cache_dir: str | os.PathLike | None = None, folder: str | None = None,
                 quiet: bool = False, retrain: bool = False):
        from routenlp.router.encoder import Encoder

        self.encoder = encoder or Encoder()
        self.labels = list(b77.labels(folder))
        t0 = time.monotonic()
        self.coef, self.intercept, trained = load_or_train_classifier(self.encoder, self.labels, cache_dir, folder,
                                                                      quiet, retrain)
        self.trained_seconds = time.monotonic() - t0 if trained else None  # None: weights came from the cache

    def proba(self, texts: list[str]) -> np.ndarray:
        z = self.encoder.encode(texts) @ self.coef.T + self.intercept
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def answer(self, query: str, k: int = 5) -> list[tuple[str, float]]:
        p = self.proba([query])[0]
        top = np.argsort(-p)[: max(1, k)]
        return [(self.labels[i], float(math.log(max(p[i], 1e-300)))) for i in top]


def _classifier_key(encoder, labels: list[str], folder: str | None) -> str:
    """Cache key of the weights: the data, the encoder (folder and variant: its embeddings) and scikit-learn."""
    import sklearn

    h = hashlib.sha256()
    h.update(b77.fingerprint(folder).encode())
    h.update(json.dumps([str(Path(encoder.path).resolve()), str(getattr(encoder, "variant", "")), labels,
                         sklearn.__version__, 1]).encode())
    return h.hexdigest()[:16]


def load_or_train_classifier(encoder, labels: list[str], cache_dir=None, folder=None, quiet=False, retrain=False):
    """(coef (77, 384), intercept (77,), trained?) from the cache, or trained on the train split (1-2 min on 2 cores)
    and cached; `retrain` ignores the cache (a cold start)."""
    from .models import _file_lock, cache_root

    root = cache_root(cache_dir) / "banking77-classifier"
    key = _classifier_key(encoder, labels, folder)
    path = root / f"{key}.npz"
    trained = False
    if retrain or not path.is_file():
        with _file_lock(root / "train.lock"):
            if retrain or not path.is_file():
                trained = True
                from sklearn.linear_model import LogisticRegression

                t0 = time.monotonic()
                train = b77.load_split("train", folder)
                if not quiet:
                    print(f"routenlp: training the banking77-classifier stand-in on {len(train)} queries ...",
                          file=sys.stderr, flush=True)
                x = encoder.encode([e.text for e in train], progress=not quiet)
                idx = {lab: i for i, lab in enumerate(labels)}
                y = np.array([idx[e.label] for e in train])
                clf = LogisticRegression(C=20.0, max_iter=2000).fit(x, y)
                tmp = root / f".{key}.{os.getpid()}.npz"
                np.savez(tmp, coef=clf.coef_.astype(np.float32), intercept=clf.intercept_.astype(np.float32))
                os.replace(tmp, path)  # atomic: readers see the old state or the whole file
                if not quiet:
                    print(f"routenlp: banking77-classifier trained in {time.monotonic() - t0:.0f} s ({path})",
                          file=sys.stderr, flush=True)
    with np.load(path) as z:
        return z["coef"], z["intercept"], trained


def make_model(kind: str, **kw):
    if kind == ORACLE:
        return OracleModel(kw.get("folder"))
    if kind == CLASSIFIER:
        return ClassifierModel(kw.get("encoder"), kw.get("cache_dir"), kw.get("folder"), kw.get("quiet", False),
                               kw.get("retrain", False))
    raise ValueError(f"unknown stand-in {kind!r} (annotation {ANNOTATION} must be one of {', '.join(KINDS)})")


# --------------------------------------------------------------------------------------------- OpenAI wire format
class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code = status, code


def error_body(message: str, code: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": code, "param": None, "code": None}}


def parse_request(body, chat: bool, served_model_name: str) -> dict:
    """Validate an OpenAI (chat) completion request; returns {query, prompt_text, logprobs, top, stream, usage}."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    model = body.get("model")
    if model != served_model_name:
        raise BadRequest(f"The model `{model}` does not exist (this stand-in serves {served_model_name!r}).", 404,
                         "NotFoundError")
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("messages must be a non-empty list")
        query = b77.query_of(msgs)
        prompt_text = " ".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict))
        want = bool(body.get("logprobs", False))
        top = body.get("top_logprobs") or 0
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("prompt must be a non-empty string")
        # the completions API has no roles: the query is the prompt's last non-empty line
        query = [ln for ln in prompt.splitlines() if ln.strip()][-1]
        prompt_text = prompt
        lp = body.get("logprobs")
        want, top = lp is not None and lp is not False, (lp if isinstance(lp, int) and not isinstance(lp, bool) else 0)
    if not query.strip():
        raise BadRequest("the last user message is empty")
    if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= TOP_LOGPROBS_MAX:
        raise BadRequest(f"top_logprobs must be an integer between 0 and {TOP_LOGPROBS_MAX}")
    so = body.get("stream_options") or {}
    return {"query": query, "prompt_text": prompt_text, "logprobs": want, "top": top,
            "stream": bool(body.get("stream", False)), "include_usage": bool(so.get("include_usage"))}


def _lp_entry(token: str, lp: float) -> dict:
    return {"token": token, "logprob": lp, "bytes": list(token.encode())}


def completion_body(answers: list[tuple[str, float]], req: dict, served_model_name: str, chat: bool,
                    request_id: str | None = None, created: int | None = None) -> dict:
    """A complete OpenAI response for the best answer `answers[0]`; the label is one 'token' whose logprob is log p."""
    label, lp = answers[0]
    usage = {"prompt_tokens": b77.approx_tokens(req["prompt_text"]), "completion_tokens": b77.approx_tokens(label)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    rid = request_id or uuid.uuid4().hex
    created = created or int(time.time())
    logprobs = None
    if req["logprobs"]:
        top = answers[: req["top"]]
        if chat:
            logprobs = {"content": [{**_lp_entry(label, lp), "top_logprobs": [_lp_entry(t, v) for t, v in top]}]}
        else:
            logprobs = {"tokens": [label], "token_logprobs": [lp], "top_logprobs": [{t: v for t, v in top}] if top else None,
                        "text_offset": [0]}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": label}, "logprobs": logprobs,
                  "finish_reason": "stop"}
        return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created, "model": served_model_name,
                "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": label, "logprobs": logprobs, "finish_reason": "stop"}
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": served_model_name,
            "choices": [choice], "usage": usage}


def stream_chunks(full: dict, chat: bool, include_usage: bool) -> list[dict]:
    """The same answer as SSE chunks: content (with its logprobs), then finish_reason, then usage if asked."""
    base = {k: full[k] for k in ("id", "created", "model")}
    c = full["choices"][0]
    if chat:
        obj = "chat.completion.chunk"
        first = {"index": 0, "delta": {"role": "assistant", "content": c["message"]["content"]},
                 "logprobs": c["logprobs"], "finish_reason": None}
        last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    else:
        obj = "text_completion"
        first = {"index": 0, "text": c["text"], "logprobs": c["logprobs"], "finish_reason": None}
        last = {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
    chunks = [{**base, "object": obj, "choices": [first]}, {**base, "object": obj, "choices": [last]}]
    if include_usage:
        chunks.append({**base, "object": obj, "choices": [], "usage": full["usage"]})
    return chunks


# ---------------------------------------------------------------------------------------------------- HTTP server
def make_app(model, served_model_name: str) -> web.Application:
    """aiohttp app serving `model` (OracleModel / ClassifierModel) under the OpenAI API."""
    app = web.Application(client_max_size=MAX_BODY)
    app[REQUESTS] = 0
    headers = {"x-routenlp-standin": model.kind}

    async def health(_):
        return web.Response(text="ok", headers=headers)

    async def models(_):
        return web.json_response({"object": "list", "data": [{
            "id": served_model_name, "object": "model", "created": 0, "owned_by": "routenlp-standin",
            "root": model.kind, "description": model.description}]}, headers=headers)

    def handler(chat: bool):
        async def handle(request: web.Request):
            try:
                try:
                    body = await request.json()
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise BadRequest("request body is not valid JSON")
                req = parse_request(body, chat, served_model_name)
                # the classifier encodes on a thread (blocking torch); the oracle is a dict lookup
                answers = await asyncio.get_running_loop().run_in_executor(None, model.answer, req["query"]) \
                    if model.kind == CLASSIFIER else model.answer(req["query"])
            except BadRequest as e:
                return web.json_response(error_body(str(e), e.code), status=e.status, headers=headers)
            except UnknownQuery as e:
                return web.json_response(error_body(str(e)), status=400, headers=headers)
            app[REQUESTS] += 1
            full = completion_body(answers, req, served_model_name, chat)
            if not req["stream"]:
                return web.json_response(full, headers=headers)
            resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for chunk in stream_chunks(full, chat, req["include_usage"]):
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        return handle

    app.router.add_get("/health", health)
    app.router.add_get("/healthz", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", handler(chat=True))
    app.router.add_post("/v1/completions", handler(chat=False))
    return app


async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Start `app` on the running loop; returns (runner, bound port). Stop with `await runner.cleanup()`."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    return runner, bound


class StandinServer:
    """A stand-in served from a background thread (for synchronous callers: tests, the trainer, scripts)."""

    def __init__(self, kind: str, served_model_name: str | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 model=None, **model_kw):
        from .threaded import AppThread

        self.kind = kind
        self.served_model_name = served_model_name or kind
        self.model = model or make_model(kind, **model_kw)
        self._app = AppThread(make_app(self.model, self.served_model_name), host, port, name=kind)

    @property
    def host(self) -> str:
        return self._app.host

    @property
    def port(self) -> int:
        return self._app.port

    @property
    def base_url(self) -> str:
        return f"{self._app.url}/v1"

    def start(self) -> "StandinServer":
        self._app.start()
        return self

    def stop(self) -> None:
        self._app.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m routenlp.local.standins", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=sorted(KINDS))
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8101)
    p.add_argument("--prepare", action="store_true",
                   help="only build what the stand-in needs (the classifier's weights, cached) and exit; set-up runs it")
    args = p.parse_args(argv)
    model = make_model(args.kind)
    if args.prepare:
        trained = getattr(model, "trained_seconds", None)
        print(f"{args.kind}: ready" + (f" (trained in {trained:.0f} s, cached)" if trained is not None else ""))
        return 0
    print(f"{args.kind}: {KINDS[args.kind]}; serving on http://{args.host}:{args.port}/v1", flush=True)
    web.run_app(make_app(model, args.served_model_name or args.kind), host=args.host, port=args.port,
                access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
