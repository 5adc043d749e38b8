"""An asyncio handler for workers mode: upper-case each line until the client closes.

    services:
      upper:
        listen: tcp://127.0.0.1:7010
        python: netd.examples.upper:handle
        workers: 2
"""

from __future__ import annotations

import asyncio

MAX_LINE = 4096


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Called in a worker's event loop for each connection; netd closes the writer after."""
    while line := await reader.readline():
        writer.write(line[:MAX_LINE].upper())
        await writer.drain()
