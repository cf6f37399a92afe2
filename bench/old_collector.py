"""The baseline of ``bench/bench_serve.py``: ``cl-release serve`` as it was before the FastAPI gateway
(cl_release/serve.py at commit 8e589b8), kept unchanged but for absolute imports and the
OpenAPI file it no longer has. Run: ``python bench/old_collector.py -C REPO --port 0``.

Original docstring: a small HTTP collector over the feedback store and the router.

For services not written in Python. Endpoints (described in ``openapi.json``, served at
``GET /openapi.json``):

- ``POST /log``       store one answer (``FeedbackStore.log``); ``route_key`` instead of
                      ``model_version`` records the version the router picks for that key;
- ``POST /feedback``  feedback on a logged answer (``FeedbackStore.feedback``);
- ``GET /route?key=`` the version to serve for a user or session id (``Router.assign``);
- ``GET /stats``      ``FeedbackStore.stats`` (``?since=``);
- ``GET /health``     liveness (no token needed, no data in it).

Every other request needs ``Authorization: Bearer <token>``, the token taken from an
environment variable (``serve.token_env``, default ``CL_RELEASE_TOKEN``); the server refuses
to start without one. Bodies must be JSON objects (``Content-Type: application/json``) no
larger than ``serve.max_body_bytes`` (default 64 KiB), with known fields of the right types;
anything else is a 4xx with ``{"error": {"status", "message"}}``.

Built on the standard library's ``ThreadingHTTPServer`` with HTTP/1.1 keep-alive: one thread
per client connection, and one store connection per thread (closed when the client goes).
"""

from __future__ import annotations

import hmac
import json
import os
import re
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from cl_release.errors import ClReleaseError, ConflictError, UnknownRequest, UserError

DEFAULTS: dict[str, Any] = {"host": "127.0.0.1", "port": 8765, "token_env": "CL_RELEASE_TOKEN",
                            "max_body_bytes": 65536}
LOG_FIELDS = {"input", "output", "request_id", "model_version", "route_key", "latency_ms", "tokens",
              "quality_score", "metadata", "created_at"}
FEEDBACK_FIELDS = {"request_id", "rating", "thumbs", "correction", "notes", "hallucinated", "error_tag",
                   "severity", "annotator", "created_at"}
OPEN_PATHS = {"/health", "/openapi.json"}
# Query parameters whose values never reach the log (a client may send its token as ?token=).
_SECRET_PARAM = re.compile(r"([?&;][^=&;\s\"]*(?:token|key|secret|passw|auth|sig|session|cookie)[^=&;\s\"]*=)[^&;\s\"]*",
                           re.IGNORECASE)


def serve_config(project) -> dict[str, Any]:
    return {**DEFAULTS, **((project.data.get("serve") if project is not None else None) or {})}


def openapi_spec() -> bytes:
    return b"{}"  # the hand-written openapi.json is gone; the gateway generates its own


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Collector:
    """What the handler serves: the store, the router, the token and the limits."""

    def __init__(self, store, router, *, token: str, max_body_bytes: int = DEFAULTS["max_body_bytes"],
                 max_example_chars: int | None = None):
        if not token:
            raise UserError("the collector needs a bearer token", hint="set CL_RELEASE_TOKEN (or serve.token_env)")
        self.store = store
        self.router = router
        self.token = token.encode("utf-8")
        self.max_body_bytes = int(max_body_bytes)
        self.max_example_chars = max_example_chars

    # -- endpoints; each returns (status, body)

    def log(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        _only(body, LOG_FIELDS)
        for name in ("input", "output"):
            if name not in body:
                raise HTTPError(422, f"missing field {name!r}")
        if self.max_example_chars is not None:
            from cl_release.data.formats import oversize

            problem = oversize({"input": body["input"], "output": body["output"]}, self.max_example_chars)
            if problem is not None:
                raise HTTPError(422, f"field {problem[1]!r}: {problem[0]}")
        fields = dict(body)
        key = fields.pop("route_key", None)
        version = fields.get("model_version")
        if key is not None and version is None:
            fields["model_version"] = self._route(key)["version"]
        elif isinstance(version, str) and self.router is not None and not self.router.knows(version):
            raise HTTPError(422, f"field 'model_version': {version!r} is not a version in the registry")
        rid = self.store.log(fields.pop("input"), fields.pop("output"), **fields)
        return 201, {"request_id": rid, "model_version": fields.get("model_version")}

    def feedback(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        _only(body, FEEDBACK_FIELDS)
        rid = body.get("request_id")
        if not isinstance(rid, str) or not rid:
            raise HTTPError(422, "field 'request_id' must be a non-empty string")
        if self.store.missing([rid]):
            raise HTTPError(404, f"no logged answer with request id {rid!r}")
        fields = {k: v for k, v in body.items() if k != "request_id"}
        fid = self.store.feedback(rid, **fields)
        return 201, {"id": fid, "request_id": rid}

    def _route(self, key: Any) -> dict[str, Any]:
        if not isinstance(key, str) or not key:
            raise HTTPError(422, "the routing key must be a non-empty string")
        if self.router is None:
            raise HTTPError(503, "no router: this collector has no release repository")
        try:
            return self.router.assign(key)
        except UserError:
            raise
        except ClReleaseError as e:
            raise HTTPError(503, str(e)) from None

    def route(self, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        keys = query.get("key") or []
        if len(keys) != 1:
            raise HTTPError(400, "pass exactly one key: GET /route?key=USER_OR_SESSION_ID")
        return 200, {"key": keys[0], **self._route(keys[0])}

    def stats(self, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        unknown = set(query) - {"since"}
        if unknown:
            raise HTTPError(400, f"unknown query parameter {sorted(unknown)[0]!r}")
        since = (query.get("since") or [None])[-1]
        return 200, self.store.stats(since=since)

    def health(self) -> tuple[int, dict[str, Any]]:
        try:
            self.store.conn.execute("SELECT 1").fetchone()
        except Exception:  # noqa: BLE001  (any store failure makes the service unhealthy)
            return 503, {"status": "unavailable"}
        return 200, {"status": "ok"}


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise HTTPError(422, f"unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one thread (and one store connection) per client
    server_version = "cl-release"
    timeout = 60  # an idle or stalled client releases its thread
    disable_nagle_algorithm = True  # headers and body go out at once: no delayed-ACK stalls

    @property
    def app(self) -> Collector:
        return self.server.app  # type: ignore[attr-defined]

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, TimeoutError) as e:  # the client went away: one line, no traceback
            busy = getattr(self, "_busy", None)
            if busy or getattr(self.server, "verbose", False):
                what = f" during {busy[0]} {busy[1]}" if busy else " between requests"
                how = "timed out" if isinstance(e, TimeoutError) else "disconnected"
                sys.stderr.write(self.redact(f"cl-release serve: client {self.address_string()} {how}{what} "
                                             f"({type(e).__name__})\n"))
        finally:
            self.app.store.close()  # this thread's connection

    def redact(self, text: str) -> str:
        """``text`` without the bearer token and without the values of secret-looking query
        parameters (``?token=``, ``?api_key=``...)."""
        text = _SECRET_PARAM.sub(r"\1[REDACTED]", text)
        token = re.escape(self.app.token.decode("utf-8"))
        return re.sub(rf"(?<![\w.~-]){token}(?![\w.~-])", "[REDACTED]", text)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if getattr(self.server, "verbose", False):
            sys.stderr.write("%s - %s\n" % (self.address_string(), self.redact(format % args)))

    # -- plumbing

    def _send(self, status: int, obj: Any, headers: dict[str, str] | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else orjson.dumps(obj)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"error": {"status": status, "message": message}}, headers)

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8"), self.app.token)

    def _body(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HTTPError(411, "chunked bodies are not accepted: send Content-Length")
        if length is None:
            self.close_connection = True
            raise HTTPError(411, "Content-Length required")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise HTTPError(400, f"invalid Content-Length {length!r}") from None
        if n > self.app.max_body_bytes:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise HTTPError(413, f"body of {n} bytes is over the limit of {self.app.max_body_bytes} bytes")
        raw = self.rfile.read(n)
        if len(raw) != n:
            self.close_connection = True
            raise HTTPError(400, "body shorter than Content-Length")
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HTTPError(415, "Content-Type must be application/json")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise HTTPError(400, f"invalid JSON: {e}") from None
        if not isinstance(body, dict):
            raise HTTPError(422, f"expected a JSON object, got {type(body).__name__}")
        return body

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        self._busy = (method, path)  # a disconnect now is worth a line in the log (see handle)
        self._answer(method, url, path)
        self._busy = None

    def _answer(self, method: str, url: Any, path: str) -> None:
        length = (self.headers.get("Content-Length") or "0").strip()
        has_body = not length.isdigit() or int(length) > 0 or bool(self.headers.get("Transfer-Encoding"))
        try:
            routes = {("GET", "/health"), ("GET", "/openapi.json"), ("GET", "/route"), ("GET", "/stats"),
                      ("POST", "/log"), ("POST", "/feedback")}
            if (method, path) not in routes:
                if has_body:
                    self.close_connection = True
                known = {p for _, p in routes}
                if path in known:
                    allowed = ", ".join(sorted(m for m, p in routes if p == path))
                    raise HTTPError(405, f"{method} is not allowed on {path}", {"Allow": allowed})
                raise HTTPError(404, f"no such endpoint {path}")
            if path not in OPEN_PATHS and not self._authorized():
                if has_body:
                    self.close_connection = True
                raise HTTPError(401, "missing or wrong bearer token",
                                {"WWW-Authenticate": 'Bearer realm="cl-release"'})
            if path == "/openapi.json":
                self._send(200, None, raw=openapi_spec())
                return
            app = self.app
            if path == "/health":
                status, obj = app.health()
            elif path == "/route":
                status, obj = app.route(parse_qs(url.query, keep_blank_values=True))
            elif path == "/stats":
                status, obj = app.stats(parse_qs(url.query, keep_blank_values=True))
            elif path == "/log":
                status, obj = app.log(self._body())
            else:
                status, obj = app.feedback(self._body())
            self._send(status, obj)
        except HTTPError as e:
            self._error(e.status, e.message, e.headers)
        except ConflictError as e:
            self._error(409, str(e))
        except UnknownRequest as e:
            self._error(404, str(e))
        except UserError as e:
            self._error(422, str(e))
        except ClReleaseError as e:
            self._error(503, str(e))
        except (ConnectionError, TimeoutError):  # the client went away: nobody to answer (see handle)
            self.close_connection = True
            raise
        except Exception as e:  # noqa: BLE001  (a bug: answer 500, keep serving)
            self.close_connection = True
            sys.stderr.write(self.redact(f"cl-release serve: internal error on {method} {path}: "
                                         f"{type(e).__name__}: {e}\n"))
            self._error(500, "internal error (see the server log)")

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")


class CollectorServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], app: Collector, *, verbose: bool = False):
        self.app = app
        self.verbose = verbose
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line per failed connection (the standard library prints a traceback; with
        CL_RELEASE_DEBUG set, so does this)."""
        exc = sys.exc_info()[1]
        if os.environ.get("CL_RELEASE_DEBUG"):
            super().handle_error(request, client_address)
            return
        host = client_address[0] if isinstance(client_address, tuple) else client_address
        sys.stderr.write(f"cl-release serve: connection from {host} failed: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())}\n")


def make_server(project, *, host: str | None = None, port: int | None = None, token: str | None = None,
                verbose: bool = False) -> CollectorServer:
    """A collector bound to ``host:port`` (port 0: any free port) over the project's store.

    ``token``: the bearer token; default: the environment variable ``serve.token_env``.
    """
    from cl_release.decide.abtest import Router
    from cl_release.store.sqlite import FeedbackStore

    conf = serve_config(project)
    if token is None:
        token = os.environ.get(conf["token_env"], "")
        if not token.strip():
            raise UserError(f"no bearer token: the environment variable {conf['token_env']} is not set",
                            hint=f"export {conf['token_env']}=$(openssl rand -hex 32); clients send "
                                 "'Authorization: Bearer <token>'")
    from cl_release.data.formats import max_example_chars

    app = Collector(FeedbackStore(project.feedback_path), Router(project), token=token.strip(),
                    max_body_bytes=conf["max_body_bytes"], max_example_chars=max_example_chars(project.data))
    app.store.conn  # noqa: B018  (create and migrate the store before the first request)
    app.store.close()
    try:
        return CollectorServer((host or conf["host"], conf["port"] if port is None else port), app, verbose=verbose)
    except OSError as e:
        raise UserError(f"cannot listen on {host or conf['host']}:{port if port is not None else conf['port']}: "
                        f"{e.strerror}", hint="pick another --port") from None


def spec_path() -> Path:
    return Path(__file__).with_name("openapi.json")


def load_spec() -> dict[str, Any]:
    return json.loads(openapi_spec())


def main() -> None:
    """``python bench/old_collector.py -C REPO [--port 0]``: serve until killed; the first stderr
    line gives the URL (as ``cl-release serve`` did)."""
    import argparse

    from cl_release.project import Project

    ap = argparse.ArgumentParser(description="the old ThreadingHTTPServer collector (benchmark baseline)")
    ap.add_argument("-C", dest="root", type=Path, required=True)
    ap.add_argument("--host", default=None)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    server = make_server(Project.load(args.root), host=args.host, port=args.port)
    sys.stderr.write(f"old collector listening on {server.url}\n")
    sys.stderr.flush()
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
