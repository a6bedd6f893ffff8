"""One settings object for every service, built once in ``main()`` from the environment (and ``.env``).

Every variable of the product spec (section 6) is here with its default. A missing or malformed value
raises :class:`~common.errors.SettingsError` whose message is one line naming the variable.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from common.errors import SettingsError

T = TypeVar("T")

MASK = "***"
SHOWN_PATH_CHARS = 5  # of a webhook URL's path in logs: "/0b7e***", "/webh***"
MIN_API_TOKEN_LENGTH = 16
LOOPBACK_NAMES = ("localhost",)

DELIVERY_GUARANTEES = ("at-most-once", "at-least-once")
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
AMQP_QUEUE_TYPES = ("classic", "quorum")


class Secret:
    """A secret setting. Not a ``str``: ``str()``, ``repr()``, f-strings and ``%`` formatting all give ``***``,
    so no log line, error or banner can show it by accident; :meth:`reveal` is the one way to the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str = "") -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __len__(self) -> int:
        return len(self._value)

    def __str__(self) -> str:
        return MASK if self._value else ""

    def __repr__(self) -> str:
        return f"Secret({MASK!r})" if self._value else "Secret('')"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __reduce__(self) -> Any:  # pickling would be one more way out
        raise TypeError("a Secret cannot be pickled")


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", f":{MASK}@", 1)
    return parts._replace(netloc=netloc).geturl()


def mask_webhook_url(url: str) -> str:
    """A webhook URL as logs and banners show it: scheme, host and port, and the first
    :data:`SHOWN_PATH_CHARS` characters of the path; the rest (a webhook.site URL's path is a capability:
    whoever has it reads every message), the query, the fragment and any user or password become ``***``."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    if parts.username is not None or parts.password is not None:
        host = f"{MASK}@{host}"
    path = parts.path or "/"
    hidden = len(path) > SHOWN_PATH_CHARS or parts.query or parts.fragment
    return f"{parts.scheme}://{host}{path[:SHOWN_PATH_CHARS]}{MASK if hidden else ''}"


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
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("must be a whole number") from None
        if value < lo or (hi is not None and value > hi):
            raise ValueError(f"must be between {lo} and {hi}" if hi is not None else f"must be >= {lo}")
        return value

    return parse


def _float(lo: float, strict: bool = False, hi: float | None = None) -> Callable[[str], float]:
    """A finite number of seconds, ``>= lo`` (``> lo`` when ``strict``) and ``<= hi``. Infinities and NaN
    are refused whatever the bounds: ``inf`` would pass a lower bound, then overflow a ``timedelta`` or a
    timer deep inside a service."""
    above = f"{'>' if strict else '>='} {lo:g}"
    wanted = f"must be a finite number {above}" + (f" and <= {hi:g}" if hi is not None else "")

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(wanted) from None
        if not math.isfinite(value) or value < lo or (strict and value == lo) or (hi is not None and value > hi):
            raise ValueError(wanted)
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
    webhook_url: Secret = Secret("http://127.0.0.1:8081/webhook")  # a capability: see mask_webhook_url
    webhook_auth_key: Secret = Secret("")
    webhook_timeout_seconds: float = 10.0
    webhook_signing_secrets: Secret = Secret("")  # "whsec_<base64> ..." (see signing_keys)
    webhook_rate_limit_per_second: float = 0.0  # requests/s to the webhook across all consumers (0 = no limit)
    webhook_breaker_failure_ratio: float = 0.0  # share of failures that opens the breaker (0 = no breaker)
    webhook_breaker_min_requests: int = 20
    webhook_breaker_window_seconds: int = 30
    webhook_breaker_cooldown_seconds: float = 30.0
    webhook_fallback_url: Secret = Secret("")  # used while the primary's breaker is open (empty: none)
    webhook_fallback_auth_key: Secret = Secret("")
    send_interval_seconds: float = 120.0
    send_batch_size: int = 2
    max_attempts: int = 5
    retry_base_seconds: float = 5.0
    claim_lease_seconds: float = 300.0
    leader_lease_seconds: float = 10.0
    retention_days: float = 0.0
    delivery_guarantee: str = "at-most-once"
    consumer_prefetch: int = 8
    consumer_concurrency: int = 64
    shutdown_timeout_seconds: float = 30.0
    gateway_host: str = "127.0.0.1"  # this machine only; containers set 0.0.0.0 (see is_loopback)
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
    def signing_keys(self) -> list[bytes]:
        """The decoded keys of ``WEBHOOK_SIGNING_SECRETS``, in the order given (validated at start)."""
        return [_signing_key(part) for part in self.webhook_signing_secrets.reveal().split()]

    @property
    def is_at_least_once(self) -> bool:
        return self.delivery_guarantee == "at-least-once"

    @property
    def gateway_is_local(self) -> bool:
        """Whether the gateway listens on loopback only (no other machine can reach it)."""
        return is_loopback(self.gateway_host)


def is_loopback(host: str) -> bool:
    """``127.0.0.1``, ``::1``, ``localhost``...; a wildcard (``0.0.0.0``, ``::``, empty) or any other name or
    address is reachable from elsewhere."""
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _api_token(raw: str) -> str:
    if raw and len(raw) < MIN_API_TOKEN_LENGTH:
        raise ValueError(
            f"must be at least {MIN_API_TOKEN_LENGTH} characters (got {len(raw)}); "
            "e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    if any(c.isspace() or not c.isprintable() for c in raw) or not raw.isascii():
        raise ValueError("must be printable ASCII without spaces (it is sent as 'Authorization: Bearer <token>')")
    return raw


# Upper bounds of the durations: far above any sensible value, low enough that no timer, timedelta or
# Redis TTL built from them overflows.
HOUR = 3600
DAY = 24 * HOUR

_PARSERS: dict[str, Callable[[str], Any]] = {
    "mysql_port": _int(1, 65535),
    "mysql_database": lambda raw: _identifier(raw),
    "mysql_host": lambda raw: _nonempty(raw),
    "mysql_user": lambda raw: _nonempty(raw),
    "redis_url": _url(("redis", "rediss", "unix")),
    "amqp_url": _url(("amqp", "amqps")),
    "amqp_queue_type": _choice(AMQP_QUEUE_TYPES),
    "webhook_url": _url(("http", "https")),
    "api_token": _api_token,
    "webhook_timeout_seconds": _float(0, strict=True, hi=HOUR),
    "webhook_signing_secrets": lambda raw: _signing_secrets(raw),
    "webhook_fallback_url": lambda raw: _url(("http", "https"))(raw) if raw.strip() else "",
    "webhook_rate_limit_per_second": _float(0, hi=100_000),
    "webhook_breaker_failure_ratio": _float(0, hi=1),
    "webhook_breaker_min_requests": _int(1, 1_000_000),
    "webhook_breaker_window_seconds": _int(1, HOUR),
    "webhook_breaker_cooldown_seconds": _float(0, strict=True, hi=DAY),
    "send_interval_seconds": _float(0, strict=True, hi=DAY),
    "send_batch_size": _int(1, 100_000),
    "max_attempts": _int(1, 1000),
    "retry_base_seconds": _float(0, hi=HOUR),
    "claim_lease_seconds": _float(0, strict=True, hi=7 * DAY),
    "leader_lease_seconds": _float(1, strict=True, hi=HOUR),
    "retention_days": _float(0, hi=36500),
    "delivery_guarantee": _choice(DELIVERY_GUARANTEES),
    "consumer_prefetch": _int(1, 65535),
    "consumer_concurrency": _int(1, 100_000),
    "shutdown_timeout_seconds": _float(0, hi=HOUR),
    "gateway_port": _int(0, 65535),
    "producer_metrics_port": _int(0, 65535),
    "consumer_metrics_port": _int(0, 65535),
    "cache_ttl_seconds": _int(0, 10 * 365 * DAY),
    "log_level": _choice(LOG_LEVELS, upper=True),
    "log_format": _choice(LOG_FORMATS),
}


SIGNING_PREFIX = "whsec_"


def _signing_key(part: str) -> bytes:
    """The key of one ``whsec_<base64>`` secret (the Standard Webhooks form); ValueError without the value."""
    if not part.startswith(SIGNING_PREFIX):
        raise ValueError(f"each secret must look like {SIGNING_PREFIX}<base64>")
    try:
        key = base64.b64decode(part.removeprefix(SIGNING_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the part after {SIGNING_PREFIX} must be base64") from None
    if len(key) < 16:
        raise ValueError("each secret must hold at least 16 bytes (24 base64 characters)")
    return key


def _signing_secrets(raw: str) -> str:
    """Secrets separated by spaces, so a new one can be added before the old one is removed (rotation)."""
    for part in raw.split():
        _signing_key(part)
    return " ".join(raw.split())


def _nonempty(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw.strip()


def _identifier(raw: str) -> str:
    value = raw.strip()
    if not value or len(value) > 64 or not all(c.isalnum() or c in "_$" for c in value):
        raise ValueError("must be 1-64 letters, digits, _ or $")
    return value
