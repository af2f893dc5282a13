"""Log output of the ``pgpubsub`` command: text for people, JSON lines for collectors.

JSON records carry ``time`` (ISO 8601, UTC, milliseconds), ``level``,
``logger``, ``message``, ``process``, every structured field the library
attached (``channel``, ``message_id``, ``attempt``, ``handler``, ...) and
``exc`` with the traceback when there is one.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

__all__ = ["LEVELS", "setup"]

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# The attributes every LogRecord has: anything else was passed with ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def iso_utc(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        data.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return iso_utc(record.created)


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
