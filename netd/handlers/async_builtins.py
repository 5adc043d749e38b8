"""The built-in services as coroutines, for workers mode, where one event loop serves
every connection of a worker. Each wait is bounded by the service's idle timeout.

Kept apart from netd.handlers.builtins so that the supervisor, which answers UDP
builtins itself, never imports asyncio (about 9 MB) unless a service runs workers.
"""

from __future__ import annotations

import asyncio
from asyncio import StreamReader, StreamWriter
from collections.abc import Awaitable, Callable
from typing import TypeVar

from netd.handlers.builtins import CHARGEN_BLOCK, CHUNK, daytime_text, time_bytes

T = TypeVar("T")
AsyncStream = Callable[[StreamReader, StreamWriter, float], Awaitable[None]]


async def _idle(timeout_s: float, waiting: Awaitable[T]) -> T:
    async with asyncio.timeout(timeout_s):
        return await waiting


async def echo_async(reader: StreamReader, writer: StreamWriter, timeout_s: float) -> None:
    while data := await _idle(timeout_s, reader.read(CHUNK)):
        writer.write(data)
        await _idle(timeout_s, writer.drain())


async def discard_async(reader: StreamReader, writer: StreamWriter, timeout_s: float) -> None:
    while await _idle(timeout_s, reader.read(CHUNK)):
        pass


async def chargen_async(reader: StreamReader, writer: StreamWriter, timeout_s: float) -> None:
    while True:
        writer.write(CHARGEN_BLOCK)
        await _idle(timeout_s, writer.drain())


async def daytime_async(reader: StreamReader, writer: StreamWriter, timeout_s: float) -> None:
    writer.write(daytime_text())
    await _idle(timeout_s, writer.drain())


async def time_async(reader: StreamReader, writer: StreamWriter, timeout_s: float) -> None:
    writer.write(time_bytes())
    await _idle(timeout_s, writer.drain())


ASYNC_STREAMS: dict[str, AsyncStream] = {
    "echo": echo_async,
    "discard": discard_async,
    "chargen": chargen_async,
    "daytime": daytime_async,
    "time": time_async,
}
