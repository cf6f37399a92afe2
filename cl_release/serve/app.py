"""The gateway's FastAPI application: collector endpoints and OpenAI-compatible chat completions.

Collector (error body ``{"error": {"status", "message"}}``):

- ``POST /log``       store one answer; ``route_key`` instead of ``model_version`` records the
                      version the router picks for that key;
- ``POST /feedback``  feedback on a logged answer;
- ``GET /route?key=`` the version to serve for a user or session id;
- ``GET /stats``      the store's totals (``?since=``);
- ``GET /health``     liveness (no token, no data).

OpenAI-compatible (error body ``{"error": {"message", "type", "param", "code"}}``):

- ``POST /v1/chat/completions``: ``model`` is ``champion``, ``challenger``, a served version or
  the project name (the A/B router picks, sticky on ``user`` or ``X-CL-Release-Key``); every
  answer is captured in the feedback store, its request id in the body's ``id`` and the
  ``X-Request-Id`` header, the version in ``X-CL-Release-Version``;
- ``GET /v1/models``: the served versions and the names that reach them.

``GET /openapi.json`` is generated from the pydantic models (:mod:`.models`); chat completions
are :mod:`.chat`'s, error shapes and log lines :mod:`.responses`'. Every request but
``/health`` and ``/openapi.json`` needs ``Authorization: Bearer <token>``; request bodies are JSON
with ``Content-Length`` up to ``serve.max_body_bytes``. Those checks run in :class:`Guard` before
a body is read. A write is answered only once committed (:mod:`.writer`).
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..data.formats import max_example_chars, oversize
from ..errors import ClReleaseError, UserError
from . import models as m
from .backends import Backend
from .chat import chat_completion
from .responses import (
    ApiError,
    client,
    error_body,
    error_response,
    json_response,
    redact,
    say,
    store_error,
    validation_error,
)

OPEN_PATHS = frozenset({"/health", "/openapi.json"})
ROUTES: dict[str, frozenset[str]] = {
    "/health": frozenset({"GET", "HEAD"}), "/openapi.json": frozenset({"GET", "HEAD"}),
    "/route": frozenset({"GET", "HEAD"}), "/stats": frozenset({"GET", "HEAD"}),
    "/log": frozenset({"POST"}), "/feedback": frozenset({"POST"}),
    "/v1/chat/completions": frozenset({"POST"}), "/v1/models": frozenset({"GET", "HEAD"}),
}
ALIASES = ("champion", "challenger")


# ---------------------------------------------------------------- the gateway's state


class Gateway:
    """What the endpoints use: the store's writer, the router, the backend, the token, the limits."""

    def __init__(self, project, *, token: str, conf: dict[str, Any], backend: Backend | None = None,
                 verbose: bool = False):
        from ..decide.abtest import Router
        from ..store.sqlite import FeedbackStore
        from .writer import GroupWriter

        if not token:
            raise UserError("the gateway needs a bearer token", hint="set CL_RELEASE_TOKEN (or serve.token_env)")
        self.project = project
        self.name = project.name
        self.conf = conf
        self.token = token.encode("utf-8")
        self.max_body_bytes = int(conf["max_body_bytes"])
        self.max_example_chars = max_example_chars(project.data)  # the per-example size limit
        self.store = FeedbackStore(project.feedback_path)
        self.writer = GroupWriter(self.store, synchronous=conf["synchronous"])
        self.router = Router(project, recheck_s=float(conf["registry_recheck_s"]))
        self.backend = backend
        self.verbose = verbose
        self.fast_paths = True  # POST endpoints answered by the guard (see POSTS)
        self._entries: tuple[tuple, dict[str, dict]] = ((), {})

    # -- lifecycle (the app's lifespan)

    async def start(self) -> None:
        self.writer.start()
        if self.backend is not None:
            await self.backend.start()

    async def stop(self) -> None:
        if self.backend is not None:
            await self.backend.close()
        self.writer.close()
        self.store.close()

    # -- what serves

    def serving(self) -> dict[str, Any]:
        try:
            return self.router.serving()
        except UserError:
            raise
        except ClReleaseError as e:
            raise ApiError(503, str(e)) from None

    def served_entries(self) -> dict[str, dict]:
        """Registry entries of the versions that serve now (re-read when they change)."""
        from ..registry import Registry

        s = self.serving()
        key = (s["champion"], s["challenger"])
        if self._entries[0] != key:
            data = Registry(self.project.root).load()
            self._entries = (key, {v: Registry.find(data, v) for v in key if v is not None})
        return self._entries[1]

    def resolve(self, model: str, key: str | None, request_id: str) -> tuple[str, str]:
        """(version, arm) for a request's ``model``; arm: the alias the version holds (champion, challenger)."""
        s = self.serving()
        name = model.strip()
        if name == self.name:
            a = self.router.assign(key or request_id)
            return a["version"], a["arm"]
        if name in ALIASES:
            if s[name] is None:
                raise ApiError(404, "no challenger serves: no A/B test is running", param="model",
                               code="model_not_found")
            return s[name], name
        version = name[1:] if name[:1] in ("v", "V") and name[1:2].isdigit() else name
        for arm in ALIASES:
            if s[arm] == version:
                return version, arm
        served = ", ".join(v for v in (s["champion"], s["challenger"]) if v)
        names = f"champion, challenger, {self.name} or a served version ({served})"
        if self.router.knows(version):
            raise ApiError(404, f"version {version} is not served (served: {served}); use {names}",
                           param="model", code="model_not_found")
        raise ApiError(404, f"unknown model {model!r}: use {names}", param="model", code="model_not_found")

    def route_key(self, key: Any) -> dict[str, Any]:
        if not isinstance(key, str) or not key:
            raise ApiError(422, "the routing key must be a non-empty string")
        self.serving()  # a registry problem is a 503
        return self.router.assign(key)


# ---------------------------------------------------------------- the POST endpoints
#
# Each takes (gateway, validated body, the body as parsed JSON, the ASGI scope) and returns the
# response; FastAPI's routes call them (and document them), and the guard calls them directly
# (Gateway.fast_paths): the same models, functions and error messages, without FastAPI's
# per-request machinery, which cost as much CPU as the rest of a /log together.


async def log_answer(gw: Gateway, body: m.LogRequest, raw: dict, scope) -> Response:
    """``POST /log``: store one answer; answered once it is committed."""
    fields = body.model_dump(exclude_unset=True)
    problem = oversize({"input": fields["input"], "output": fields["output"]}, gw.max_example_chars)
    if problem is not None:
        raise ApiError(422, f"field {problem[1]!r}: {problem[0]}")
    key = fields.pop("route_key", None)
    version = fields.get("model_version")
    if key is not None and version is None:
        fields["model_version"] = version = gw.route_key(key)["version"]
    elif isinstance(version, str) and not gw.router.knows(version):
        raise ApiError(422, f"field 'model_version': {version!r} is not a version in the registry")
    try:
        rid = await gw.writer.log(fields)
    except ClReleaseError as e:
        raise store_error(e) from None
    return json_response(orjson.dumps({"request_id": rid, "model_version": version}), 201)


async def add_feedback(gw: Gateway, body: m.FeedbackRequest, raw: dict, scope) -> Response:
    """``POST /feedback``: store feedback on a logged answer; answered once it is committed."""
    try:
        fid = await gw.writer.feedback(body.model_dump(exclude_unset=True))
    except ClReleaseError as e:
        raise store_error(e) from None
    return json_response(orjson.dumps({"id": fid, "request_id": body.request_id}), 201)


POSTS = {"/log": (m.LogRequest, log_answer), "/feedback": (m.FeedbackRequest, add_feedback),
         "/v1/chat/completions": (m.ChatCompletionRequest, chat_completion)}


# ---------------------------------------------------------------- the guard: auth, limits, log lines


class Guard:
    """Pure ASGI middleware in front of FastAPI: bearer token and body limits before any body is
    read, one log line for a client that went away (no traceback), a one-line 500 for a bug,
    and with ``verbose`` an access log with secrets redacted."""

    def __init__(self, app: FastAPI, gateway: Gateway):
        self.app = self.fastapi = app
        self.gw = gateway

    def openapi(self) -> dict:
        return self.fastapi.openapi()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        route = path.rstrip("/") or "/"
        state = {"status": None, "gone": False, "body_done": method not in ("POST", "PUT", "PATCH")}
        gw = self.gw

        async def send_(message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)

        async def receive_():
            message = await receive()
            if message["type"] == "http.disconnect":
                state["gone"] = True
            elif message["type"] == "http.request" and not message.get("more_body"):
                state["body_done"] = True
            return message

        try:
            refusal = self._refuse(scope, route, method)
            if refusal is not None:
                await self._send_error(send_, path, *refusal)
            elif gw.fast_paths and method == "POST" and route in POSTS:
                await self._fast(scope, route, receive_, send_)
            else:
                await self.app(scope, receive_, send_)
        except Exception as e:  # noqa: BLE001
            if state["gone"] or _client_gone(e):
                state["gone"] = True
            else:
                say(redact(f"cl-release serve: internal error on {method} {path}: {type(e).__name__}: {e}", gw.token))
                if state["status"] is None:
                    await self._send_error(send_, path, 500, "internal error (see the server log)", {}, True)
        if state["gone"] and not state["body_done"]:
            say(redact(f"cl-release serve: client {client(scope)} disconnected during {method} {path}", gw.token))
        if gw.verbose:
            query = scope.get("query_string", b"").decode("latin-1")
            target = path + (f"?{query}" if query else "")
            say(redact(f'{client(scope)} - "{method} {target} HTTP/{scope.get("http_version", "1.1")}" '
                       f'{state["status"] or "-"}', gw.token))

    def _refuse(self, scope, route: str, method: str) -> tuple | None:
        """(status, message, headers, close) when the request is refused before its body."""
        allowed = ROUTES.get(route)
        if allowed is None or method not in allowed:
            return None  # FastAPI answers 404 / 405
        headers = {}
        for k, v in scope["headers"]:
            headers[k] = v
        has_body = method in ("POST", "PUT", "PATCH")
        if route not in OPEN_PATHS:
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.gw.token):
                return (401, "missing or wrong bearer token", {"WWW-Authenticate": 'Bearer realm="cl-release"'},
                        has_body)
        if not has_body:
            return None
        if b"transfer-encoding" in headers:
            return 411, "chunked bodies are not accepted: send Content-Length", {}, True
        length = headers.get(b"content-length")
        if length is None:
            return 411, "Content-Length required", {}, True
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            return 400, f"invalid Content-Length {length.decode('latin-1')!r}", {}, True
        if n > self.gw.max_body_bytes:
            return (413, f"body of {n} bytes is over the limit of {self.gw.max_body_bytes} bytes", {}, True)
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            return 415, "Content-Type must be application/json", {}, n > 0
        return None

    async def _fast(self, scope, route: str, receive, send) -> None:
        """A POST endpoint without FastAPI: the body (its size checked by ``_refuse``), the
        model, the endpoint's function, the response; errors as FastAPI's handlers make them."""
        from pydantic import ValidationError

        model, handler = POSTS[route]
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        try:
            try:
                raw = orjson.loads(b"".join(chunks))
            except orjson.JSONDecodeError as e:
                raise ApiError(400, f"invalid JSON: {e}", code="invalid_json") from None
            try:
                body = model.model_validate(raw)
            except ValidationError as e:
                raise validation_error(route, [{**x, "loc": ("body", *x["loc"])} for x in e.errors()], model) from None
            response = await handler(self.gw, body, raw, scope)
        except ApiError as e:
            response = error_response(route, e)
        except ClReleaseError as e:
            response = error_response(route, store_error(e))
        await response(scope, receive, send)

    async def _send_error(self, send, path: str, status: int, message: str, headers: dict, close: bool) -> None:
        body = error_body(path, status, message)
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        if close:  # the body is not read: the connection cannot carry another request
            raw.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


def _client_gone(e: BaseException) -> bool:
    from starlette.requests import ClientDisconnect

    return isinstance(e, (ClientDisconnect, ConnectionError, BrokenPipeError))


# ---------------------------------------------------------------- errors


# ---------------------------------------------------------------- the app


def create_app(gw: Gateway) -> "Guard":
    """The gateway's ASGI app: :class:`Guard` in front of the FastAPI app (``.fastapi``) over ``gw``."""
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(
        title="cl-release gateway", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
        generate_unique_id_function=lambda route: route.name,
        description=(
            "Log model answers and feedback into the cl-release feedback store, ask which version serves a "
            "user, and get chat completions from the champion or challenger (OpenAI-compatible, every answer "
            "captured). Run with `cl-release serve`. Every endpoint except /health and /openapi.json needs "
            "`Authorization: Bearer <token>` (the token is read from the environment variable named by "
            "serve.token_env, default CL_RELEASE_TOKEN). Request bodies are JSON, at most serve.max_body_bytes "
            "(default 65536) bytes, sent with Content-Length."),
    )
    app.state.gateway = gw

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(request.url.path, e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        path = request.url.path
        return error_response(path, validation_error(path, list(e.errors()), POSTS.get(path, (None,))[0]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        path = request.url.path
        if e.status_code == 404:
            msg = f"no such endpoint {path}"
        elif e.status_code == 405:
            msg = f"{request.method} is not allowed on {path}"
        else:
            msg = str(e.detail)
        return error_response(path, ApiError(e.status_code, msg, headers=dict(e.headers or {})))

    @app.exception_handler(ClReleaseError)
    async def _cl_error(request: Request, e: ClReleaseError):
        return error_response(request.url.path, store_error(e))

    collector = {400: {"model": m.Error}, 401: {"model": m.Error}, 411: {"model": m.Error},
                 413: {"model": m.Error}, 415: {"model": m.Error}, 422: {"model": m.Error}}
    openai_errors = {s: {"model": m.OpenAIError} for s in (400, 401, 404, 413, 415, 502, 503, 504)}

    @app.post("/log", status_code=201, response_model=m.LogResponse, summary="Store one model answer",
              responses={**collector, 409: {"model": m.Error, "description": "request_id logged with other content"}})
    async def log(body: m.LogRequest, request: Request):
        return await log_answer(gw, body, await request.json(), request.scope)

    @app.post("/feedback", status_code=201, response_model=m.FeedbackResponse,
              summary="Record feedback on a logged answer",
              responses={**collector, 404: {"model": m.Error, "description": "no logged answer has this request_id"}})
    async def feedback(body: m.FeedbackRequest, request: Request):
        return await add_feedback(gw, body, await request.json(), request.scope)

    @app.get("/route", response_model=m.RouteResponse, summary="The model version to serve for a user or session",
             responses={400: {"model": m.Error}, 401: {"model": m.Error},
                        503: {"model": m.Error, "description": "no version to serve yet"}})
    async def route(request: Request, key: str | None = Query(
            None, min_length=1, description="A stable user or session id (hash personal data first).")):
        keys = request.query_params.getlist("key")
        if len(keys) != 1:
            raise ApiError(400, "pass exactly one key: GET /route?key=USER_OR_SESSION_ID")
        return Response(orjson.dumps({"key": keys[0], **gw.route_key(keys[0])}), media_type="application/json")

    @app.get("/stats", summary="Totals and rates from the feedback store",
             responses={400: {"model": m.Error}, 401: {"model": m.Error}, 422: {"model": m.Error}})
    def stats(request: Request, since: str | None = Query(
            None, description="ISO-8601 date or time: answers created, or given feedback, since then.")) -> dict:
        unknown = set(request.query_params) - {"since"}
        if unknown:
            raise ApiError(400, f"unknown query parameter {sorted(unknown)[0]!r}")
        since_all = request.query_params.getlist("since")
        try:
            out = gw.store.stats(since=since_all[-1] if since_all else None)
        except ClReleaseError as e:
            raise store_error(e) from None
        return Response(orjson.dumps(out), media_type="application/json")

    @app.get("/health", response_model=m.Health, summary="Liveness (no token needed)", openapi_extra={"security": []},
             responses={503: {"model": m.Health, "description": "the store cannot be read, or the writer stopped"}})
    def health():
        try:
            gw.store.conn.execute("SELECT 1").fetchone()
            ok = gw.writer.alive
        except Exception:  # noqa: BLE001  (any store failure makes the service unhealthy)
            ok = False
        return Response(orjson.dumps({"status": "ok" if ok else "unavailable"}), status_code=200 if ok else 503,
                        media_type="application/json")

    @app.get("/v1/models", response_model=m.ModelList, summary="The served versions and the names that reach them",
             responses={401: {"model": m.OpenAIError}, 503: {"model": m.OpenAIError}})
    async def models():
        s = gw.serving()
        entries = gw.served_entries()
        created = {v: _epoch(e.get("created_at")) for v, e in entries.items()}
        cards = [{"id": gw.name, "object": "model", "created": created.get(s["champion"], 0), "owned_by": "cl-release",
                  "version": None}]
        for arm in ALIASES:
            if s[arm]:
                cards.append({"id": arm, "object": "model", "created": created.get(s[arm], 0),
                              "owned_by": "cl-release", "version": s[arm]})
        for v in sorted(entries):
            cards.append({"id": v, "object": "model", "created": created.get(v, 0), "owned_by": "cl-release",
                          "version": v})
        return Response(orjson.dumps({"object": "list", "data": cards}), media_type="application/json")

    @app.post("/v1/chat/completions", response_model=m.ChatCompletion,
              summary="A chat completion from the champion, the challenger or a served version (OpenAI-compatible)",
              responses={**openai_errors, 200: {
                  "description": "The answer (JSON), or with stream=true server-sent events of ChatCompletionChunk",
                  "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/ChatCompletionChunk"}}}}})
    async def chat(body: m.ChatCompletionRequest, request: Request):
        return await chat_completion(gw, body, await request.json(), request.scope)

    _document_security(app)
    return Guard(app, gw)


def _epoch(stamp: Any) -> int:
    from ..timeutil import parse_time

    try:
        return int(parse_time(str(stamp)).timestamp())
    except ValueError:
        return 0


def _document_security(app: FastAPI) -> None:
    """The bearer scheme in the generated OpenAPI: on every operation but those that say otherwise."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for ops in spec["paths"].values():  # FastAPI's default 422 body is not what this server sends
            for op in ops.values():
                default = op.get("responses", {}).get("422", {})
                if "HTTPValidationError" in str(default):
                    del op["responses"]["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            spec.get("components", {}).get("schemas", {}).pop(name, None)
        spec.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"bearer": []}]
        spec["paths"]["/openapi.json"] = {"get": {"summary": "This document (no token needed)", "security": [],
                                                  "operationId": "openapi",
                                                  "responses": {"200": {"description": "OpenAPI 3.1"}}}}
        app.openapi_schema = spec
        return spec

    app.openapi = openapi
