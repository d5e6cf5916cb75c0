"""Progress output: a tqdm bar on a terminal, a few whole lines in a log file or a pipe (tlfx/progress.py)."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

from conftest import run_cli

from tlfx.progress import LineProgress, progress_bar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_extract_into_a_log_file_writes_whole_lines_not_carriage_returns(tmp_path):
    """stderr captured (not a terminal): one line when extraction starts and one when it ends, no ``\\r``."""
    p = run_cli("extract", "--data", "digits", "--split", "test", "--image-size", "64", "--limit", "100",
                "--batch-size", "10", "--out", tmp_path / "d.h5", check=True)
    assert "\r" not in p.stderr and "\x1b" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert 2 <= len(lines) <= 4, lines  # started, done, and at most a minute line or two on a very slow machine
    assert lines[0] == "extract: 0/100 img started"
    assert lines[-1].startswith("extract: 100/100 img [") and lines[-1].endswith(" img/s] done")


def test_line_progress_prints_at_most_one_line_per_interval(tmp_path):
    out = io.StringIO()
    with progress_bar(total=400, unit="step", desc="fit", file=out, interval=0.1) as bar:
        assert isinstance(bar, LineProgress)
        t0 = time.monotonic()
        for _ in range(400):  # about 0.4 s of updates, 400 of them
            time.sleep(0.001)
            bar.update()
            bar.set_postfix(loss="0.123")
        elapsed = time.monotonic() - t0
    lines = out.getvalue().splitlines()
    assert lines[0] == "fit: 0/400 step started" and lines[-1].endswith("done")
    assert "loss=0.123" in lines[-1] and "400/400 step" in lines[-1]
    # start + end + one line per whole interval elapsed, never one per update
    assert 2 <= len(lines) <= 2 + int(elapsed / 0.1) + 1, lines
    bar.close()  # a second close prints nothing more
    assert out.getvalue().splitlines() == lines


def test_line_progress_says_stopped_when_a_stage_ends_early_and_disable_prints_nothing():
    out = io.StringIO()
    bar = progress_bar(total=10, unit="img", file=out)
    bar.update(3)
    bar.set_description("epoch 1/2\x1b[31m")  # control characters from anywhere stay visible, never act
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("epoch 1/2\\x1b[31m: 3/10 img [") and lines[-1].endswith("stopped")
    quiet = io.StringIO()
    with progress_bar(total=10, file=quiet, disable=True) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""


def test_on_a_terminal_it_is_a_tqdm_bar():
    """A real pseudo-terminal on stderr: the helper returns tqdm, which redraws with carriage returns."""
    script = ("import sys\n"
              "from tlfx.progress import progress_bar\n"
              "bar = progress_bar(total=50, unit='img', desc='extract', mininterval=0)\n"
              "print('TYPE', type(bar).__module__, type(bar).__name__, file=sys.stderr)\n"
              "for _ in range(50):\n"
              "    bar.update()\n"
              "bar.close()\n")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                            env=env, cwd=REPO)
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    assert proc.wait(timeout=30) == 0
    text = b"".join(chunks).decode("utf-8", "replace")
    assert "TYPE tqdm" in text, text
    assert "\r" in text.split("TYPE", 1)[1].replace("\r\n", "\n"), text  # redrawn in place, not line by line
    assert "50/50" in text and "started" not in text
