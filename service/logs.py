"""Structured logging: one JSON object per line (or plain text), configured once at start."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class HeldUntilStarted(logging.Handler):
    """Until the start ends, records below WARNING wait here (a warning or an error lets
    them out first, in order): a start that fails prints only why, in one line, not the
    progress lines of what it did before; a start that succeeds lets them all out."""

    def __init__(self, target: logging.Handler):
        super().__init__()
        self.target = target
        self.held: list[logging.LogRecord] | None = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.held is not None:
            if record.levelno < logging.WARNING:
                self.held.append(record)
                return
            self._release()
        self.target.handle(record)

    def started(self, ok: bool) -> None:
        """The start ended: let the held records out (``ok``) or drop them."""
        if ok or logging.getLogger().isEnabledFor(logging.DEBUG):
            self._release()
        self.held = None

    def _release(self) -> None:
        held, self.held = self.held or [], []
        for record in held:
            self.target.handle(record)


def configure(level: str, fmt: str) -> HeldUntilStarted:
    """Log to stderr at ``level``; the handler returned holds progress records until
    ``started`` says how the start ended."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    hold = HeldUntilStarted(handler)
    root = logging.getLogger()
    root.handlers[:] = [hold]
    root.setLevel(level.upper())
    return hold
