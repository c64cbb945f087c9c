"""The server's logging, configured in one place for the app and uvicorn alike (`configure_logging`).

Two formats (`log_format`): `text`, one readable line per record for a terminal,
`2026-05-10 09:14:03,512 INFO saliency.access: 127.0.0.1:50412 POST /v1/models/vit/predict 200 41.3ms model=vit
[request_id=5f0c...]`; `json`, one JSON object per line for log collectors, with `timestamp` (ISO 8601, UTC),
`level`, `logger`, `message`, `request_id` (inside a request) and the record's `extra` fields as top-level keys (the
access line's `model`, `status`, `duration_ms`...). uvicorn's own records (start-up, errors) go through the same
handler; its access log is off: the app writes one line per request itself (`service.http.observation`)."""

from __future__ import annotations

import logging
import logging.config
from datetime import UTC, datetime
from typing import Any, Literal

from asgi_correlation_id import correlation_id
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]

# Record attributes that are not the record's data: uvicorn's coloured copy of its message, asyncio's task name.
_NOT_FIELDS = (*RESERVED_ATTRS, "color_message", "taskName")


def _request_id(record: logging.LogRecord) -> str | None:
    """The id of the request the record was written for: its own `request_id` field, else the current request's."""
    return getattr(record, "request_id", None) or correlation_id.get()


class TextLogFormatter(logging.Formatter):
    """`asctime level logger: message`, with ` [request_id=...]` after the message inside a request."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        request_id = _request_id(record)
        return f"{line} [request_id={request_id}]" if request_id else line


class JsonLogFormatter(JsonFormatter):
    """One JSON object per record: timestamp, level, logger, message, request_id (inside a request), then the
    record's extra fields as top-level keys (and `exc_info` with the traceback of an exception)."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s %(message)s", rename_fields={"levelname": "level", "name": "logger"},
                         reserved_attrs=_NOT_FIELDS)

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["timestamp"] = datetime.fromtimestamp(record.created, tz=UTC).isoformat(
            timespec="milliseconds")
        super().add_fields(log_data, record, message_dict)
        request_id = _request_id(record)
        if request_id:
            log_data["request_id"] = request_id
        else:
            log_data.pop("request_id", None)


def python_level(level: str) -> str:
    """The logging level of a `log_level` setting (uvicorn's `trace` is below debug: the app logs at debug then)."""
    return "DEBUG" if level.lower() == "trace" else level.upper()


def logging_config(level: str = "info", fmt: LogFormat = "text") -> dict[str, Any]:
    """The `logging.config.dictConfig` of the server: one stderr handler on the root logger with the format's
    formatter; uvicorn's loggers hand their records to it, and its access logger is silenced."""
    formatter = JsonLogFormatter if fmt == "json" else TextLogFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default",
                                 "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["default"], "level": python_level(level)},
        "loggers": {
            # uvicorn's records through the root's handler (its default config gives them their own)
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            # the app's `saliency.access` line replaces uvicorn's access line
            "uvicorn.access": {"handlers": [], "propagate": False},
            # its warning for every refused client X-Request-ID would let clients fill the log
            "asgi_correlation_id": {"level": "ERROR"},
        },
    }


def configure_logging(level: str = "info", fmt: LogFormat = "text") -> dict[str, Any]:
    """Apply `logging_config(level, fmt)` and return it, for uvicorn's `log_config` (uvicorn applies it again when
    it starts, so its own records get the same handler)."""
    config = logging_config(level, fmt)
    logging.config.dictConfig(config)
    return config
