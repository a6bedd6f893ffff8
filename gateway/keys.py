"""Typed application keys: every resource the gateway's handlers reach through ``request.app``."""

from __future__ import annotations

import aio_pika.abc
import aiomysql
import redis.asyncio as redis
from aiohttp import web

from common.settings import Settings
from common.store import MessageStore
from gateway.intake import Intake
from gateway.metrics import HttpMetrics
from gateway.mysql import MysqlLink
from gateway.paging import PageCache


class AmqpLink:
    """The RabbitMQ connection of ``/readyz``; it may still be connecting (start-up never waits for
    RabbitMQ: readiness reports it instead)."""

    connection: aio_pika.abc.AbstractRobustConnection | None = None  # set on start-up, connected or not


SETTINGS = web.AppKey("settings", Settings)
MYSQL = web.AppKey("mysql", MysqlLink)
DB_POOL = web.AppKey("db_pool", aiomysql.Pool)
STORE = web.AppKey("store", MessageStore)
INTAKE = web.AppKey("intake", Intake)  # the group commit of POST /messages
REDIS = web.AppKey("redis", redis.Redis)
AMQP = web.AppKey("amqp", AmqpLink)
API_TOKEN = web.AppKey("api_token", bytes)  # empty: no token required
METRICS = web.AppKey("metrics", HttpMetrics)
PAGES = web.AppKey("pages", PageCache)
READINESS = web.AppKey("readiness", dict[str, str])  # the last result of each /readyz check
