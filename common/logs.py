"""Logging setup: JSON lines for containers, readable text on a terminal. Called only from ``main()``.

Fields passed with ``extra=`` become JSON fields (``message_id``, ``method``, ``status``...). Every line
is valid JSON whatever it carries (exceptions, odd extras, a broken ``%`` format). As a safety net the
configured secrets (:func:`secrets_of`) are replaced by ``***`` in every line, wherever they appear.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from collections.abc import Iterable
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

from common.settings import Secret, Settings

# Attributes every LogRecord has; anything else passed through ``extra=`` is emitted as a field.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
MASK = "***"
MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary words; such a secret is weak anyway


def secrets_of(settings: Settings) -> list[str]:
    """Every configured secret value: the ``Secret`` settings and the passwords inside the URLs."""
    found: list[str] = []
    for value in vars(settings).values():
        if not isinstance(value, Secret) or not value:
            continue
        raw = value.reveal()
        if "://" not in raw:
            found.append(raw)
        elif password := urlsplit(raw).password:
            found += [password, unquote(password)]
    return found


class _Redactor:
    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so that a secret containing another is masked whole.
        self.secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self.secrets:  # a handful of substring searches: cheap next to the formatting itself
            if secret in value:
                value = value.replace(secret, MASK)
        return value

    def value(self, value: Any) -> Any:
        if not self.secrets:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, bool | int | float) or value is None:
            return value
        if isinstance(value, dict):
            return {self.text(str(k)): self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(v) for v in value]
        return self.text(str(value))


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a bad %-format must not turn into a non-JSON "--- Logging error ---" on stderr
        return f"{record.msg!s} (unformattable arguments: {record.args!r})"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields, exception text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.redact = _Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
        }
        for key, value in _extras(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        entry = self.redact.value(entry)
        try:
            return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except (TypeError, orjson.JSONEncodeError):  # e.g. an int beyond 64 bits: everything as text
            return orjson.dumps({k: v if isinstance(v, str) else str(v) for k, v in entry.items()}).decode()


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` for people."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        self.redact = _Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        record.message = _message(record)
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        extras = [f"{k}={v}" for k, v in _extras(record).items()]
        if extras:
            text = f"{text} {' '.join(extras)}"
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        return self.redact.text(text)


def setup_logging(level: str = "INFO", fmt: str = "text", secrets: Iterable[str] = ()) -> None:
    """Send every log record to stderr in the chosen format, with ``secrets`` masked; route Python
    warnings and uncaught exceptions through it too (so a JSON log stays JSON); quiet chatty libraries."""
    secrets = list(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets) if fmt == "json" else TextFormatter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiormq", "aio_pika", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # The AMQP client logs every lost connection with a traceback and retries with ERROR lines every
    # few seconds; common.topology logs the outage once (lost, then reconnected) instead.
    for amqp in ("aiormq", "aio_pika"):
        logging.getLogger(amqp).setLevel(logging.CRITICAL)
    logging.captureWarnings(True)

    def excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, exc, tb)
            return
        logging.getLogger("uncaught").critical("uncaught %s: %s", kind.__name__, exc, exc_info=(kind, exc, tb))

    sys.excepthook = excepthook
