"""Model files never run code from the file unless the user says --trust-pickle (or names a type in --trust-type)."""

from __future__ import annotations

import json
import pickle
import zipfile

from conftest import run_cli


class _Touch:
    """Unpickling this object creates a file: the canonical malicious pickle payload, made harmless."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_never_run_without_trust(digits_stores, tmp_path):
    mark = tmp_path / "pwned"
    evil = tmp_path / "evil.joblib"
    evil.write_bytes(pickle.dumps({"tlfx_model": "head", "payload": _Touch(mark)}))
    for args in (["evaluate", "--model", evil, "--features", digits_stores[1]], ["predict", "--model", evil, evil]):
        p = run_cli(*args)
        assert p.returncode == 2 and "--trust-pickle" in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not mark.exists()
    # the control: the same file does run code when the user explicitly trusts it
    p = run_cli("evaluate", "--model", evil, "--features", digits_stores[1], "--trust-pickle")
    assert mark.exists() and p.returncode != 0


def test_pickle_hidden_in_a_model_zip_is_not_run(tmp_path):
    mark = tmp_path / "pwned"
    path = tmp_path / "evil.tlfx"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("meta.json", json.dumps({"kind": "head", "format_version": 1, "class_names": ["a", "b"]}))
        z.writestr("head.skops", pickle.dumps(_Touch(mark)))
    p = run_cli("predict", "--model", path, path)
    assert p.returncode == 2 and "Traceback" not in p.stderr and not mark.exists(), p.stderr


def test_newer_model_format_is_refused(tmp_path):
    path = tmp_path / "future.tlfx"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("meta.json", json.dumps({"kind": "head", "format_version": 99}))
    p = run_cli("predict", "--model", path, path)
    assert p.returncode == 2 and "format version 99" in p.stderr and "upgrade tlfx" in p.stderr
