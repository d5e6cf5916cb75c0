"""Progress display for long loops: a tqdm bar on a terminal, a few plain lines anywhere else.

A tqdm bar redraws itself with carriage returns several times a second; written to a log file or a pipe that is
hundreds of ``\\r`` updates on one huge line. :func:`progress_bar` therefore returns a real tqdm bar only when the
stream is a terminal, and otherwise a :class:`LineProgress` with the small part of tqdm's interface that tlfx
uses: it prints one line when the stage starts, one when it ends (count, elapsed time, rate), and at most one
line per ``interval`` seconds in between.
"""

from __future__ import annotations

import sys
import threading
import time

from .safetext import terminal

LOG_INTERVAL_S = 60.0


def progress_bar(total: int | None = None, *, initial: int = 0, unit: str = "it", desc: str | None = None,
                 disable: bool = False, file=None, interval: float = LOG_INTERVAL_S, **tqdm_kwargs):
    """A progress display on ``file`` (default: standard error) for ``total`` items, ``initial`` already done.

    On a terminal: ``tqdm(total=..., **tqdm_kwargs)``. Elsewhere: a :class:`LineProgress` (``tqdm_kwargs``, which
    only shape the bar, are ignored). ``disable=True`` prints nothing either way. Use it as a context manager or
    call ``close()``.
    """
    file = sys.stderr if file is None else file
    if _is_terminal(file):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, unit=unit, desc=desc, disable=disable, file=file, **tqdm_kwargs)
    return LineProgress(total, initial=initial, unit=unit, desc=desc, file=None if disable else file,
                        interval=interval)


def _is_terminal(file) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """tqdm's ``update``/``set_postfix``/``set_description``/``refresh``/``close`` as a few whole lines.

    ``file=None`` prints nothing. Safe to call from a second thread (``refresh`` from a ticker thread).
    """

    def __init__(self, total=None, *, initial=0, unit="it", desc=None, file=None, interval=LOG_INTERVAL_S):
        self.total, self.n, self.unit, self.file, self.interval = total, initial, unit, file, interval
        self.desc, self.postfix = (desc or "").strip(), ""
        self._initial = initial
        self._lock = threading.Lock()
        self._closed = False
        self._t0 = self._last = time.monotonic()
        self._emit("started")

    # -- tqdm's interface (the part tlfx uses)
    def update(self, n=1):
        """Count ``n`` more items; prints a line if ``interval`` seconds passed since the last one."""
        with self._lock:
            self.n += n
        self._maybe_emit()

    def refresh(self):
        """Nothing to redraw; prints a line if ``interval`` seconds passed (keeps a long silent step visible)."""
        self._maybe_emit()

    def set_description(self, desc=None, refresh=True):
        self.desc = (desc or "").strip()

    set_description_str = set_description

    def set_postfix_str(self, s="", refresh=True):
        self.postfix = str(s).strip()

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self):
        """Print the final line once: ``done`` when every item was counted, else ``stopped``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        finished = self.total is None or self.n >= self.total
        self._emit("done" if finished else "stopped")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- lines
    def _maybe_emit(self):
        now = time.monotonic()
        with self._lock:
            if self._closed or now - self._last < self.interval:
                return
            self._last = now
        self._emit("")

    def _emit(self, state: str):
        if self.file is None:
            return
        elapsed = time.monotonic() - self._t0
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        parts = [f"{self.desc}: " if self.desc else "", f"{count} {self.unit}"]
        if self.postfix:
            parts.append(f", {self.postfix}")
        if state != "started":
            rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
            parts.append(f" [{_clock(elapsed)}, {rate:.1f} {self.unit}/s]")
        if state:
            parts.append(f" {state}")
        try:
            self.file.write(terminal("".join(parts)) + "\n")
            self.file.flush()
        except (ValueError, OSError):  # the stream went away (closed pipe): progress is never worth a crash
            self.file = None


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
