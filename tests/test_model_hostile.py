"""Hostile command lines and model files (issue #14): option look-alike file names load no code, trust is explicit
and exact, a model file cannot exhaust memory, reach the network or change results silently, and names from
other people reach the terminal escaped."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import threading
import time
import zipfile

import numpy as np
import pytest
from conftest import cli_here, run_cli
from PIL import Image

import tlfx
from tlfx.errors import TlfxError
from tlfx.head_model import HeadModel

TINY_PLUGIN = '''
from torch import nn

import tlfx
from tlfx.backbone import Backbone, Preprocess, WeightsInfo


def tiny(weights=None, **options):
    return Backbone(name="tiny_colour", module=nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten()),
                    preprocess=Preprocess(16, 16), weights=WeightsInfo("WEIGHTS_NAME"))


@tlfx.hookimpl
def register_backbones(register):
    register("tiny_colour", tiny, description="mean colour of 2x2 cells (12-d)")
'''
RED_CLASS = "red\x1b[2J\x1b[31m"  # a class folder whose name clears the screen when printed raw


def _png(path, colour):
    Image.fromarray(np.full((20, 20, 3), colour, dtype=np.uint8)).save(path)


def _plugin_dir(root, weights_name):
    d = root / f"plugins_{weights_name}"
    d.mkdir()
    (d / "tiny_plugin.py").write_text(TINY_PLUGIN.replace("WEIGHTS_NAME", weights_name))
    return d


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A real store and head model made through the CLI with a plugins-dir backbone (weights named 'v1'), on an
    image folder whose class names hold terminal escapes."""
    root = tmp_path_factory.mktemp("tiny")
    images = root / "images"
    for name, colour in ((RED_CLASS, (220, 20, 20)), ("blue", (20, 20, 220))):
        (images / name).mkdir(parents=True)
        for i in range(4):
            _png(images / name / f"{i}.png", tuple(max(0, c - 9 * i) for c in colour))
    plugins = _plugin_dir(root, "v1")
    env = {"TLFX_PLUGINS_DIR": str(plugins)}
    store, model = root / "s.h5", root / "m.tlfx"
    run_cli("extract", "--backbone", "tiny_colour", "--data", f"imagefolder:{images}", "--out", store, "--quiet",
            "--workers", "0", env=env, check=True)
    run_cli("fit", "--features", store, "--head", "logistic", "--out", model, env=env, check=True)
    return {"root": root, "store": store, "model": model, "env": env, "image": images / "blue" / "0.png"}


def _model_zip(path, meta, members=None):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("meta.json", meta if isinstance(meta, (str, bytes)) else json.dumps(meta))
        for name, data in (members or {}).items():
            z.writestr(name, data)
    return str(path)


def _one_line_refusal(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, (n, p.stderr)


# ----------------------------------------------------------------------------------------- 1. argument parsing
def test_file_names_that_look_like_options_never_load_plugins(tmp_path):
    """`tlfx predict --model m.tlfx -- *.jpg` in a folder holding `--plugins-dir=thumbs.jpg` and `thumbs.jpg/x.py`."""
    mark = tmp_path / "pwned"
    (tmp_path / "thumbs.jpg").mkdir()
    (tmp_path / "thumbs.jpg" / "evil.py").write_text(f"open({str(mark)!r}, 'w').write('ran')\n")
    (tmp_path / "--plugins-dir=thumbs.jpg").write_bytes(b"not an image")
    for args in (["predict", "--model", "m.tlfx", "--", "--plugins-dir=thumbs.jpg"],
                 ["predict", "--model", "m.tlfx", "x.jpg", "--plugins-dir=thumbs.jpg"],
                 ["predict", "--model", "m.tlfx", "--plugins-dir", "thumbs.jpg", "x.jpg"],
                 ["info", "--", "--plugins-dir=thumbs.jpg"]):
        p = run_cli(*args, cwd=tmp_path)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert not mark.exists(), args
    # the control: the group option, before the command, does load the folder (so the test can fail)
    p = run_cli("--plugins-dir", "thumbs.jpg", "plugins", cwd=tmp_path)
    assert p.returncode == 0 and mark.exists(), p.stderr


# ----------------------------------------------------------------------------------------------- 2. trust
def _os_system_skops(command: str) -> bytes:
    """A skops file whose only object is built by calling os.system(command): what a crafted file can do."""
    text = {"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode", "content": json.dumps(command),
            "is_json": True, "__id__": 3}
    schema = {"__class__": "system", "__module__": "os", "__loader__": "ConstructorFromReduceNode",
              "content": {"__class__": "tuple", "__module__": "builtins", "__loader__": "TupleNode", "content": [text],
                          "__id__": 2},
              "__id__": 1, "protocol": 2, "_skops_version": "0.16.0"}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("schema.json", json.dumps(schema))
    return buf.getvalue()


def test_crafted_skops_type_is_refused_by_name_and_only_its_exact_name_trusts_it(tmp_path):
    mark = tmp_path / "pwned"
    evil = _model_zip(tmp_path / "evil.tlfx", {"kind": "head", "format_version": 1, "class_names": ["a", "b"]},
                      {"head.skops": _os_system_skops(f"touch {mark}")})
    p = cli_here("predict", "--model", evil, evil)
    _one_line_refusal(p, "os.system", "--trust-type os.system")
    for widening in (["--trust-pickle"], ["--trust-type", "os.path.join"], ["--trust"]):
        p = cli_here("predict", "--model", evil, evil, *widening)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert not mark.exists(), widening
    _one_line_refusal(cli_here("predict", "--model", evil, evil, "--trust"), "--trust-type", "--trust-pickle")
    with pytest.raises(TlfxError, match="os.system"):
        tlfx.load_model(evil, trust_pickle=True)
    assert not mark.exists()
    # the control: naming the type is what trusts it (the file then runs its command)
    cli_here("predict", "--model", evil, evil, "--trust-type", "os.system")
    assert mark.exists()


def test_head_of_a_type_named_in_trust_type_loads(tiny_model, tmp_path):
    """A legitimate head whose class no registry knows: refused with its name, accepted with --trust-type NAME."""
    (tmp_path / "myheads.py").write_text("from sklearn.linear_model import LogisticRegression\n\n\n"
                                        "class MyHead(LogisticRegression):\n    pass\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        from myheads import MyHead

        store = tlfx.FeatureStore(str(tiny_model["store"]))
        est = MyHead().fit(store.features, store.labels)
        path = str(tmp_path / "mine.tlfx")
        HeadModel.from_estimator(est, "logistic", {}, store.config, store.class_names).save(path)
        assert tlfx.load_model(path, trust_types=["myheads.MyHead"]).estimator.__class__ is MyHead
    finally:
        sys.path.remove(str(tmp_path))
    env = {**tiny_model["env"], "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    p = run_cli("evaluate", "--model", path, "--features", tiny_model["store"], env=env)
    _one_line_refusal(p, "myheads.MyHead", "--trust-type myheads.MyHead")
    p = run_cli("evaluate", "--model", path, "--features", tiny_model["store"], "--trust-type", "myheads.MyHead", env=env)
    assert p.returncode == 0 and "accuracy 1.0000" in p.stdout, p.stderr


# ------------------------------------------------------------------------------------ 3. bounded model files
def _patch_sizes(data: bytes, name: bytes, size: int) -> bytes:
    """Make both headers of member ``name`` declare ``size`` uncompressed bytes (a lying zip)."""
    b = bytearray(data)
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        i = 0
        while (i := b.find(sig, i)) >= 0:
            name_at = i + (30 if sig == b"PK\x03\x04" else 46)
            if b[name_at:name_at + len(name)] == name:
                b[i + off:i + off + 4] = struct.pack("<I", size)
            i += 4
    return bytes(b)


def test_oversized_and_lying_members_are_refused_before_reading(tmp_path):
    t0 = time.perf_counter()
    bomb = _model_zip(tmp_path / "bomb.tlfx", b" " * (64 << 20))  # 64 MiB of JSON whitespace, ~64 KiB on disk
    assert os.path.getsize(bomb) < 1 << 20
    _one_line_refusal(cli_here("predict", "--model", bomb, bomb), "meta.json is larger than")
    # headers that understate the size: reading stops at the declared size and the CRC check refuses the rest
    liar = tmp_path / "liar.tlfx"
    liar.write_bytes(_patch_sizes(open(_model_zip(tmp_path / "l.tlfx", b" " * (8 << 20)), "rb").read(), b"meta.json", 100))
    with pytest.raises(TlfxError, match="meta.json cannot be read"):
        tlfx.load_model(str(liar))
    many = _model_zip(tmp_path / "many.tlfx", {"kind": "head", "format_version": 1}, {f"m{i}": b"" for i in range(200)})
    with pytest.raises(TlfxError, match="holds 201 members"):
        tlfx.load_model(many)
    # the skops member is a zip too: a member declaring 3 GiB is refused before skops unpacks anything
    inner = _patch_sizes(_os_system_skops("true"), b"schema.json", 3 << 30)
    big = _model_zip(tmp_path / "big.tlfx", {"kind": "head", "format_version": 1}, {"head.skops": inner})
    with pytest.raises(TlfxError, match="would unpack to 3221225472 bytes"):
        tlfx.load_model(big)
    assert time.perf_counter() - t0 < 120


@pytest.mark.parametrize("meta, needle", [
    (["kind", "head"], "the record is a list"),
    ({"kind": "head", "format_version": "1"}, "format_version is '1'"),
    ({"kind": "head", "format_version": True}, "format_version is True"),
    ({"kind": ["head"], "format_version": 1}, "field 'kind' is list"),
    ({"kind": "head", "format_version": 1, "class_names": {"a": 1}}, "field 'class_names' is dict"),
    ({"kind": "head", "format_version": 1, "class_names": ["a", 7]}, "class name 7"),
    ({"kind": "head", "format_version": 1, "config": ["resnet18"]}, "field 'config' is list"),
    ({"kind": "head", "format_version": 1, "config": {"image_size": 40000}}, "'config.image_size' is 40000, outside"),
    ({"kind": "head", "format_version": 1, "config": {"weights": "w.pth"}}, "'config.weights' is str"),
    ({"kind": "head", "format_version": 1, "config": {"preprocess": {"resize": 256, "crop": 224, "mean": [0, 0],
                                                                    "std": [1, 1, 1]}}}, "config.preprocess.mean"),
    ({"kind": "head", "format_version": 1, "deep": json.loads("[" * 40 + "]" * 40)}, "nested deeper than 32"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ({"kind": "finetune", "format_version": 1, "backbone": "resnet18"}, "'preprocess' is NoneType"),
    ({"kind": "finetune", "format_version": 1, "backbone": "resnet18", "image_size": 40000,
      "preprocess": {"resize": 256, "crop": 224, "mean": [0, 0, 0], "std": [1, 1, 1]}}, "'image_size' is 40000"),
])
def test_malformed_records_are_one_line(tmp_path, meta, needle):
    path = _model_zip(tmp_path / "bad.tlfx", meta, {"head.skops": b"", "weights.safetensors": b""})
    with pytest.raises(TlfxError, match=None) as err:
        tlfx.load_model(path)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_malformed_record_through_the_cli_exits_2(tmp_path):
    path = _model_zip(tmp_path / "huge.tlfx", {"kind": "head", "format_version": 1, "config": {"image_size": 40000}})
    _one_line_refusal(cli_here("predict", "--model", path, path), "config.image_size", "40000")


class _Listener:
    """A TCP server on 127.0.0.1 that counts connections (stands in for the Hugging Face hub)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


def test_loading_a_model_never_touches_the_network(tiny_model, tmp_path):
    """A record naming timm:resnet18 (not cached here) is refused offline: no connection to the hub it names."""
    hub = _Listener()
    with zipfile.ZipFile(tiny_model["model"]) as z:
        meta, head = json.loads(z.read("meta.json")), z.read("head.skops")
    meta["config"].update(backbone="timm:resnet18", weights={"name": "timm/resnet18", "sha256": "", "path": ""})
    path = _model_zip(tmp_path / "timm.tlfx", meta, {"head.skops": head})
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{hub.port}", "HF_HUB_OFFLINE": "", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_ETAG_TIMEOUT": "60", "HF_HUB_DOWNLOAD_TIMEOUT": "60"}
    t0 = time.perf_counter()
    p = run_cli("predict", "--model", path, tiny_model["image"], env=env)
    _one_line_refusal(p, "timm:resnet18")
    assert hub.connections == 0 and time.perf_counter() - t0 < 120


# ------------------------------------------------------------------------- 4. one configuration check everywhere
def test_predict_refuses_a_backbone_whose_configuration_changed(tiny_model, tmp_path):
    model, image = tiny_model["model"], tiny_model["image"]
    ok = run_cli("predict", "--model", model, image, "--format", "json", env=tiny_model["env"])
    assert ok.returncode == 0 and json.loads(ok.stdout)[0]["top"][0]["class"] == "blue", ok.stderr
    v2 = {"TLFX_PLUGINS_DIR": str(_plugin_dir(tmp_path, "v2"))}
    _one_line_refusal(run_cli("predict", "--model", model, image, env=v2), "weights: model v1 vs v2")
    _one_line_refusal(run_cli("--plugins-dir", v2["TLFX_PLUGINS_DIR"], "predict", "--model", model, image),
                      "weights: model v1 vs v2")


# ------------------------------------------------------------------------------------ 5. terminal escaping
def test_class_and_file_names_reach_the_terminal_escaped(tiny_model, tmp_path):
    image = tmp_path / "photo\x1b]0;pwned\x07.png"
    _png(image, (220, 20, 20))
    env = tiny_model["env"]
    table = run_cli("predict", "--model", tiny_model["model"], image, env=env, check=True).stdout
    assert "\x1b" not in table and "\x07" not in table and "red\\x1b[2J" in table and "photo\\x1b]0;pwned" in table
    data = json.loads(run_cli("predict", "--model", tiny_model["model"], image, "--format", "json", env=env,
                              check=True).stdout)
    assert data[0]["top"][0]["class"] == RED_CLASS and data[0]["path"] == str(image)  # data stays data
    rep = run_cli("evaluate", "--model", tiny_model["model"], "--features", tiny_model["store"], env=env, check=True).stdout
    assert "\x1b" not in rep and "red\\x1b[2J\\x1b[31m" in rep


# ------------------------------------------------------------------------------------------ 6. atomic saves
def test_model_save_ignores_planted_temporary_links(tiny_model, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out.tlfx"
    os.symlink(victim, f"{out}.tmp{os.getpid()}")  # the name the old code wrote through
    model = tlfx.load_model(str(tiny_model["model"]))
    model.save(str(out))
    model.export_joblib(str(tmp_path / "out.joblib"))
    assert victim.read_text() == "keep me"
    assert tlfx.load_model(str(out)).class_names == model.class_names
    assert sorted(os.listdir(tmp_path)) == sorted(["victim.txt", "out.tlfx", "out.joblib", f"out.tlfx.tmp{os.getpid()}"])

    class Broken(HeadModel):
        def save_members(self, z):
            raise OSError(28, "No space left on device")

    with pytest.raises(TlfxError, match="No space left"):
        Broken(model.meta, model.estimator).save(str(out))
    assert tlfx.load_model(str(out)).class_names == model.class_names  # the earlier file is intact
    assert len(os.listdir(tmp_path)) == 4  # and no temporary file is left


def test_model_from_before_the_tlfx_plugins_rename_gets_a_refit_hint(tiny_model, tmp_path):
    """Files written when tlfx's heads lived in the top-level 'plugins' package name classes that no longer exist."""
    path = str(tmp_path / "new.tlfx")
    cli_here("fit", "--features", str(tiny_model["store"]), "--head", "logistic", "--out", path, check=True)
    old = str(tmp_path / "old.tlfx")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "head.skops":
                inner_in, inner_out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
                with zipfile.ZipFile(inner_out, "w") as z:
                    for m in inner_in.infolist():
                        body = inner_in.read(m)
                        if m.filename == "schema.json":
                            body = body.replace(b'"tlfx_plugins.sklearn_estimators"', b'"plugins.sklearn_heads"')
                        z.writestr(m, body)
                data = inner_out.getvalue()
            dst.writestr(item, data)
    assert cli_here("evaluate", "--model", path, "--features", str(tiny_model["store"])).returncode == 0
    p = cli_here("evaluate", "--model", old, "--features", str(tiny_model["store"]))
    _one_line_refusal(p, "older tlfx", "plugins.sklearn_heads.LogisticHead", "fit it again")
