"""Python handlers: `module:function`, called in the child as function(conn, peer)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

Handler = Callable[..., Any]


def load_handler(spec: str) -> Handler:
    """The callable named by `module:function` (the config already checked it imports)."""
    module_name, _, function = spec.partition(":")
    handler: Handler = getattr(importlib.import_module(module_name), function)
    return handler
