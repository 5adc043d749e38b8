"""Python handlers the benchmark points netd at (netd runs with bench/ on PYTHONPATH)."""

from __future__ import annotations

import asyncio


async def async_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF in the worker's event loop (netd's asyncio handler API)."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
