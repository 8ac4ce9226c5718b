"""Errors a user can fix; the CLIs print them as one line and exit non-zero."""


class ConfigError(Exception):
    """Bad or missing user input: a config, a chat log, a model path, a vocabulary."""
