"""Failures the commands report as one line (no traceback), in two kinds: what the user
can fix in their input, and what failed while running that is not their input."""


class HarmonyError(Exception):
    """Reported as one line; the CLIs exit non-zero."""


class ConfigError(HarmonyError):
    """Bad or missing user input: a config, a chat log, a model path, a vocabulary, a
    request field."""


class RuntimeFailure(HarmonyError):
    """Something the run depends on failed: a remote server, another rank."""
