"""The README's commands on a fresh machine: no Fashion-MNIST package, so tests skip or fall back to digits."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import HAVE_FASHION, fashion_dir, fashion_test_split, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_tests_look_for_fashion_mnist_where_the_dataset_plugin_does(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("TLFX_FASHION_MNIST_DIRS", str(empty))  # replaces the plugin's search path: a fresh machine
    assert fashion_test_split() is None and fashion_dir() is None
    if HAVE_FASHION:
        monkeypatch.delenv("TLFX_FASHION_MNIST_DIRS")
        real = fashion_dir()
        monkeypatch.setenv("TLFX_FASHION_MNIST_DIRS", f"{empty}{os.pathsep}{real}")
        assert fashion_dir() == real and len(fashion_test_split()) == 10000


def test_without_fashion_mnist_tests_skip_with_the_fix_or_use_digits():
    """A real pytest run with an empty search path: a Fashion test skips naming the package, the image-folder
    fixture is built from scikit-learn's digits, and nothing errors."""
    tests = ["tests/test_extract_core.py::test_cli_extract_fashion_mnist_and_info",
             "tests/test_compare.py::test_gallery_images_of_a_file_dataset"]
    env = {**os.environ, "TLFX_FASHION_MNIST_DIRS": "/nonexistent",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 1 skipped" in proc.stdout and "error" not in proc.stdout.lower(), proc.stdout
    assert "apt-get install dataset-fashion-mnist" in proc.stdout


def test_demo_help_describes_the_work_without_timings():
    text = run_cli("demo", "--help", check=True).stdout
    assert "4,000 images" in text and "Examples:" in text
    assert not re.search(r"\d\s*(s|sec|seconds?|min|minutes?|hours?|images/s)\b", text), text
