"""Configuration: YAML in, frozen typed objects out (see netd.config.model)."""

from netd.config.model import Address, Config, LogConfig, Service
from netd.config.validate import ConfigError, load_config, load_daemon_config, parse_duration

__all__ = ["Address", "Config", "ConfigError", "LogConfig", "Service", "load_config",
           "load_daemon_config", "parse_duration"]
