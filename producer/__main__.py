"""``python -m producer``: claim due messages every interval and publish them to RabbitMQ."""

import asyncio

from common.service import run_service
from common.settings import Settings
from producer.service import Producer


async def _run(settings: Settings, stop: asyncio.Event) -> None:
    await Producer(settings).run(stop)


def main() -> None:
    run_service("producer", _run)


if __name__ == "__main__":
    main()
