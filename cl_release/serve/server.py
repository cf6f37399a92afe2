"""Running the gateway: uvicorn on a socket bound here, one process or ``--workers N``.

:func:`make_server` builds a :class:`GatewayServer` bound to ``host:port`` (port 0: a free one,
known before it serves); ``serve_forever()`` runs it until ``shutdown()`` (from another thread)
or SIGINT/SIGTERM (in the main thread), then finishes the requests in flight and commits what
the writer holds. With ``workers > 1`` uvicorn's supervisor runs that many processes on the
one socket, each with its own writer and backend (:func:`app_from_env` builds their app).

Malformed HTTP that never reaches the app (a bad ``Content-Length``) still gets the collector's
error shape, and uvicorn's own log lines are one line each (tracebacks only with ``--debug``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from ..errors import UserError
from .config import BACKENDS, serve_config

# A worker process reads its settings from these (spawned by uvicorn; the token stays in the
# environment variable it came from, never on a command line).
ENV_ROOT = "CL_RELEASE_SERVE_ROOT"
ENV_OPTIONS = "CL_RELEASE_SERVE_OPTIONS"
ENV_TOKEN = "CL_RELEASE_SERVE_TOKEN"


class _OneLine(logging.Formatter):
    def __init__(self, debug: bool):
        super().__init__("cl-release serve: %(message)s")
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        text = " ".join(record.getMessage().split())
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and not self.debug:
            text += f" ({type(exc).__name__}: {' '.join(str(exc).split())})"
            return f"cl-release serve: {text}"
        record.msg, record.args = text, ()
        return super().format(record)


def log_config(debug: bool = False) -> None:
    """uvicorn's loggers: one line each on stderr, warnings and up (tracebacks with ``debug``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine(debug))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        lg = logging.getLogger(name)
        lg.handlers = [handler] if name == "uvicorn" else []
        lg.propagate = name != "uvicorn"
        lg.setLevel(logging.WARNING)


def _bad_request_body(msg: str) -> bytes:
    """The collector's error body for HTTP that never reached the app (called while uvicorn
    handles the parser's exception, which names the problem)."""
    import orjson

    exc = sys.exc_info()[1]
    detail = " ".join(str(exc).split()) if exc is not None and str(exc) else msg
    return orjson.dumps({"error": {"status": 400, "message": f"bad HTTP request: {detail}"}})


from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402  (this module runs servers only)


class H11(H11Protocol):
    """uvicorn's h11 protocol, corked (see :class:`_Corked`), malformed HTTP answered in JSON."""

    def connection_made(self, transport) -> None:
        super().connection_made(_Corked(transport, self.loop))

    def send_400_response(self, msg: str) -> None:
        import h11

        data = _bad_request_body(msg)
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(data)).encode())]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=data),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


try:
    import httptools  # noqa: F401
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # h11 only
    HttpTools = None
else:
    class HttpTools(HttpToolsProtocol):
        """uvicorn's httptools protocol (when installed: a C parser), corked, errors in JSON."""

        def connection_made(self, transport) -> None:
            super().connection_made(_Corked(transport, self.loop))

        def send_400_response(self, msg: str) -> None:
            data = _bad_request_body(msg)
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
                                 + f"content-length: {len(data)}\r\n\r\n".encode() + data)
            self.transport.close()


def _protocols():
    """The HTTP protocol class: httptools when installed, else h11."""
    return HttpTools or H11


class _Corked:
    """The connection's transport, sending what one turn of the event loop wrote in one system
    call: a response's header and body leave as one packet, with one ``send`` instead of two
    (the collector's small answers spent a third of their time in ``send``)."""

    def __init__(self, transport, loop):
        self._t = transport
        self._loop = loop
        self._buf: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._buf:
            self._loop.call_soon(self._flush)
        self._buf.append(bytes(data))

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def _flush(self) -> None:
        if self._buf:
            data = b"".join(self._buf)
            self._buf.clear()
            if not self._t.is_closing():
                self._t.write(data)

    def close(self) -> None:
        self._flush()
        self._t.close()

    def write_eof(self) -> None:
        self._flush()
        self._t.write_eof()

    def __getattr__(self, name: str):
        return getattr(self._t, name)


class GatewayServer:
    """A bound gateway: ``serve_forever()``, ``shutdown()``, ``server_close()``, ``url``."""

    def __init__(self, sock: socket.socket, *, gateway=None, app=None, workers: int = 1, root: Path | None = None,
                 options: dict[str, Any] | None = None, token: str | None = None, debug: bool = False):
        self.socket = sock
        self.server_address = sock.getsockname()[:2]
        self.app = gateway  # the Gateway (one process); None with workers
        self._asgi = app
        self.workers = workers
        self._root, self._options, self._token = root, options, token
        self.debug = debug
        self._server = None
        self._done = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{host}:{port}"

    def _config(self, app: Any, **kw):
        import uvicorn

        return uvicorn.Config(app, http=_protocols(), lifespan="on", access_log=False, log_config=None,
                              server_header=False, proxy_headers=False, timeout_keep_alive=60, backlog=512, **kw)

    def serve_forever(self) -> None:
        import uvicorn

        log_config(self.debug)
        try:
            if self.workers > 1:
                from uvicorn.supervisors import Multiprocess

                os.environ[ENV_ROOT] = str(self._root)
                os.environ[ENV_OPTIONS] = json.dumps(self._options)
                os.environ[ENV_TOKEN] = self._token
                config = self._config("cl_release.serve.server:app_from_env", factory=True, workers=self.workers)
                Multiprocess(config, sockets=[self.socket]).run()
                return
            self._server = uvicorn.Server(self._config(self._asgi))
            self._server.run(sockets=[self.socket])
            if not self._server.started and not self._server.should_exit:
                raise UserError("the gateway did not start (see the lines above)")
        finally:
            self._done.set()

    def shutdown(self) -> None:
        """Stop serving (from another thread); returns when ``serve_forever`` has returned."""
        if self._server is not None:
            self._server.should_exit = True
        self._done.wait(timeout=30)

    def server_close(self) -> None:
        self.socket.close()


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it a
    # response's header and body packets wait for the client's delayed ACK (~40 ms each).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}", hint="pick another --port") from None
    sock.listen(512)
    sock.set_inheritable(True)
    return sock


def token_from_env(conf: dict[str, Any]) -> str:
    token = os.environ.get(conf["token_env"], "")
    if not token.strip():
        raise UserError(f"no bearer token: the environment variable {conf['token_env']} is not set",
                        hint=f"export {conf['token_env']}=$(openssl rand -hex 32); clients send "
                             "'Authorization: Bearer <token>'")
    return token.strip()


def build_gateway(project, *, token: str, options: dict[str, Any], verbose: bool = False, warm: bool = False):
    """The :class:`Gateway` and its FastAPI app for ``project`` with ``options`` over ``serve:``."""
    from .app import Gateway, create_app
    from .backends import make_backend

    conf = {**serve_config(project), **{k: v for k, v in options.items() if v is not None}}
    if conf["backend"] not in BACKENDS:
        raise UserError(f"unknown backend {conf['backend']!r}", hint="use local, openai or none")
    holder: dict[str, Any] = {}
    backend = make_backend(conf["backend"], project, conf, served=lambda: holder["gw"].served_entries())
    gw = Gateway(project, token=token, conf=conf, backend=backend, verbose=verbose)
    holder["gw"] = gw
    gw.store.conn  # noqa: B018  (create and migrate the store before the first request)
    gw.store.close()
    if warm and backend is not None and hasattr(backend, "warm"):
        try:
            gw.serving()
        except Exception:  # noqa: BLE001  (nothing serves yet: nothing to load; /v1 answers 503 until then)
            pass
        else:
            backend.warm()
    return gw, create_app(gw)


def make_server(project, *, host: str | None = None, port: int | None = None, token: str | None = None,
                verbose: bool = False, workers: int = 1, backend: str | None = None,
                upstream_url: str | None = None, warm: bool = False, debug: bool = False,
                **options: Any) -> GatewayServer:
    """A gateway bound to ``host:port`` (port 0: any free port) over the project's store.

    ``token``: the bearer token (default: the environment variable ``serve.token_env``).
    ``backend``/``upstream_url`` and other ``options`` override the ``serve:`` section.
    ``warm``: load the local backend's model before serving (the CLI does; errors then stop
    the start instead of failing the first requests).
    """
    conf = serve_config(project)
    token = token.strip() if token is not None else token_from_env(conf)
    if not token:
        raise UserError("the gateway needs a bearer token", hint=f"set {conf['token_env']} (serve.token_env)")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    options = {**options, "backend": backend, "upstream_url": upstream_url}
    opts = {k: v for k, v in options.items() if v is not None}
    host = host or conf["host"]
    port = conf["port"] if port is None else port
    if workers > 1:
        build_gateway(project, token=token, options=opts)  # check the settings before forking
        return GatewayServer(bind(host, port), workers=workers, root=Path(project.root), options=opts,
                             token=token, debug=debug)
    gw, app = build_gateway(project, token=token, options=opts, verbose=verbose, warm=warm)
    return GatewayServer(bind(host, port), gateway=gw, app=app, debug=debug)


def app_from_env():
    """The app of one worker process (``--workers``): settings from the environment."""
    from ..project import Project

    log_config(False)
    project = Project.load(Path(os.environ[ENV_ROOT]))
    opts = json.loads(os.environ.get(ENV_OPTIONS) or "{}")
    verbose = bool(opts.pop("verbose", False))
    _, app = build_gateway(project, token=os.environ[ENV_TOKEN], options=opts, verbose=verbose, warm=True)
    return app
