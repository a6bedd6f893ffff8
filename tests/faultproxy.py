"""Raw TCP fault proxies for the test suite: put one between a service and a shared server (MySQL) on a
private port, then break that one link without touching the server others use.

- :class:`FaultProxy` passes bytes through until told to ``refuse`` (nothing listens: connection refused),
  ``hang`` (connections are accepted and bytes are held: a server or a network that stops answering) or
  ``cut`` (every open connection is reset), and back to ``pass``.
- :class:`CuttingProxy` loses the answer of one chosen statement after the server ran it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

Mode = Literal["pass", "hang", "refuse"]
CHUNK = 65536


class FaultProxy:
    """A TCP proxy to ``127.0.0.1:port`` on a private port, in one of three modes (see the module)."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, port)
        self.port = 0
        self.mode: Mode = "pass"
        self.accepted = 0  # connections accepted so far, in any mode
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        await self._listen()
        return self.port

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def set(self, mode: Mode) -> None:
        """Switch mode: ``refuse`` stops listening and resets every open connection; ``hang`` freezes
        open connections and new ones (accepted, never answered); ``pass`` lets held bytes go on."""
        if mode == self.mode:
            return
        if mode == "refuse":
            await self._stop_listening()
        elif self.mode == "refuse":
            await self._listen()
        if mode == "hang":
            self._flowing.clear()
        else:
            self._flowing.set()
        self.mode = mode

    def cut(self) -> int:
        """Reset every open connection now (the mode stays); returns how many."""
        writers = list(self._writers)
        for writer in writers:
            writer.transport.abort()
        return len(writers)

    async def close(self) -> None:
        await self._stop_listening()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _stop_listening(self) -> None:
        """Stop accepting and reset every open connection (before waiting: since Python 3.12,
        ``wait_closed`` waits for the server's connections to end)."""
        if self._server is not None:
            self._server.close()
            self.cut()
            await self._server.wait_closed()
            self._server = None
        self.cut()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.get_running_loop().create_task(self._pipe(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pipe(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self._writers.add(cwriter)
        swriter: asyncio.StreamWriter | None = None
        try:
            await self._flowing.wait()  # hang: accepted, but the server never greets
            try:
                sreader, swriter = await asyncio.open_connection(*self.target)
            except OSError:
                return
            self._writers.add(swriter)
            await asyncio.gather(self._copy(creader, swriter), self._copy(sreader, cwriter))
        finally:
            for w in (cwriter, swriter):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK):
                await self._flowing.wait()  # hang: what arrives is held
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


class CuttingProxy:
    """A TCP proxy in front of MySQL for one service. Once, when a statement containing ``trigger`` goes
    through, the server runs (and commits) it but the answer never reaches the client: the proxy drops
    the client's connection instead, as a network cut or a server restart at the worst moment would."""

    def __init__(self, port: int, trigger: bytes) -> None:
        self.target = ("127.0.0.1", port)
        self.trigger = trigger
        self.armed = True
        self.cuts = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._pipe(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _pipe(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        try:
            sreader, swriter = await asyncio.open_connection(*self.target)
        except OSError:
            cwriter.transport.abort()
            return
        cut = asyncio.Event()

        async def up() -> None:
            with contextlib.suppress(OSError):
                while data := await creader.read(65536):
                    if self.armed and self.trigger in data:
                        self.armed = False
                        cut.set()
                    swriter.write(data)
                    await swriter.drain()
            swriter.transport.abort()

        async def down() -> None:
            with contextlib.suppress(OSError):
                while data := await sreader.read(65536):
                    if cut.is_set():
                        # Swallow the answers until the server has run every statement of the packet
                        # (quiet for a moment), then lose them with the connection.
                        with contextlib.suppress(TimeoutError):
                            while await asyncio.wait_for(sreader.read(65536), 0.5):
                                pass
                        self.cuts += 1
                        break
                    cwriter.write(data)
                    await cwriter.drain()
            cwriter.transport.abort()

        try:
            await asyncio.gather(up(), down())
        finally:
            swriter.transport.abort()
            cwriter.transport.abort()
