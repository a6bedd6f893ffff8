"""``python -m consumer``: deliver dispatched messages to the webhook."""

import asyncio

from common.service import run_service
from common.settings import Settings
from consumer.service import Consumer


async def _run(settings: Settings, stop: asyncio.Event) -> None:
    await Consumer(settings).run(stop)


def main() -> None:
    run_service("consumer", _run)


if __name__ == "__main__":
    main()
