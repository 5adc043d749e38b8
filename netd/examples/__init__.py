"""Runnable example handlers; see docs/handlers.md."""
