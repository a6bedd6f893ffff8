"""Logging setup: JSON lines for containers, readable text on a terminal. Called only from ``main()``.

Fields passed with ``extra=`` become JSON fields (``message_id``, ``method``, ``status``...). Every line
is valid JSON whatever it carries (exceptions, odd extras, a broken ``%`` format). As a safety net the
configured secrets (:func:`secrets_of`) are replaced by ``***`` in every line, wherever they appear.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import orjson

from common.settings import MASK, SHOWN_PATH_CHARS, Secret, Settings, mask_webhook_url

# Attributes every LogRecord has; anything else passed through ``extra=`` is emitted as a field.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
BARE_CAPABILITY_MIN = 8  # a webhook path is also scrubbed without its leading "/" from this length (a uuid)


def secrets_of(settings: Settings) -> dict[str, str]:
    """Every configured secret value, mapped to what replaces it in a log line: the ``Secret`` settings and
    the passwords inside their URLs become ``***``; the webhook URL (a capability) and its path keep their
    first characters (:func:`~common.settings.mask_webhook_url`)."""
    found: dict[str, str] = {}
    for name, value in vars(settings).items():
        if not isinstance(value, Secret) or not value:
            continue
        raw = value.reveal()
        if name == "webhook_url":
            found.update(_webhook_secrets(raw))
        elif "://" not in raw:
            found[raw] = MASK
        if "://" in raw and (password := urlsplit(raw).password):
            found[password] = found[unquote(password)] = MASK
    return found


def _webhook_secrets(url: str) -> dict[str, str]:
    parts = urlsplit(url)
    found = {url: mask_webhook_url(url)}
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    for variant in {tail, parts.path, quote(unquote(parts.path))}:
        if len(variant) > SHOWN_PATH_CHARS:
            found[variant] = variant[:SHOWN_PATH_CHARS] + MASK
            bare = variant.lstrip("/")
            if len(bare) >= BARE_CAPABILITY_MIN:
                found[bare] = bare[: SHOWN_PATH_CHARS - 1] + MASK
    return found


class _Redactor:
    def __init__(self, secrets: Iterable[str] | Mapping[str, str]) -> None:
        pairs = secrets.items() if isinstance(secrets, Mapping) else ((s, MASK) for s in secrets)
        # Every secret whatever its length, longest first, so that a secret containing another is masked whole.
        self.secrets = sorted(((s, r) for s, r in pairs if s), key=lambda pair: len(pair[0]), reverse=True)

    def text(self, value: str) -> str:
        for secret, replacement in self.secrets:  # a handful of substring searches: cheap next to formatting
            if secret in value:
                value = value.replace(secret, replacement)
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

    def __init__(self, secrets: Iterable[str] | Mapping[str, str] = ()) -> None:
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

    def __init__(self, secrets: Iterable[str] | Mapping[str, str] = ()) -> None:
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


def setup_logging(level: str = "INFO", fmt: str = "text", secrets: Iterable[str] | Mapping[str, str] = ()) -> None:
    """Send every log record to stderr in the chosen format, with ``secrets`` masked; route Python
    warnings and uncaught exceptions through it too (so a JSON log stays JSON); quiet chatty libraries."""
    secrets = dict(secrets) if isinstance(secrets, Mapping) else list(secrets)
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
