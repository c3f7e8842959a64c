"""The OFFSIDE probe application on Ray Serve: an HTTP ingress (FastAPI: auth, input checks, the
OpenAI-compatible and probe routes) in front of a probe deployment that multiplexes the registered
models (LRU, `max_models_per_replica`) and answers batches of requests with dynamic batching.

`build(args)` is the app builder `serve run serve/config.yaml` calls with the YAML's `args:`."""


import asyncio
import dataclasses
import functools
import hmac
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import ray
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import completions
from serve.batcher import Batcher
from serve.chat import GenerateJob, ScoreJob
from serve.inputs import (
    IMAGE_ID, ApiError, AttackRequest, ChatRequest, CompletionRequest, ProbeRequest, chat_decoding, chat_max_tokens,
    chat_turns, check_max_tokens, check_model, check_options, check_text, completion_decoding, completion_max_tokens,
    completion_prompts, decode_image, strict_json,
)
from serve.runner import Job, ModelPool, runner_for
from serve.settings import (
    MAX_ONGOING_REQUESTS, ServeSettings, load_settings, read_token, registry, replica_gpus, replica_range, settings_dict,
    tokenizer_dir,
)

logger = logging.getLogger("ray.serve")  # a replica's log file (serve/README.md: logs)
RETRY_AFTER_S = 5
# A replica that died or is restarting, or a full queue: retryable, answered 503 with Retry-After.
UNAVAILABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, serve.exceptions.BackPressureError,
               serve.exceptions.DeploymentUnavailableError, serve.exceptions.ReplicaUnavailableError)


class StrictJSONRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            self._json = strict_json(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes whose JSON bodies are parsed as the standard defines JSON (no NaN or Infinity)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict(request: Request):
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


api = FastAPI(
    title="OFFSIDE probe",
    description="Probe and attack unlearned vision-language models. Every route but /healthz needs "
                "`Authorization: Bearer <token>` when the server has a token.",
)
api.router.route_class = StrictJSONRoute
bearer = HTTPBearer(auto_error=False)
HEALTH_TIMEOUT_S = 5.0


def authorised(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    """A dependency, so it runs before the body is validated: without the token nothing is revealed.
    The token is set on the app by the ingress replica (an app without it fails closed)."""
    token = request.app.state.token
    if token is None:
        return
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)", "authentication_error")
    if not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
        raise ApiError(401, "invalid bearer token", "authentication_error")


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers)


def failure(err: Exception) -> tuple[int, str, str]:
    """(status, message, type) of an error met while answering, without internals: a replica that died
    or is restarting is retryable (503, with Retry-After), anything else a bug (500). Logged here."""
    if isinstance(err, UNAVAILABLE):
        logger.warning("answering failed, the client may retry: %r", err)
        return 503, f"the model server is restarting or busy: retry in {RETRY_AFTER_S} s", "unavailable"
    logger.error("answering failed", exc_info=err)
    return 500, "internal error (logged on the server)", "server_error"


class BodyLimit:
    """Refuses request bodies over `limits.max_body_bytes` with a 413: a declared length before anything
    is read, and every body (chunked too) by counting its bytes as they stream in. Also the one place
    every `receive` passes: a client that went away is an ASGI disconnect there."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = scope["app"].state.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"0").decode("latin-1")
        if not declared.isdigit() or int(declared) > limit:
            return await _error(413, f"request body: {declared} bytes, limit {limit}", "invalid_request_error")(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            try:
                message = await receive()
            except ray.exceptions.TaskCancelledError:
                # Serve's proxy cancels its side when the client goes away; Serve passes that on as an
                # error (only a missing request is a disconnect there), which a streaming response's
                # disconnect listener raised out of a task nobody awaits. It is a disconnect: say so.
                return {"type": "http.disconnect"}
            received += len(message.get("body", b""))
            if received > limit:
                # FastAPI re-raises HTTP exceptions from reading the body; the handler below answers them
                raise StarletteHTTPException(413, f"request body: over the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)


api.add_middleware(BodyLimit)


@api.exception_handler(ApiError)
async def _api_error(_request, err: ApiError):
    return _error(err.status, err.message, err.kind)


@api.exception_handler(RequestValidationError)
async def _invalid(_request, err: RequestValidationError):
    first = err.errors()[0]
    if first.get("type") == "json_invalid":
        reason, position = first.get("ctx", {}).get("error", "invalid"), first["loc"][-1]
        at = f" (at character {position})" if isinstance(position, int) and position >= 0 else ""
        return _error(400, f"body: not valid JSON: {reason}{at}", "invalid_request_error")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    message = "unknown or unsupported field (see serve/README.md)" if first.get("type") == "extra_forbidden" \
        else first.get("msg", "invalid")
    return _error(400, f"{where}: {message}", "invalid_request_error")


@api.exception_handler(StarletteHTTPException)
async def _http(_request, err: StarletteHTTPException):
    return _error(err.status_code, str(err.detail), "invalid_request_error")


@api.exception_handler(Exception)
async def _unexpected(_request, err: Exception):
    status, message, kind = failure(err)
    return _error(status, message, kind, {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None)


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS)
class Probe:
    """Loads each base once per replica; adapters and full models come and go through the LRU cache."""

    def __init__(self, settings: dict):
        import torch

        self.settings = load_settings(settings)
        torch.set_num_threads(self.settings.torch_threads)
        self.pool = ModelPool(registry(self.settings), self.settings.dtype, self.settings.device)
        # A plain function, not a bound method: Serve keeps the cache as an attribute of what it wraps.
        self.get_model = serve.multiplexed(max_num_models_per_replica=self.settings.max_models_per_replica)(self._loader())
        batch_size = self.settings.max_batch_size if self.settings.batching else 1
        self.batcher = Batcher(self.answer_batch, batch_size, self.settings.batch_wait_timeout_s)
        self.lock = asyncio.Lock()  # one batch uses the models at a time (loads may evict)
        # Model work runs on this one thread, so the event loop keeps taking requests (and health checks)
        # while a batch computes, and at most one batch computes at a time.
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="probe-compute")
        self.loads = 0

    async def _computed(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.compute, functools.partial(fn, *args, **kwargs))

    def _loader(self):
        async def load(model_id: str):
            self.loads += 1
            return await self._computed(self.pool.load, model_id)

        return load

    async def answer(self, job: Job | GenerateJob | ScoreJob) -> dict:
        return await self.batcher.submit(job)

    async def stream(self, job: GenerateJob):
        """Yields the job's new text (with its log-probabilities) as its batch generates it — the steps
        that came while the reader was busy merged into one event — then its whole answer. A reader that
        goes away cancels this generator: the job leaves the queue, or its row stops generating."""
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job.emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        answer = asyncio.ensure_future(self.batcher.submit(job))
        # Emitted events reach the loop before the batch's end resolves `answer`, so None comes last.
        answer.add_done_callback(lambda _: events.put_nowait(None))
        try:
            ended = False
            while not ended:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                deltas = [e for e in batch if e is not None]
                ended = len(deltas) < len(batch)
                if deltas:
                    yield completions.merged(deltas)
            yield await answer
        finally:
            job.cancelled = True  # read by the compute thread at its next step; no effect once the row ended
            answer.cancel()

    async def answer_batch(self, jobs: list[Job | GenerateJob | ScoreJob]) -> list[dict]:
        async with self.lock:
            results: list[dict] = [{}] * len(jobs)
            names = list(dict.fromkeys(j.model for j in jobs))
            capacity = self.settings.max_models_per_replica
            # Load at most `capacity` distinct models per pass: each load may evict the least recently
            # used model, never one loaded in the same pass.
            for start in range(0, len(names), capacity):
                chunk = set(names[start:start + capacity])
                loaded = {name: await self.get_model(name) for name in chunk}
                picked = [i for i, j in enumerate(jobs) if j.model in chunk]
                answers = await self._computed(self.pool.run, [jobs[i] for i in picked], loaded)
                for i, answer in zip(picked, answers):
                    results[i] = answer
            return results

    async def attack(self, model: str, row: dict, names: list[str] | None, max_new_tokens: int) -> list[dict]:
        """Runs the registered prompt attacks (offside.eval.attacks) on one benchmark row."""
        from offside.eval.attacks import run_attacks

        async with self.lock:
            runner, processor = runner_for(await self.get_model(model))
            return await self._computed(run_attacks, runner, processor, [row], names, max_new_tokens=max_new_tokens)

    async def ping(self) -> bool:
        return True

    async def stats(self, reset: bool = False) -> dict:
        """Model loads so far, and the batch sizes since the last reset."""
        sizes = self.batcher.sizes
        if reset:
            self.batcher.sizes = []
        return {"loads": self.loads, "batches": len(sizes), "mean_batch_size": sum(sizes) / max(1, len(sizes))}


@serve.deployment(max_ongoing_requests=512)
@serve.ingress(api)
class Ingress:
    def __init__(self, probe: DeploymentHandle, settings: dict):
        self.probe = probe
        self.settings: ServeSettings = load_settings(settings)
        self.limits = self.settings.limits
        self.models = registry(self.settings, download=False)  # names and kinds only: the replicas download
        api.state.token = read_token(self.settings.token_file)
        api.state.max_body_bytes = self.limits.max_body_bytes
        self._bench = None
        self._tokenizers: dict[str, object] = {}

    async def _ask(self, job: Job | GenerateJob | ScoreJob) -> dict:
        return await self.probe.options(multiplexed_model_id=job.model).answer.remote(job)

    async def _stream(self, job: GenerateJob) -> AsyncIterator[dict]:
        """The job's events from a probe replica as they are generated; closing this cancels the replica's."""
        events = self.probe.options(multiplexed_model_id=job.model, stream=True).stream.remote(job)
        finished = False
        try:
            async for event in events:
                yield event
            finished = True
        finally:
            if not finished:
                events.cancel()

    def _tokenizer(self, model: str):
        """The model's tokenizer (the ingress counts and checks prompt tokens before any model work)."""
        from transformers import AutoTokenizer

        where = tokenizer_dir(self.models[model])
        if where not in self._tokenizers:
            self._tokenizers[where] = AutoTokenizer.from_pretrained(where)
        return self._tokenizers[where]

    def _benchmark(self):
        """(images by image id, forget rows by id) of the configured benchmark, loaded on first use."""
        if self.settings.data is None:
            raise ApiError(400, "this server has no benchmark (`data` in its config): send the image itself")
        if self._bench is None:
            from offside.data.loader import load_benchmark
            from offside.data.rows import materialise

            bench = load_benchmark(self.settings.data)
            rows = {split: materialise(bench[split]) for split in bench}
            images = {r["image_id"]: r["image"] for split in rows.values() for r in split if r.get("image") is not None}
            self._bench = (images, {r["id"]: r for r in rows.get("forget", [])})
        return self._bench

    def _image(self, body: ProbeRequest):
        if body.image is not None and body.image_id is not None:
            raise ApiError(400, "give either image or image_id, not both")
        if body.image is not None:
            return decode_image(body.image, self.limits)
        if body.image_id is None:
            return None
        if not IMAGE_ID.match(body.image_id):
            raise ApiError(400, "image_id: 1–128 letters, digits, '.', '_' or '-'")
        images, _ = self._benchmark()
        if body.image_id not in images:
            raise ApiError(404, f"image_id {body.image_id!r} is not in the benchmark", "not_found")
        return images[body.image_id]

    @api.get("/healthz")
    async def healthz(self):
        """ok when a probe replica answers within HEALTH_TIMEOUT_S: its event loop is free even while it
        computes a batch (the compute has its own thread), so a slow answer means a wedged replica."""
        try:
            await asyncio.wait_for(self.probe.ping.remote(), HEALTH_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 — timeout or no replica: unhealthy, said without internals
            logger.warning("health check: no probe replica answered: %r", err)
            return JSONResponse({"status": "unavailable"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return {"status": "ok", "models": len(self.models)}

    @api.get("/v1/models")
    async def list_models(self, _auth=Depends(authorised)) -> dict:
        data = [self._card(name) for name in self.models]
        return {"object": "list", "data": data}

    @api.get("/v1/models/{model_id}")
    async def model_card(self, model_id: str, _auth=Depends(authorised)) -> dict:
        return self._card(check_model(model_id, self.models))

    def _card(self, name: str) -> dict:
        return {"id": name, "object": "model", "owned_by": "offside", "kind": "adapter" if self.models[name].base else "full"}

    @api.post("/v1/probe")
    async def probe(self, body: ProbeRequest, _auth=Depends(authorised)) -> dict:
        """One question (+ image or benchmark image id) → the answer; with `options`, the per-option
        log-likelihoods and the chosen option (as `offside eval` scores multiple choice)."""
        model = check_model(body.model, self.models)
        question = check_text(body.question, "question", self.limits.max_prompt_chars)
        options = check_options(body.options, self.limits) if body.options is not None else None
        max_tokens = check_max_tokens(body.max_tokens, self.settings.max_new_tokens, self.limits)
        result = await self._ask(Job(model, question, self._image(body), options, max_tokens))
        if options is None:
            return {"model": model, "answer": result["answer"]}
        return {"model": model, "answer": options[result["choice"]], "choice": result["choice"],
                "options": [{"text": o, "loglik": s} for o, s in zip(options, result["logliks"])]}

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, _auth=Depends(authorised)):
        """OpenAI-compatible chat completion over the whole conversation (system, user and assistant
        turns; images in user turns); greedy unless temperature > 0; `stream` sends server-sent events."""
        model = check_model(body.model, self.models)
        turns = chat_turns(body.messages, self.limits)
        decoding, n = chat_decoding(body)
        max_tokens = chat_max_tokens(body, self.settings.max_new_tokens, self.limits)
        # Choice i samples with seed + i: choice 0 is what n = 1 answers with the same seed.
        jobs = [GenerateJob(model, turns, max_tokens, dataclasses.replace(decoding, seed=decoding.seed + i)) for i in range(n)]
        if not body.stream:
            return completions.completion(model, await asyncio.gather(*(self._ask(job) for job in jobs)))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = completions.interleaved([self._stream(job) for job in jobs])
        return StreamingResponse(completions.stream(model, n, events, include_usage, failure), media_type="text/event-stream")

    @api.post("/v1/completions")
    async def text_completion(self, body: CompletionRequest, _auth=Depends(authorised)) -> dict:
        """OpenAI's (legacy) completions over raw text or token prompts, no chat layout: what evaluation
        harnesses score with (`echo` + `logprobs`: the prompt tokens' log-probabilities)."""
        model = check_model(body.model, self.models)
        decoding, n = completion_decoding(body)
        max_tokens = completion_max_tokens(body, self.settings.max_new_tokens, self.limits)
        prompts = completion_prompts(body.prompt, self._tokenizer(model), self.limits, n)
        echo = bool(body.echo)
        scored = [ScoreJob(model, ids, decoding.top_logprobs) for ids, _ in prompts] if echo and decoding.top_logprobs is not None else []
        generated = [GenerateJob(model, max_tokens=max_tokens, prompt_ids=ids, decoding=dataclasses.replace(decoding, seed=decoding.seed + i))
                     for ids, _ in prompts for i in range(n)] if max_tokens else []
        answers = await asyncio.gather(*(self._ask(job) for job in scored + generated))
        return completions.text_completion(model, prompts, n, echo, answers[:len(scored)], answers[len(scored):])

    @api.post("/v1/attacks")
    async def attacks(self, body: AttackRequest, _auth=Depends(authorised)) -> dict:
        """Runs the registered prompt and image attacks that need no gradients (or the chosen ones) on
        one forget item of the benchmark against one model: per attack, the answer and whether the
        rumour came back."""
        from offside.eval.attacks import ATTACKS, WHITE_BOX_ATTACKS

        model = check_model(body.model, self.models)
        servable = [name for name in ATTACKS if name not in WHITE_BOX_ATTACKS]
        if body.attacks is not None:
            unknown = [n[:40] for n in body.attacks if n not in servable]
            if unknown or not body.attacks or len(set(body.attacks)) != len(body.attacks):
                raise ApiError(400, f"attacks: distinct names of {', '.join(servable)} (white-box attacks need "
                                    f"`offside eval`); unknown: {unknown[:5]}")
        _, forget = self._benchmark()
        if body.item_id not in forget:
            shown = body.item_id[:80]
            raise ApiError(404, f"item_id {shown!r} is not a forget item of the benchmark (e.g. {next(iter(forget), '')!r})",
                           "not_found")
        row = forget[body.item_id]
        records = await self.probe.options(multiplexed_model_id=model).attack.remote(
            model, row, body.attacks or servable, self.settings.max_new_tokens)
        return {"model": model, "item_id": row["id"], "form": row["form"], "modality": row["modality"],
                "results": [{k: r[k] for k in ("attack", "answer", "chosen", "rumour_recovered")} for r in records]}


def build(args: dict) -> serve.Application:
    """App builder for `serve run serve/config.yaml` (and `offside serve`): args as in ServeSettings."""
    settings = load_settings(args)
    plain = settings_dict(settings)
    gpus = replica_gpus(settings, ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else torch.cuda.device_count())
    probe = Probe.options(**replica_options(settings),
                          ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": gpus})
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(probe.bind(plain), plain)


def replica_options(settings: ServeSettings) -> dict:
    """A fixed replica count, or Serve's autoscaling between min_replicas and max_replicas."""
    low, high = replica_range(settings)
    if low == high:
        return {"num_replicas": settings.num_replicas}
    return {"autoscaling_config": {"min_replicas": low, "max_replicas": high, "initial_replicas": settings.num_replicas,
                                   "target_ongoing_requests": settings.target_ongoing_requests}}
