"""Reading a request body under gunicorn with bounds Werkzeug does not give (size of chunked bodies, stalls), and
noticing a client that hung up."""
from __future__ import annotations

import json
import select
import socket

import base64
import binascii
import io

from flask import request
from werkzeug.formparser import parse_form_data

from .errors import ApiError

try:  # gunicorn's errors for a body that breaks HTTP framing (bad chunk sizes, trailers, early end)
    from gunicorn.http.errors import NoMoreData, ParseException
    _MALFORMED: tuple = (ParseException, NoMoreData)
except ImportError:  # not under gunicorn
    _MALFORMED = ()


def _read_body(limit: int, timeout: float) -> bytes:
    """The request body, read with two guards that Werkzeug does not give under gunicorn:

    - size: past ``limit`` bytes -> 413. With a Content-Length Werkzeug refuses before reading, but a chunked body
      has none, and there Werkzeug silently stopped at the limit: a valid JSON body just over it was cut and
      answered '400 malformed JSON'. We read one byte past the limit to tell the two apart.
    - time: gunicorn's socket has no timeout, so a client that stopped sending its body (a wrong Content-Length,
      a dead peer, a slowloris) held a request thread for ever; QUEUE_SIZE + 9 of them froze the worker, /health
      included. Now a body that stalls for ``timeout`` seconds is answered 408 and the thread is free again.
    """
    environ = request.environ
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    if not environ.get("wsgi.input_terminated"):  # not gunicorn (e.g. the test client): Werkzeug bounds the stream
        raw = request.stream.read(limit + 1)
        if len(raw) > limit:
            raise _too_large(limit)
        return raw
    sock = environ.get("gunicorn.socket")
    previous = sock.gettimeout() if sock is not None else None
    try:
        if sock is not None:
            sock.settimeout(timeout)  # per read; restored before the response goes out
        raw = environ["wsgi.input"].read(limit + 1)  # gunicorn stops at Content-Length or the last chunk
    except TimeoutError:
        _stop_reading(sock)
        raise ApiError(408, f"the request body stopped arriving (nothing for {timeout:g} s)",
                       code="body_timeout") from None
    except _MALFORMED as e:
        _stop_reading(sock)
        raise ApiError(400, f"malformed request body: {type(e).__name__} ({str(e)[:100]})",
                       code="malformed_body") from None
    finally:
        if sock is not None:
            try:
                sock.settimeout(previous)
            except OSError:
                pass
    if len(raw) > limit:
        raise _too_large(limit)
    return raw


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")


def _stop_reading(sock) -> None:
    """The rest of the body will never be read: no drain after the error answer, the connection closes."""
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass


def read_json_object(body_timeout: float, limit: int) -> dict:
    if not request.is_json:
        raise ApiError(415, "send a JSON body with 'Content-Type: application/json'", code="unsupported_media_type")
    return _parse_json(_read_body(limit, body_timeout))


def _parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not valid UTF-8", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the JSON body is nested too deeply", code="invalid_json") from None
    except ValueError as e:
        raise ApiError(400, f"malformed JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object", code="invalid_json")
    return body




def read_upload(body_timeout: float, limit: int, file_key: str = "file") -> tuple[dict[str, str], bytes | None]:
    """A form with one audio file: multipart/form-data (the file as ``file_key``), or a JSON object with the file
    base64-encoded under ``file_key`` (or "audio"). -> (the other fields as strings, the file's bytes or None)."""
    if request.is_json:
        body = _parse_json(_read_body(limit, body_timeout))
        encoded = body.pop(file_key, None)
        if encoded is None:
            encoded = body.pop("audio", None)
        fields = {}
        for key, value in body.items():
            if value is not None and not isinstance(value, str):
                raise ApiError(400, f"'{key}' must be a string", code=f"invalid_{key}", param=key)
            if value is not None:
                fields[key] = value
        if encoded is None:
            return fields, None
        if not isinstance(encoded, str):
            raise ApiError(400, f"'{file_key}' must be base64 text", code="invalid_audio", param=file_key)
        try:
            return fields, base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"'{file_key}' is not valid base64", code="invalid_audio", param=file_key) from None
    if request.mimetype != "multipart/form-data":
        raise ApiError(415, "send multipart/form-data with the audio as 'file', or a JSON body with it base64-encoded",
                       code="unsupported_media_type")
    raw = _read_body(limit, body_timeout)
    environ = {**request.environ, "wsgi.input": io.BytesIO(raw), "CONTENT_LENGTH": str(len(raw))}
    environ.pop("HTTP_TRANSFER_ENCODING", None)
    try:
        _, form, files = parse_form_data(environ, max_content_length=limit, silent=False)
    except ValueError as e:
        raise ApiError(400, f"malformed multipart body: {str(e)[:100]}", code="malformed_body") from None
    upload = files.get(file_key)
    return {key: form[key] for key in form}, upload.read() if upload is not None else None


def client_gone_check(environ):
    """A cheap test of whether the client hung up: its socket reads EOF. (gunicorn exposes the socket.)"""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return lambda: False

    def gone() -> bool:
        try:  # poll first: the socket may have a timeout (WRITE_TIMEOUT), and a recv would then wait for it
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
            if not poller.poll(0):
                return False
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError, TimeoutError):
            return False
        except (OSError, ValueError):
            return True
    return gone
