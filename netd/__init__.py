"""netd: a super-server for Unix."""

__version__ = "0.1.0"
