"""Isolation of one benchmark run: its own database, Redis prefix and RabbitMQ vhost, all dropped at the end.

The base connection settings are the project's own (``MYSQL_*``, ``REDIS_URL``, ``AMQP_URL`` and ``.env``);
the RabbitMQ management API (for the vhost) is at ``BENCH_RABBITMQ_API`` (default: the AMQP host, port 15672,
with the AMQP user and password).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import warnings
from urllib.parse import quote, unquote, urlsplit

import aiohttp
import aiomysql
import redis.asyncio as redis

from common.db import connect_kwargs, create_pool
from common.migrations import migrate
from common.settings import Secret, Settings

log = logging.getLogger("bench")


class Sandbox:
    def __init__(self, base: Settings) -> None:
        self.name = f"ms_bench_{secrets.token_hex(4)}"
        amqp = urlsplit(base.amqp_url.reveal())
        self.amqp_user = unquote(amqp.username or "guest")
        self.amqp_password = unquote(amqp.password or "guest")
        self.api = os.environ.get("BENCH_RABBITMQ_API") or f"http://{amqp.hostname}:15672"
        self.settings = dataclasses.replace(
            base,
            mysql_database=self.name,
            redis_prefix=f"{self.name}:",
            amqp_url=Secret(amqp._replace(path="/" + quote(self.name, safe="")).geturl()),
        )
        self.pool: aiomysql.Pool | None = None
        self.vhost_created = False

    def service_env(self) -> dict[str, str]:
        """The environment of every service process of this run (metrics listeners off unless overridden)."""
        s = self.settings
        return {
            "MYSQL_HOST": s.mysql_host,
            "MYSQL_PORT": str(s.mysql_port),
            "MYSQL_USER": s.mysql_user,
            "MYSQL_PASSWORD": s.mysql_password.reveal(),
            "MYSQL_DATABASE": s.mysql_database,
            "REDIS_URL": s.redis_url.reveal(),
            "REDIS_PREFIX": s.redis_prefix,
            "AMQP_URL": s.amqp_url.reveal(),
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "text",
            "PRODUCER_METRICS_PORT": "0",
            "CONSUMER_METRICS_PORT": "0",
            "API_TOKEN": "",
        }

    async def _management(self, method: str, path: str, body: object = None) -> int:
        auth = aiohttp.BasicAuth(self.amqp_user, self.amqp_password)
        timeout = aiohttp.ClientTimeout(total=15)
        async with (
            aiohttp.ClientSession(auth=auth, timeout=timeout) as session,
            session.request(method, self.api + path, json=body) as resp,
        ):
            if resp.status >= 400 and not (method == "DELETE" and resp.status == 404):
                raise RuntimeError(f"RabbitMQ management {method} {path}: HTTP {resp.status} {await resp.text()}")
            return resp.status

    async def open(self) -> aiomysql.Pool:
        """Create the vhost (with permissions) and the migrated database; returns a pool on it."""
        vhost = quote(self.name, safe="")
        await self._management("PUT", f"/api/vhosts/{vhost}")
        self.vhost_created = True
        user = quote(self.amqp_user, safe="")
        await self._management(
            "PUT", f"/api/permissions/{vhost}/{user}", {"configure": ".*", "write": ".*", "read": ".*"}
        )
        self.pool = await create_pool(self.settings, maxsize=4)
        await migrate(self.pool)
        return self.pool

    async def server_versions(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.pool is not None:
            async with self.pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute("SELECT VERSION()")
                out["mysql"] = str((await cur.fetchone())[0])
        with contextlib.suppress(Exception):
            auth = aiohttp.BasicAuth(self.amqp_user, self.amqp_password)
            async with aiohttp.ClientSession(auth=auth) as session, session.get(self.api + "/api/overview") as r:
                out["rabbitmq"] = str((await r.json()).get("rabbitmq_version"))
        return out

    async def close(self) -> list[str]:
        """Drop everything this run created; returns what could not be dropped (empty: all clean)."""
        problems: list[str] = []
        if self.pool is not None:
            self.pool.close()
            await self.pool.wait_closed()
        try:
            conn = await aiomysql.connect(**connect_kwargs(self.settings, with_db=False))  # type: ignore[arg-type]
            try:
                async with conn.cursor() as cur:
                    with warnings.catch_warnings():  # the server's note when the database was never created
                        warnings.simplefilter("ignore")
                        await cur.execute(f"DROP DATABASE IF EXISTS `{self.name}`")
            finally:
                conn.close()
        except Exception as exc:
            problems.append(f"database {self.name}: {exc}")
        if self.vhost_created:
            try:
                await self._management("DELETE", f"/api/vhosts/{quote(self.name, safe='')}")
            except Exception as exc:
                problems.append(f"vhost {self.name}: {exc}")
        try:
            await self._drop_redis_prefix()
        except Exception as exc:
            problems.append(f"redis prefix {self.settings.redis_prefix}: {exc}")
        return problems

    async def _drop_redis_prefix(self) -> None:
        client = redis.from_url(self.settings.redis_url.reveal())
        try:
            batch: list[bytes] = []
            async for key in client.scan_iter(match=f"{self.settings.redis_prefix}*", count=5000):
                batch.append(key)
                if len(batch) >= 5000:
                    await client.unlink(*batch)
                    batch = []
            if batch:
                await client.unlink(*batch)
        finally:
            await client.aclose()
