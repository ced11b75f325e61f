"""Every error answer is JSON {"error": {"message", "type", "param", "code"}} (the OpenAI shape), made here."""
from __future__ import annotations

import logging
import re

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("cosyvoice_lite")


class ApiError(Exception):
    """An error answer. ``message`` is shown to the client; ``extra`` keys are added to the error object."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}
        self.extra = extra




_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
                415: "invalid_request_error", 500: "server_error", 503: "overloaded_error", 504: "timeout_error"}


def error_response(status: int, message: str, code: str, param: str | None = None, headers: dict | None = None,
                   **extra) -> Response:
    rec = g.get("rec")
    if rec is not None:
        rec.error = code  # for the request's log line
    body = {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
            "code": code, **extra}
    response = jsonify({"error": body})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(e: ApiError):
        return error_response(e.status, e.message, e.code, e.param, e.headers, **e.extra)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}
        messages = {404: f"no such endpoint: {request.path} (see /openapi.json)",
                    405: f"{request.method} is not allowed on {request.path}",
                    413: f"request body is larger than {app.config['MAX_CONTENT_LENGTH']} bytes"}
        headers = {"Allow": ", ".join(e.valid_methods)} if getattr(e, "valid_methods", None) else None
        return error_response(e.code or 500, messages.get(e.code, e.description or e.name),
                              code.get(e.code, re.sub(r"\W+", "_", e.name.lower())), headers=headers)

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        rec = g.get("rec")
        log.exception("unhandled error (request %s)", rec.id if rec else "-")
        return error_response(500, f"internal error (request id {rec.id if rec else '-'}); see the server log",
                              "internal_error")
