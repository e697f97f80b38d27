"""Configuration: schema (settings declared once) and loader."""
from kvrouter.config.load import load_config, parse_config_text
from kvrouter.config.schema import Config, Instance

__all__ = ["Config", "Instance", "load_config", "parse_config_text"]
