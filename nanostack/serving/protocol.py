"""The wire format of the OpenAI-compatible API, apart from what any one route means: errors in OpenAI's JSON shape,
request bodies parsed strictly, fields checked by type and range, and server-sent event streams.

Every error is `{"error": {"message", "type", "param", "code"}}` with an HTTP status (`ApiError`). A body must be
a JSON object; NaN/Infinity are refused, and so is a lone UTF-16 surrogate ("\\ud800") anywhere in it, key or
value: JSON can spell one, but it is not a character, cannot be written back as UTF-8, and vLLM and OpenAI answer
it with a 400 too. A stream is one `data: {json}\\n\\n` per chunk and a final `data: [DONE]`; whatever goes wrong
once the headers are out (an error from the engine, a bug while building a chunk) becomes an error event followed
by `[DONE]`, so a client never sees a 200 that ends without one.
"""
import asyncio
import json
import logging
import math
import reprlib

from aiohttp import web

log = logging.getLogger("nanostack.api")


class ApiError(Exception):
    """An error answered as JSON in the OpenAI shape with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        """The JSON error object (also sent as an event when a stream fails midway)."""
        kind = ("invalid_request_error" if self.status < 429 else
                "rate_limit_exceeded" if self.status == 429 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        """The error as an HTTP response."""
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def short(value) -> str:
    """A repr of a client's value bounded in length and depth, for error messages."""
    return reprlib.repr(value)


def is_int(value) -> bool:
    """An int that is not a bool (JSON true would pass isinstance(value, int))."""
    return isinstance(value, int) and not isinstance(value, bool)


def get_field(body: dict, name: str, kind: type, default=None, low=None, high=None):
    """body[name] checked to be a `kind` (int, float, bool, str, list, dict) within [low, high]; `default` when it
    is absent or null. A wrong type or value is a 400 naming the field."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise ApiError(400, f"'{name}' must be of type {kind.__name__}, got {short(value)}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ApiError(400, f"'{name}' must be {bounds}, got {value}", param=name)
    return value


def lone_surrogate_field(value, path: str = "") -> str | None:
    """The path ("messages[0].content") of the first string in a parsed JSON value, key or value, that holds a
    lone surrogate (U+D800..U+DFFF), or None. Python strings hold no surrogate pairs, so any one is lone."""
    if isinstance(value, str):
        return path if any("\ud800" <= char <= "\udfff" for char in value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            name = key.encode("utf-8", "backslashreplace").decode()  # a bad key is named with its escape
            inner = f"{path}.{name}" if path else name
            if lone_surrogate_field(key, inner) is not None:
                return inner
            found = lone_surrogate_field(item, inner)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = lone_surrogate_field(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def parse_json_body(raw: bytes) -> dict:
    """A request body as a JSON object; anything else (invalid JSON, NaN, another type, a lone surrogate) is a 400."""
    def reject_constant(name):
        raise ValueError(f"{name} is not valid JSON")
    try:
        body = json.loads(raw, parse_constant=reject_constant)
    except (ValueError, RecursionError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {str(error)[:200]}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        field = lone_surrogate_field(body)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    if field is not None:
        raise ApiError(400, f"'{field}' holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not a character: "
                            f"send valid Unicode text", param=field)
    return body


def sse_event(payload: dict) -> bytes:
    """One server-sent event: `data: {json}` and a blank line (UTF-8, not \\u-escaped, so text stays readable)."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


async def write_event_stream(request: web.Request, chunks) -> web.StreamResponse:
    """Send each chunk of the async iterator `chunks` as an event, then `data: [DONE]`. Once the headers are sent an
    error can no longer change the status, so any exception becomes an error event before the `[DONE]`."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        try:
            async for chunk in chunks:
                await response.write(sse_event(chunk))
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as error:
            if not isinstance(error, ApiError):
                log.exception("stream on %s failed after its headers were sent", request.path)
                error = ApiError(500, f"internal error: {type(error).__name__}: {error}")
            # ASCII JSON: whatever the message holds, this event can be encoded.
            await response.write(f"data: {json.dumps(error.body())}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:  # the client left: there is no one to tell
        pass
    return response
