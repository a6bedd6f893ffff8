"""Settings: defaults of the spec, one clear line naming a bad variable, secrets never shown."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import SettingsError
from common.settings import Settings, mask_url


def test_defaults_match_the_spec() -> None:
    s = Settings.from_env({}, dotenv=None)
    assert (s.send_interval_seconds, s.send_batch_size, s.gateway_port) == (120, 2, 8080)
    assert (s.mysql_host, s.mysql_port, s.mysql_user, s.mysql_database) == ("127.0.0.1", 3306, "root", "message_sender")
    assert s.delivery_guarantee == "at-most-once"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SEND_BATCH_SIZE", "two"),
        ("SEND_BATCH_SIZE", "0"),
        ("MYSQL_PORT", "70000"),
        ("SEND_INTERVAL_SECONDS", "-1"),
        ("DELIVERY_GUARANTEE", "exactly-once"),
        ("WEBHOOK_URL", "not a url"),
        ("LOG_FORMAT", "xml"),
        ("AMQP_URL", "http://x"),
        ("MYSQL_DATABASE", "bad name;"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({name: value}, dotenv=None)
    text = str(err.value)
    assert text.startswith(f"{name}=") and "\n" not in text


def test_secrets_never_in_repr_or_errors() -> None:
    s = Settings.from_env(
        {
            "MYSQL_PASSWORD": "hunter2",
            "API_TOKEN": "tok-secret",
            "WEBHOOK_AUTH_KEY": "k-secret",
            "AMQP_URL": "amqp://u:pw-secret@h:5672/",
        },
        dotenv=None,
    )
    shown = repr(s) + str(s)
    for secret in ("hunter2", "tok-secret", "k-secret", "pw-secret"):
        assert secret not in shown
    assert s.api_token.reveal() == "tok-secret"
    assert mask_url("amqp://u:pw-secret@h:5672/") == "amqp://u:***@h:5672/"
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"REDIS_URL": "ftp://u:pw-secret@h"}, dotenv=None)
    assert "pw-secret" not in str(err.value)


def test_dotenv_is_read_and_environment_wins(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("# comment\nSEND_BATCH_SIZE=7\nexport GATEWAY_PORT='9000'\n")
    s = Settings.from_env({"GATEWAY_PORT": "9100"}, dotenv=dotenv)
    assert (s.send_batch_size, s.gateway_port) == (7, 9100)


NUMERIC = [f.name.upper() for f in dataclasses.fields(Settings) if f.type in ("int", "float") or f.type in (int, float)]


def test_every_numeric_setting_is_covered() -> None:
    assert {"CLAIM_LEASE_SECONDS", "SEND_INTERVAL_SECONDS", "CACHE_TTL_SECONDS", "SEND_BATCH_SIZE"} <= set(NUMERIC)


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("value", ["inf", "-inf", "Infinity", "nan", "1e400", "1e30", "10**9"])
def test_infinite_nan_and_huge_numbers_are_refused(name: str, value: str) -> None:
    """``inf`` passed a lower bound, then the producer died with an OverflowError: every numeric setting has
    an upper bound and refuses non-finite values, with one line naming the variable."""
    with pytest.raises(SettingsError) as err:
        Settings.from_env({name: value}, dotenv=None)
    text = str(err.value)
    assert text.startswith(f"{name}={value!r} is invalid: must be") and "\n" not in text


@pytest.mark.parametrize(
    ("name", "value"),
    [("CLAIM_LEASE_SECONDS", "604800"), ("SEND_INTERVAL_SECONDS", "86400"), ("CACHE_TTL_SECONDS", "315360000")],
)
def test_the_upper_bounds_themselves_are_accepted(name: str, value: str) -> None:
    s = Settings.from_env({name: value}, dotenv=None)
    assert getattr(s, name.lower()) == float(value)


@pytest.mark.parametrize("service", ["producer", "consumer", "gateway"])
def test_a_service_started_with_an_infinite_setting_stops_with_one_line(service: str) -> None:
    env = {**os.environ, "CLAIM_LEASE_SECONDS": "inf", "SEND_INTERVAL_SECONDS": "5"}
    proc = subprocess.run(
        [sys.executable, "-m", service], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"{service}: CLAIM_LEASE_SECONDS='inf' is invalid: must be a finite number > 0 and <= 604800"
    ]
