"""The assistant's own log file: everything it prints, timestamped, rotated by size.

A background assistant has no terminal: `--log-file` sends its standard output and error
(answers, notices, one-line errors, tracebacks) to a file that `service logs` and
`service status` read, rotated so that it never grows without bound.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import sys
from pathlib import Path

MAX_BYTES = 5 * 1024 * 1024
BACKUPS = 3
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


class LogStream(io.TextIOBase):
    """A text stream whose complete lines become records of a rotating log file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8"
        )
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", TIME_FORMAT))
        self._partial = ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._emit(line)
        return len(text)

    def flush(self) -> None:
        self._handler.flush()

    def close(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = ""
        self._handler.close()
        super().close()

    def _emit(self, line: str) -> None:
        record = logging.LogRecord("mlx-harmony", logging.INFO, "", 0, line, None, None)
        self._handler.emit(record)


def log_to_file(path: Path) -> LogStream:
    """From now on, standard output and error go to `path` (rotated)."""
    stream = LogStream(path)
    sys.stdout = sys.stderr = stream
    return stream
