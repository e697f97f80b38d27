"""kvrouter: one OpenAI-compatible endpoint in front of many LLM engines."""

__version__ = "0.1.0"
