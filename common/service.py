"""What every service's ``main()`` does: settings, logging, uvloop, signals, run until told to stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

from common import tracing
from common.errors import SettingsError
from common.logs import secrets_of, setup_logging
from common.settings import Settings

log = logging.getLogger(__name__)


def load_settings(name: str) -> Settings:
    """Settings from the environment, or exit 2 with one line naming the bad variable."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_service(name: str, body: Callable[[Settings, asyncio.Event], Awaitable[None]]) -> None:
    """Run ``body(settings, stop)`` until it returns; SIGTERM/SIGINT set ``stop`` (a second one kills)."""
    settings = load_settings(name)
    setup_logging(settings.log_level, settings.log_format, secrets_of(settings))
    if tracing.setup(name):
        log.info("tracing on: spans exported to %s", os.environ.get(tracing.ENDPOINT_VAR))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            if stop.is_set():
                log.warning("%s again: exiting now", sig.name)
                raise SystemExit(1)
            log.info("%s received: shutting down", sig.name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        await body(settings, stop)

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        try:
            runner.run(main())
        except SettingsError as exc:  # found only once connected (e.g. AMQP_QUEUE_TYPE against an existing queue)
            log.error("%s", exc)
            print(f"{name}: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        finally:
            tracing.shutdown()
    log.info("%s stopped", name)
