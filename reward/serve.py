"""An HTTP server that scores text with a trained reward model, for OpenRLHF, verl and anything else.

    rlhf serve-rm --model runs/rm-1 [--host 127.0.0.1] [--port 5000] [--batch-size 32]
    # then, in OpenRLHF:  --remote_rm_url http://127.0.0.1:5000/get_reward

    server = RewardServer(load_reward_model("runs/rm-1"), ServeSpec(port=0)).start()   # in a thread
    ...; server.url; server.stop()

Endpoints (JSON in, JSON out; every error is `{"error": message}` with a 4xx/5xx status):

- `POST /get_reward`: OpenRLHF's remote reward-model protocol (openrlhf/cli/serve_rm.py and the
  client in openrlhf/utils/remote_rm_utils.py). Request `{"query": [str], "prompts": [str] | null,
  "labels": [any] | null}`; answer `{"rewards": [float], "scores": [float], "extra_logs": {...}}`,
  where `scores` equals `rewards` (OpenRLHF reads `rewards` for the advantage and `scores` for
  dynamic filtering) and `extra_logs` holds per-query lists OpenRLHF logs (`reward_spread` for an
  ensemble, nothing for a single model). Labels are accepted and ignored: a learned reward model
  has no use for a reference answer.
  Each `query` is the prompt and the response as one text. Where `prompts[i]` is given and
  `query[i]` starts with it, the prompt is `prompts[i]` and the response the rest of the query;
  otherwise the whole query is scored as the response to an empty prompt. The text is scored as
  sent, chat-template markup and end-of-sequence markers included.
- `POST /score`: `{"pairs": [{"prompt": str | [{"role", "content"}], "response": str}]}` answers
  `{"rewards": [float]}`, plus `"spread": [float]` (the members' standard deviation) for an ensemble.
- `GET /health`: `{"ready": true, "model": path, "base": base model, "ensemble": bool, ...}`.

Requests that arrive while the model is busy are scored together in the next scorer call (in
batches of `batch_size`), so many clients sending one query each (OpenRLHF's vLLM executor sends
one per sample) still fill batches. Bodies over `max_body_bytes` are refused with 413 before they
are read in full, and so are requests with more than `max_request_pairs` texts. A failure inside
the server is logged here with its traceback and answered with a 500 that carries none.

Starlette and uvicorn (both already Streamlit dependencies) are imported only when a server is
built: `rlhf` reads ServeSpec for its options, and `rlhf --help` should stay quick.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from reward.errors import RewardError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeSpec:
    """How the reward server listens and what it accepts. The CLI's options are read from these fields."""

    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on; loopback unless told otherwise (there is no authentication)."})
    port: int = field(default=5000, metadata={"help": "TCP port; 0 picks a free one (printed when ready)."})
    batch_size: int = field(default=32, metadata={"help": "Pairs per forward pass of the reward model."})
    max_request_pairs: int = field(default=16384, metadata={"help": "Most texts one request may carry; more is refused with 413."})
    max_body_bytes: int = field(default=64 * 2**20, metadata={"help": "Largest request body in bytes; larger is refused with 413."})
    log_level: str = field(default="info", metadata={"help": "uvicorn's log level: critical, error, warning, info, debug."})

    def validate(self) -> "ServeSpec":
        if not self.host:
            raise RewardError("--host is empty; expected an address such as 127.0.0.1 or 0.0.0.0")
        if not 0 <= self.port <= 65535:
            raise RewardError(f"--port {self.port}: expected 0..65535 (0 picks a free port)")
        for name in ("batch_size", "max_request_pairs", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise RewardError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected a positive integer")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise RewardError(f"log_level {self.log_level!r}: expected critical, error, warning, info or debug")
        return self

    @staticmethod
    def help(name: str) -> str:
        return next(f.metadata["help"] for f in dataclasses.fields(ServeSpec) if f.name == name)


class Refused(Exception):
    """A request the server will not score; `status` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---- request parsing: pure functions, no HTTP ------------------------------------------------------

def parse_json(body: bytes) -> dict:
    if not body.strip():
        raise Refused(400, "empty request body; expected a JSON object")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise Refused(400, "request body is not UTF-8 text; expected a JSON object") from None
    except json.JSONDecodeError as exc:
        raise Refused(400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, dict):
        raise Refused(400, f"request body is {_kind(data)}; expected a JSON object")
    return data


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _string_list(data: dict, name: str, what: str, required: bool) -> list[str] | None:
    value = data.get(name)
    if value is None:
        if required:
            raise Refused(400, f"missing field '{name}': expected a list of {what}")
        return None
    if not isinstance(value, list):
        raise Refused(400, f"'{name}' is {_kind(value)}; expected a list of {what}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise Refused(400, f"'{name}[{i}]' is {_kind(item)}; expected a string")
    return value


def _check_count(n: int, max_pairs: int, name: str) -> None:
    if n > max_pairs:
        raise Refused(413, f"'{name}' has {n} entries; this server takes at most {max_pairs} per request "
                           "(split the request, or restart it with a larger --max-request-pairs)")


def split_queries(queries: Sequence[str], prompts: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """OpenRLHF sends prompt+response as one text: the prompt where the query starts with it, else ''."""
    out_prompts, responses = [], []
    for i, query in enumerate(queries):
        prompt = prompts[i] if prompts is not None else ""
        if prompt and query.startswith(prompt):
            out_prompts.append(prompt)
            responses.append(query[len(prompt):])
        else:
            out_prompts.append("")
            responses.append(query)
    return out_prompts, responses


def parse_get_reward(data: dict, max_pairs: int) -> tuple[list[str], list[str]]:
    """(prompts, responses) from an OpenRLHF /get_reward request."""
    if "query" not in data and "queries" in data:
        raise Refused(400, "missing field 'query' (singular, as OpenRLHF sends it); got 'queries'")
    queries = _string_list(data, "query", "prompt+response strings", required=True)
    _check_count(len(queries), max_pairs, "query")
    prompts = _string_list(data, "prompts", "prompt strings (or null)", required=False)
    labels = data.get("labels")
    if labels is not None and not isinstance(labels, list):
        raise Refused(400, f"'labels' is {_kind(labels)}; expected a list (one label per query) or null")
    for name, values in (("prompts", prompts), ("labels", labels)):
        if values is not None and len(values) != len(queries):
            raise Refused(400, f"'{name}' has {len(values)} entries but 'query' has {len(queries)}; expected one per query")
    return split_queries(queries, prompts)


def _prompt(value: Any, where: str) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        for j, msg in enumerate(value):
            if not (isinstance(msg, dict) and isinstance(msg.get("role"), str) and isinstance(msg.get("content"), str)):
                raise Refused(400, f"{where}.prompt[{j}] is not a {{\"role\": str, \"content\": str}} message")
        return value
    raise Refused(400, f"{where}.prompt is {_kind(value)}; expected a string or a non-empty list of chat messages")


def parse_score(data: dict, max_pairs: int) -> tuple[list[Any], list[str]]:
    """(prompts, responses) from a /score request."""
    pairs = data.get("pairs")
    if pairs is None:
        raise Refused(400, "missing field 'pairs': expected a list of {\"prompt\": ..., \"response\": ...} objects")
    if not isinstance(pairs, list):
        raise Refused(400, f"'pairs' is {_kind(pairs)}; expected a list of {{\"prompt\", \"response\"}} objects")
    _check_count(len(pairs), max_pairs, "pairs")
    prompts, responses = [], []
    for i, pair in enumerate(pairs):
        where = f"pairs[{i}]"
        if not isinstance(pair, dict):
            raise Refused(400, f"{where} is {_kind(pair)}; expected an object with 'prompt' and 'response'")
        for key in ("prompt", "response"):
            if key not in pair:
                raise Refused(400, f"{where}: missing '{key}'")
        if not isinstance(pair["response"], str):
            raise Refused(400, f"{where}.response is {_kind(pair['response'])}; expected a string")
        prompts.append(_prompt(pair["prompt"], where))
        responses.append(pair["response"])
    return prompts, responses


# ---- scoring: requests that wait while the model is busy share the next scorer call --------------

class Batcher:
    """One scoring loop per server: it takes every request waiting, scores them in one scorer call (in
    batches of `batch_size`) on a worker thread, and hands each request its slice of the scores."""

    def __init__(self, scorer, batch_size: int):
        self.scorer = scorer
        self.batch_size = batch_size
        self._pending: list = []
        self._wake = None
        self._task = None

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for _, _, fut in self._pending:
            if not fut.done():
                fut.set_exception(RuntimeError("server shutting down"))

    async def score(self, prompts: list, responses: list[str]) -> tuple[list[float], list[float]]:
        if not prompts:
            return [], []
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((prompts, responses, fut))
        self._wake.set()
        return await fut

    def _score_all(self, prompts: list, responses: list[str]) -> tuple[list[float], list[float]]:
        mean, spread = self.scorer.score_with_spread(prompts, responses, self.batch_size)
        return mean.tolist(), spread.tolist()

    async def _loop(self) -> None:
        from starlette.concurrency import run_in_threadpool

        while True:
            await self._wake.wait()
            self._wake.clear()
            taken, self._pending = self._pending, []
            if not taken:
                continue
            prompts = [p for ps, _, _ in taken for p in ps]
            responses = [r for _, rs, _ in taken for r in rs]
            try:
                mean, spread = await run_in_threadpool(self._score_all, prompts, responses)
            except Exception as exc:  # noqa: BLE001 - each waiting request answers it
                for _, _, fut in taken:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            start = 0
            for ps, _, fut in taken:
                if not fut.done():  # the client may have gone
                    fut.set_result((mean[start:start + len(ps)], spread[start:start + len(ps)]))
                start += len(ps)


def model_info(scorer) -> dict:
    """What /health says about the model: its path, base model and kind."""
    members = getattr(scorer, "members", None)
    first = members[0] if members else scorer
    config = getattr(first, "config", {}) or {}
    return {"model": str(getattr(scorer, "path", "")), "base": config.get("base"),
            "ensemble": members is not None, "members": len(members) if members else 1,
            "max_length": config.get("max_length")}


# ---- the app ---------------------------------------------------------------------------------------

def build_app(scorer, spec: ServeSpec):
    """The Starlette app: /get_reward, /score and /health over one scorer."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    batcher = Batcher(scorer, spec.batch_size)
    info = model_info(scorer)
    ensemble = info["ensemble"]

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                too_big = int(declared) > spec.max_body_bytes
            except ValueError:
                raise Refused(400, f"Content-Length {declared!r} is not a number") from None
            if too_big:
                raise Refused(413, f"request body of {declared} bytes is over this server's limit of "
                                   f"{spec.max_body_bytes} (--max-body-bytes)")
        body = bytearray()
        async for chunk in request.stream():  # a chunked body has no Content-Length: count as it comes
            body += chunk
            if len(body) > spec.max_body_bytes:
                raise Refused(413, f"request body is over this server's limit of {spec.max_body_bytes} bytes "
                                   "(--max-body-bytes)")
        return parse_json(bytes(body))

    async def get_reward(request: Request):
        prompts, responses = parse_get_reward(await read_json(request), spec.max_request_pairs)
        rewards, spread = await batcher.score(prompts, responses)
        return JSONResponse({"rewards": rewards, "scores": rewards,
                             "extra_logs": {"reward_spread": spread} if ensemble else {}})

    async def score(request: Request):
        prompts, responses = parse_score(await read_json(request), spec.max_request_pairs)
        rewards, spread = await batcher.score(prompts, responses)
        return JSONResponse({"rewards": rewards, **({"spread": spread} if ensemble else {})})

    async def health(request: Request):
        return JSONResponse({"ready": True, **info, "batch_size": spec.batch_size,
                             "max_request_pairs": spec.max_request_pairs, "max_body_bytes": spec.max_body_bytes})

    async def refused(request: Request, exc: Refused):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            message = f"no endpoint {request.url.path}; this server has POST /get_reward, POST /score and GET /health"
        elif exc.status_code == 405:
            message = f"{request.method} {request.url.path} is not allowed; use {exc.headers.get('Allow', '') if exc.headers else ''}"
        else:
            message = str(exc.detail)
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    async def reward_error(request: Request, exc: RewardError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    async def disconnected(request: Request, exc: ClientDisconnect):
        return JSONResponse({"error": "client disconnected"}, status_code=400)

    async def internal(request: Request, exc: Exception):
        # Starlette re-raises after this answer, and uvicorn logs the traceback here, server-side.
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server log has the details"},
                            status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    return Starlette(
        routes=[Route("/get_reward", get_reward, methods=["POST"]), Route("/score", score, methods=["POST"]),
                Route("/health", health, methods=["GET"])],
        exception_handlers={Refused: refused, HTTPException: http_error, RewardError: reward_error,
                            ClientDisconnect: disconnected, Exception: internal},
        lifespan=lifespan,
    )


class RewardServer:
    """uvicorn serving build_app: `run()` blocks (the CLI; Ctrl-C or SIGTERM stop it cleanly),
    `start()` serves from a thread until `stop()` (tests, benchmarks)."""

    def __init__(self, scorer, spec: ServeSpec):
        self.spec = spec.validate()
        self.app = build_app(scorer, spec)
        self._server = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        host = self.spec.host if self.spec.host not in ("0.0.0.0", "::") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def _make(self, on_ready: Callable[["RewardServer"], None] | None):
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):
            async def startup(self, sockets=None):
                await super().startup(sockets)
                if self.started:
                    outer.port = self.servers[0].sockets[0].getsockname()[1]
                    if on_ready is not None:
                        on_ready(outer)

        config = uvicorn.Config(self.app, host=self.spec.host, port=self.spec.port, log_level=self.spec.log_level,
                                access_log=self.spec.log_level in ("debug", "trace"), lifespan="on",
                                timeout_graceful_shutdown=10)
        self._server = _Server(config)
        return self._server

    def run(self, on_ready: Callable[["RewardServer"], None] | None = None) -> None:
        import signal

        server = self._make(on_ready)
        # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the handler
        # it found; a no-op one makes a stopped server a normal return (exit code 0), not a kill.
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind or the app's startup fails
            pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not server.started:
            raise RewardError(f"could not listen on {self.spec.host}:{self.spec.port} (in use, or not an address "
                              "of this machine?); the log above says why")

    def start(self, timeout: float = 30.0) -> "RewardServer":
        ready = threading.Event()
        server = self._make(lambda _: ready.set())

        def run() -> None:
            try:
                server.run()
            except SystemExit:  # uvicorn's answer to a port it cannot bind; start() reports it
                pass

        self._thread = threading.Thread(target=run, name="reward-server", daemon=True)
        self._thread.start()
        while not ready.wait(0.05):
            if not self._thread.is_alive() or timeout <= 0:
                self.stop()
                raise RewardError(f"reward server did not start on {self.spec.host}:{self.spec.port}")
            timeout -= 0.05
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RewardError("reward server thread did not stop")
            self._thread = None

    def __enter__(self) -> "RewardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
