"""What the gateway answers outside FastAPI's response models, and what its log says: JSON
responses, the two error shapes (OpenAI's under ``/v1``, the collector's elsewhere), the errors
of the store and the upstream as answers, one-line log messages with secrets redacted."""

from __future__ import annotations

import re
import sys

import orjson
from fastapi.responses import Response

from ..errors import ClReleaseError, ConflictError, UnknownRequest, UpstreamError, UserError

# Query parameters whose values never reach the log (a client may send its token as ?token=).
_SECRET_PARAM = re.compile(r"([?&;][^=&;\s\"]*(?:token|key|secret|passw|auth|sig|session|cookie)[^=&;\s\"]*=)[^&;\s\"]*",
                           re.IGNORECASE)


class ApiError(Exception):
    """An answer other than 2xx, with the message a client sees."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def error_body(path: str, status: int, message: str, *, param: str | None = None, code: str | None = None) -> bytes:
    """The error shape of the endpoint family: OpenAI's under /v1, the collector's elsewhere."""
    if not is_openai(path):
        return orjson.dumps({"error": {"status": status, "message": message}})
    kind = ("authentication_error" if status == 401 else "invalid_request_error" if status < 500
            else "upstream_error" if status in (502, 504) else "server_error")
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def error_response(path: str, e: ApiError) -> Response:
    return Response(error_body(path, e.status, e.message, param=e.param, code=e.code), status_code=e.status,
                    media_type="application/json", headers=e.headers)


def json_response(payload: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(payload, status_code=status, media_type="application/json", headers=headers)


def redact(text: str, token: bytes) -> str:
    """``text`` without the bearer token and without the values of secret-looking query
    parameters (``?token=``, ``?api_key=``...)."""
    text = _SECRET_PARAM.sub(r"\1[REDACTED]", text)
    t = re.escape(token.decode("utf-8"))
    return re.sub(rf"(?<![\w.~-]){t}(?![\w.~-])", "[REDACTED]", text) if t else text


def say(line: str) -> None:
    """One line on the server's stderr."""
    sys.stderr.write(line.rstrip("\n") + "\n")
    sys.stderr.flush()


def header(scope, name: bytes) -> str | None:
    """A request header (``name`` in lower case) from the ASGI scope."""
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


def client(scope) -> str:
    """The client's address, for log lines."""
    c = scope.get("client")
    return c[0] if c else "-"


def _loc_name(loc: tuple) -> str:
    """``messages[0].role`` from pydantic's location, without the union-member tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not ("[" in part or "-" in part or part in (
                "str", "int", "float", "bool", "list", "dict", "none", "literal")):
            out += f".{part}" if out else part
    return out


def validation_error(path: str, errors: list[dict], model=None) -> ApiError:
    """The first pydantic error as one message naming the field (collector: the old messages);
    ``model``: the request's pydantic model, whose fields an unknown field's message lists."""
    e = errors[0]
    loc = tuple(e.get("loc") or ())
    where = loc[0] if loc else "body"
    kind = e.get("type", "")
    openai = is_openai(path)
    bad = 400 if openai else 422
    if kind == "json_invalid":
        return ApiError(400, f"invalid JSON: {(e.get('ctx') or {}).get('error', e.get('msg'))}", code="invalid_json")
    name = _loc_name(loc[1:])
    if where == "query":
        return ApiError(400 if openai else 422, f"query parameter {name!r}: {e.get('msg')}", param=name)
    if not name and kind in ("model_attributes_type", "dict_type", "model_type"):
        return ApiError(bad, f"expected a JSON object, got {type(e.get('input')).__name__}")
    if kind == "extra_forbidden":
        known = f" (known: {', '.join(sorted(model.model_fields))})" if model is not None and "." not in name else ""
        return ApiError(bad, f"unknown field {name!r}{known}", param=name)
    if kind == "missing":
        return ApiError(bad, f"missing field {name!r}", param=name)
    if name == "messages" and kind == "too_short":
        return ApiError(bad, "messages must not be empty: send at least one message", param=name)
    return ApiError(bad, f"field {name!r}: {e.get('msg')}", param=name)


def store_error(e: ClReleaseError) -> ApiError:
    """An error of the store or the router as an answer: 409 conflict, 404 unknown request id,
    422 bad value, 503 anything else (the store or the registry cannot be used)."""
    if isinstance(e, ConflictError):
        return ApiError(409, str(e), code="conflict")
    if isinstance(e, UnknownRequest):
        return ApiError(404, str(e), code="unknown_request")
    if isinstance(e, UserError):
        return ApiError(422, str(e))
    return ApiError(503, str(e))


def upstream_error(e: UpstreamError, headers: dict[str, str]) -> ApiError:
    return ApiError(e.status, str(e), code="upstream_timeout" if e.status == 504 else "upstream_error",
                    headers=headers)


def with_headers(e: ApiError, headers: dict[str, str]) -> ApiError:
    """``e`` with the response headers of its request (request id, version)."""
    e.headers.update(headers)
    return e
