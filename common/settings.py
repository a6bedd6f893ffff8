"""One settings object for every service, built once in ``main()`` from the environment (and ``.env``).

Every variable of the product spec (section 6) is here with its default. A missing or malformed value
raises :class:`~common.errors.SettingsError` whose message is one line naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from common.errors import SettingsError

T = TypeVar("T")

DELIVERY_GUARANTEES = ("at-most-once", "at-least-once")
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
AMQP_QUEUE_TYPES = ("classic", "quorum")


class Secret(str):
    """A string that never shows its value in a repr, a log line or an f-string of the settings."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"

    def reveal(self) -> str:
        return str.__str__(self)


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a ``.env`` file: ``KEY=value`` lines, ``#`` comments, optional quotes, optional ``export``."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _int(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if value < lo or (hi is not None and value > hi):
            raise ValueError(f"must be between {lo} and {hi}" if hi is not None else f"must be >= {lo}")
        return value

    return parse


def _float(lo: float, strict: bool = False) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw)
        if value != value or value < lo or (strict and value == lo):
            raise ValueError(f"must be {'>' if strict else '>='} {lo:g}")
        return value

    return parse


def _choice(options: tuple[str, ...], upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().upper() if upper else raw.strip().lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        parts = urlsplit(raw.strip())
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"must be a {'/'.join(schemes)} URL with a host")
        return raw.strip()

    return parse


def _text(raw: str) -> str:
    return raw


@dataclass(frozen=True)
class Settings:
    mysql_host: str = "127.0.0.1"
    mysql_port: int = 3306
    mysql_user: str = "root"
    mysql_password: Secret = Secret("")
    mysql_database: str = "message_sender"
    redis_url: Secret = Secret("redis://127.0.0.1:6379/0")
    redis_prefix: str = ""
    amqp_url: Secret = Secret("amqp://guest:guest@127.0.0.1:5672/")
    amqp_queue_type: str = "classic"
    webhook_url: str = "http://127.0.0.1:8081/webhook"
    webhook_auth_key: Secret = Secret("")
    webhook_timeout_seconds: float = 10.0
    send_interval_seconds: float = 120.0
    send_batch_size: int = 2
    max_attempts: int = 5
    retry_base_seconds: float = 5.0
    claim_lease_seconds: float = 300.0
    leader_lease_seconds: float = 10.0
    delivery_guarantee: str = "at-most-once"
    consumer_prefetch: int = 8
    consumer_concurrency: int = 64
    shutdown_timeout_seconds: float = 30.0
    gateway_host: str = "0.0.0.0"
    gateway_port: int = 8080
    api_token: Secret = Secret("")
    producer_metrics_port: int = 9101
    consumer_metrics_port: int = 9102
    cache_ttl_seconds: int = 604800
    log_level: str = "INFO"
    log_format: str = "text"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")) -> Settings:
        """Build settings from ``env`` (default: ``os.environ``) over the values of ``dotenv``."""
        merged: dict[str, str] = read_dotenv(dotenv) if dotenv is not None else {}
        merged.update(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.name.upper()
            raw = merged.get(name)
            if raw is None:
                continue
            parser = _PARSERS.get(f.name, _text)
            try:
                value = parser(raw)
            except ValueError as exc:
                shown = "***" if f.type == "Secret" else repr(raw)
                raise SettingsError(f"{name}={shown} is invalid: {exc}") from None
            values[f.name] = Secret(value) if f.type == "Secret" else value
        return cls(**values)

    @property
    def is_at_least_once(self) -> bool:
        return self.delivery_guarantee == "at-least-once"


_PARSERS: dict[str, Callable[[str], Any]] = {
    "mysql_port": _int(1, 65535),
    "mysql_database": lambda raw: _identifier(raw),
    "mysql_host": lambda raw: _nonempty(raw),
    "mysql_user": lambda raw: _nonempty(raw),
    "redis_url": _url(("redis", "rediss", "unix")),
    "amqp_url": _url(("amqp", "amqps")),
    "amqp_queue_type": _choice(AMQP_QUEUE_TYPES),
    "webhook_url": _url(("http", "https")),
    "webhook_timeout_seconds": _float(0, strict=True),
    "send_interval_seconds": _float(0, strict=True),
    "send_batch_size": _int(1, 100_000),
    "max_attempts": _int(1, 1000),
    "retry_base_seconds": _float(0),
    "claim_lease_seconds": _float(0, strict=True),
    "leader_lease_seconds": _float(1, strict=True),
    "delivery_guarantee": _choice(DELIVERY_GUARANTEES),
    "consumer_prefetch": _int(1, 65535),
    "consumer_concurrency": _int(1, 100_000),
    "shutdown_timeout_seconds": _float(0),
    "gateway_port": _int(0, 65535),
    "producer_metrics_port": _int(0, 65535),
    "consumer_metrics_port": _int(0, 65535),
    "cache_ttl_seconds": _int(0),
    "log_level": _choice(LOG_LEVELS, upper=True),
    "log_format": _choice(LOG_FORMATS),
}


def _nonempty(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw.strip()


def _identifier(raw: str) -> str:
    value = raw.strip()
    if not value or len(value) > 64 or not all(c.isalnum() or c in "_$" for c in value):
        raise ValueError("must be 1-64 letters, digits, _ or $")
    return value
