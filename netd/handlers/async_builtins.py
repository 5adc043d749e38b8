"""The built-in services' streams as one coroutine, for workers mode, where one
asyncio loop serves every connection of a worker. Each wait is bounded by the
service's idle timeout.

Kept apart from netd.handlers.builtins so that no process imports asyncio (about
9 MB) unless it runs workers.
"""

from __future__ import annotations

import asyncio
from asyncio import StreamReader, StreamWriter
from collections.abc import Awaitable
from typing import TypeVar

from netd.handlers.builtins import CHUNK, Stream

T = TypeVar("T")


async def _idle(timeout_s: float, waiting: Awaitable[T]) -> T:
    async with asyncio.timeout(timeout_s):
        return await waiting


async def serve_stream(stream: Stream, reader: StreamReader, writer: StreamWriter,
                       timeout_s: float) -> None:
    """Serve one connection as the builtin's `stream` row says."""
    if stream.greeting is not None:
        writer.write(stream.greeting())
        await _idle(timeout_s, writer.drain())
        return
    if stream.endless is not None:
        while True:
            writer.write(stream.endless)
            await _idle(timeout_s, writer.drain())
    while data := await _idle(timeout_s, reader.read(CHUNK)):
        if stream.echo:
            writer.write(data)
            await _idle(timeout_s, writer.drain())
