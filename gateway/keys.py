"""Typed application keys: every resource the gateway's handlers reach through ``request.app``."""

from __future__ import annotations

import aio_pika.abc
import aiomysql
import redis.asyncio as redis
from aiohttp import web

from common.cache import MessageCache
from common.settings import Settings
from common.store import MessageStore


class AmqpLink:
    """The RabbitMQ connection of ``/readyz``: ``None`` until the first connect succeeds (start-up never
    waits for RabbitMQ; readiness reports it instead)."""

    connection: aio_pika.abc.AbstractRobustConnection | None = None


SETTINGS = web.AppKey("settings", Settings)
DB_POOL = web.AppKey("db_pool", aiomysql.Pool)
STORE = web.AppKey("store", MessageStore)
REDIS = web.AppKey("redis", redis.Redis)
CACHE = web.AppKey("cache", MessageCache)
AMQP = web.AppKey("amqp", AmqpLink)
API_TOKEN = web.AppKey("api_token", bytes)  # empty: no token required
