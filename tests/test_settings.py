"""Settings: defaults of the spec, one clear line naming a bad variable, secrets never shown."""

import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import SettingsError
from common.settings import Secret, Settings, is_loopback, mask_url, mask_webhook_url


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
            "API_TOKEN": "tok-secret-0123456789",
            "WEBHOOK_AUTH_KEY": "k-secret",
            "AMQP_URL": "amqp://u:pw-secret@h:5672/",
        },
        dotenv=None,
    )
    shown = repr(s) + str(s)
    for secret in ("hunter2", "tok-secret", "k-secret", "pw-secret"):
        assert secret not in shown
    assert s.api_token.reveal() == "tok-secret-0123456789"
    assert mask_url("amqp://u:pw-secret@h:5672/") == "amqp://u:***@h:5672/"
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"REDIS_URL": "ftp://u:pw-secret@h"}, dotenv=None)
    assert "pw-secret" not in str(err.value)


def test_dotenv_is_read_and_environment_wins(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("# comment\nSEND_BATCH_SIZE=7\nexport GATEWAY_PORT='9000'\n")
    s = Settings.from_env({"GATEWAY_PORT": "9100"}, dotenv=dotenv)
    assert (s.send_batch_size, s.gateway_port) == (7, 9100)


def test_a_secret_is_no_string_and_formats_as_stars() -> None:
    secret = Secret("hunter2-hunter2")
    assert not isinstance(secret, str)
    for shown in (str(secret), repr(secret), f"{secret}", f"{secret!s:>20}", "%s" % (secret,), "{0}".format(secret)):  # noqa: UP030, UP031, UP032
        assert "hunter2" not in shown
    assert secret.reveal() == "hunter2-hunter2" and secret and not Secret("") and str(Secret("")) == ""
    assert secret == Secret("hunter2-hunter2") and secret != "hunter2-hunter2"
    with pytest.raises(TypeError):
        pickle.dumps(secret)


@pytest.mark.parametrize(
    "token", ["short", "fifteen-chars-x", "sixteen chars ok", "tab\tin-the-token-xx", "çok-gizli-anahtar-1"]
)
def test_api_token_must_be_16_printable_characters(token: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"API_TOKEN": token}, dotenv=None)
    text = str(err.value)
    assert text.startswith("API_TOKEN=*** is invalid") and token not in text and "\n" not in text


def test_a_token_of_16_characters_or_none_is_fine() -> None:
    assert Settings.from_env({"API_TOKEN": "x" * 16}, dotenv=None).api_token.reveal() == "x" * 16
    assert not Settings.from_env({"API_TOKEN": ""}, dotenv=None).api_token


def test_the_gateway_listens_on_this_machine_only_by_default() -> None:
    assert Settings.from_env({}, dotenv=None).gateway_host == "127.0.0.1"
    local = ["127.0.0.1", "::1", "[::1]", "localhost", "127.8.0.1"]
    reachable = ["0.0.0.0", "::", "", "192.0.2.7", "gateway"]
    for host in local + reachable:
        assert is_loopback(host) is (host in local), host


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://webhook.site/0b7e2c1a-1111-4222-8333-944445555666", "https://webhook.site/0b7e***"),
        ("http://127.0.0.1:8081/webhook", "http://127.0.0.1:8081/webh***"),
        ("https://user:pw@hooks.example/in?key=abc#x", "https://***@hooks.example/in***"),
        ("https://hooks.example", "https://hooks.example/"),
        ("http://[::1]:9000/a", "http://[::1]:9000/a"),
    ],
)
def test_webhook_url_is_shown_up_to_the_first_characters_of_its_path(url: str, shown: str) -> None:
    assert mask_webhook_url(url) == shown
    settings = Settings.from_env({"WEBHOOK_URL": url}, dotenv=None)
    assert settings.webhook_url.reveal() == url and url not in repr(settings)


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
