"""Pretrained weights: real downloads from HTTP servers on 127.0.0.1 (torchvision through TLFX_WEIGHTS_URL, timm
through HF_ENDPOINT), failures that leave nothing in the cache, the offline switch, `tlfx weights`, and the file
formats --weights accepts."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import tlfx
from tests.conftest import run_cli
from tlfx.errors import TlfxError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class FileServer:
    """A real HTTP server on 127.0.0.1 serving ``files`` (url path -> bytes).

    ``etags`` overrides the ETag of some paths (a lying mirror). ``cut=True`` announces the full Content-Length,
    sends half the body and closes the connection (a download cut off). ``hub=True`` answers like the Hugging Face
    hub: X-Repo-Commit and an ETag that is the file's sha256 (as for LFS files), 404 with X-Error-Code
    EntryNotFound for other files (huggingface_hub/file_download.py: get_hf_file_metadata reads these headers).
    ``status=503`` answers every request with that status (a mirror that is down).
    """

    def __init__(self, files: dict[str, bytes], cut=False, hub=False, etags=None, status=None):
        self.files, self.cut, self.hub, self.etags, self.requests = files, cut, hub, etags or {}, []
        self.status = status
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body):
                server.requests.append((self.command, self.path))
                if server.status:
                    self.send_response(server.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files.get(self.path.split("?")[0])
                if data is None:
                    self.send_response(404)
                    if server.hub:
                        self.send_header("X-Error-Code", "EntryNotFound")
                        self.send_header("X-Repo-Commit", "a" * 40)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                if server.hub:
                    self.send_header("X-Repo-Commit", "a" * 40)
                    etag = server.etags.get(self.path) or hashlib.sha256(data).hexdigest()
                    self.send_header("ETag", f'"{etag}"')
                self.end_headers()
                if body:
                    self.wfile.write(data[: len(data) // 2] if server.cut else data)
                    if server.cut:
                        self.wfile.flush()
                        self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def mnv3_checkpoint(tmp_path) -> tuple[bytes, str]:
    """A real torchvision checkpoint (MobileNetV3-Small, random init, ~10 MB) and its sha256."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "mnv3.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), path)
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def write_plugin(tmp_path, file_name: str):
    """A --plugins-dir plugin registering `tiny_tv`: MobileNetV3-Small whose default weights URL names a file whose
    sha256 we control. torchvision checks downloads against the hash prefix in the file name
    (``name-<sha256[:8]>.pth``); the real mobilenet_v3_small entry names the real ImageNet file, which this machine
    cannot have, so the success path needs an entry of our own. The URL keeps download.pytorch.org as its base:
    TLFX_WEIGHTS_URL must replace it for the test to pass."""
    d = tmp_path / "plug"
    d.mkdir()
    (d / "tiny_tv.py").write_text(
        "import tlfx\n"
        "from tlfx_plugins.torchvision_backbones import build, weights_meta\n\n"
        f"URL = 'https://download.pytorch.org/models/{file_name}'\n\n\n"
        "@tlfx.hookimpl\n"
        "def register_backbones(register):\n"
        "    register('tiny_tv', lambda weights=None, **o: build('mobilenet_v3_small', weights, url=URL),\n"
        "             description='test: MobileNetV3-Small with a test checkpoint',\n"
        "             **weights_meta('mobilenet_v3_small', URL, 'tiny_tv'))\n")
    return d


def one_error_line(p) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def cache_files(torch_home) -> list[str]:
    d = torch_home / "hub" / "checkpoints"
    return sorted(os.listdir(d)) if d.is_dir() else []


# ------------------------------------------------------------------------------------------------ torchvision

def test_torchvision_downloads_through_mirror_then_runs_offline(tmp_path):
    data, sha = mnv3_checkpoint(tmp_path)
    fname = f"tiny_tv-{sha[:8]}.pth"
    plug = write_plugin(tmp_path, fname)
    th = tmp_path / "torch"
    args = ["--plugins-dir", plug, "extract", "--backbone", "tiny_tv", "--data", "digits", "--split", "test",
            "--limit", "8", "--image-size", "64", "--quiet"]
    with FileServer({f"/mirror/{fname}": data}) as srv:
        env = {"TORCH_HOME": str(th), "TLFX_WEIGHTS_URL": srv.url + "/mirror/"}
        p = run_cli(*args, "--out", tmp_path / "a.h5", env=env)
        assert p.returncode == 0, p.stderr
        assert srv.requests == [("GET", f"/mirror/{fname}")]
    assert cache_files(th) == [fname]
    assert hashlib.sha256((th / "hub" / "checkpoints" / fname).read_bytes()).hexdigest() == sha
    a = tlfx.FeatureStore(str(tmp_path / "a.h5"))
    assert a.attrs["weights"]["sha256"] == sha and a.features.shape == (8, 1024)
    # the server is gone: the second run reads the cache and never touches the network
    p = run_cli(*args, "--out", tmp_path / "b.h5", env={**env, "TLFX_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    b = tlfx.FeatureStore(str(tmp_path / "b.h5"))
    assert (a.features[:] == b.features[:]).all()


def test_torchvision_wrong_hash_cut_connection_and_closed_port_leave_nothing(tmp_path):
    data, sha = mnv3_checkpoint(tmp_path)
    plug = write_plugin(tmp_path, f"tiny_tv-{sha[:8]}.pth")
    th = tmp_path / "torch"
    # wrong hash: the real entry's name says 047dcff4 (ImageNet weights); the server has other bytes under that name
    with FileServer({"/m/mobilenet_v3_small-047dcff4.pth": data}) as srv:
        p = run_cli("weights", "fetch", "mobilenet_v3_small",
                    env={"TORCH_HOME": str(th), "TLFX_WEIGHTS_URL": srv.url + "/m/"})
    line = one_error_line(p)
    assert "mobilenet_v3_small-047dcff4.pth" in line and "nothing was kept" in line and "047dcff4" in line
    assert cache_files(th) == []
    # cut off half way: announced length, half the bytes, connection closed
    with FileServer({f"/m/tiny_tv-{sha[:8]}.pth": data}, cut=True) as srv:
        p = run_cli("--plugins-dir", plug, "weights", "fetch", "tiny_tv",
                    env={"TORCH_HOME": str(th), "TLFX_WEIGHTS_URL": srv.url + "/m/"})
    line = one_error_line(p)
    assert "cut off" in line and "nothing was kept" in line
    assert cache_files(th) == []
    # nothing listens: fails at once with one line, not minutes of retries
    t0 = time.monotonic()
    p = run_cli("weights", "fetch", "mobilenet_v3_small",
                env={"TORCH_HOME": str(th), "TLFX_WEIGHTS_URL": f"http://127.0.0.1:{closed_port()}/m/"})
    line = one_error_line(p)
    assert "Connection refused" in line and "mobilenet_v3_small-047dcff4.pth" in line
    assert cache_files(th) == []
    assert time.monotonic() - t0 < 60  # mostly interpreter start-up on a loaded machine; the connect fails at once


def test_offline_switch_names_file_and_place(tmp_path):
    th = tmp_path / "torch"
    for env in ({"TLFX_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "1"}):
        p = run_cli("weights", "fetch", "vgg16", env={"TORCH_HOME": str(th), **env})
        line = one_error_line(p)
        assert "vgg16-397923af.pth" in line and str(th / "hub" / "checkpoints") in line
    # and in code: tlfx.weights.offline() / create_backbone(offline=True), for loaders that must never download
    os.environ["TORCH_HOME"] = str(th)
    try:
        with pytest.raises(TlfxError, match="network is off"):
            tlfx.create_backbone("vgg16", offline=True)
    finally:
        del os.environ["TORCH_HOME"]


def test_unroutable_host_fails_within_timeout():
    """A host that never answers (TEST-NET-1, RFC 5737): the socket timeout ends the attempt."""
    from tlfx import weights

    saved = weights.TIMEOUT_S
    weights.TIMEOUT_S = 2
    os.environ["TLFX_WEIGHTS_URL"] = "http://192.0.2.1:81/m/"
    t0 = time.monotonic()
    try:
        with pytest.raises(TlfxError, match="cannot download"):
            weights.download_torch_hub_file("https://download.pytorch.org/models/x-0123abcd.pth", "x")
    finally:
        weights.TIMEOUT_S = saved
        del os.environ["TLFX_WEIGHTS_URL"]
    assert time.monotonic() - t0 < 10


def test_weights_import_checks_hash_and_list_shows_file(tmp_path):
    data, sha = mnv3_checkpoint(tmp_path)
    th = tmp_path / "torch"
    env = {"TORCH_HOME": str(th), "TLFX_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    wrong = tmp_path / "mobilenet_v3_small-047dcff4.pth"
    wrong.write_bytes(data)
    line = one_error_line(run_cli("weights", "import", "mobilenet_v3_small", wrong, env=env))
    assert "expected 047dcff4" in line and cache_files(th) == []
    plug = write_plugin(tmp_path, f"tiny_tv-{sha[:8]}.pth")
    good = tmp_path / "carried.pth"
    good.write_bytes(data)
    p = run_cli("--plugins-dir", plug, "weights", "import", "tiny_tv", good, env=env)
    assert p.returncode == 0, p.stderr
    assert cache_files(th) == [f"tiny_tv-{sha[:8]}.pth"]
    p = run_cli("weights", "list", env=env)
    assert p.returncode == 0 and f"tiny_tv-{sha[:8]}.pth" in p.stdout and sha[:16] in p.stdout
    p = run_cli("--plugins-dir", plug, "backbones", env=env)
    row = next(r for r in p.stdout.splitlines() if r.startswith("tiny_tv"))
    assert "cached" in row and "MB" in row
    assert any(r.startswith("vgg16") and "missing" in r for r in p.stdout.splitlines())


# ------------------------------------------------------------------------------------------------------- timm

def hub_files(tmp_path):
    """test_vit (a tiny ViT timm keeps for tests) saved as the hub's model.safetensors of its pretrained tag."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    return {"/timm/test_vit.r160_in1k/resolve/main/model.safetensors": data}, hashlib.sha256(data).hexdigest()


def test_timm_downloads_through_hf_endpoint_then_runs_offline(tmp_path):
    files, sha = hub_files(tmp_path)
    hf = tmp_path / "hf"
    args = ["extract", "--backbone", "timm:test_vit", "--data", "digits", "--split", "test", "--limit", "6",
            "--quiet"]
    with FileServer(files, hub=True) as srv:
        env = {"HF_HOME": str(hf), "HF_ENDPOINT": srv.url}
        p = run_cli(*args, "--out", tmp_path / "a.h5", env=env)
        assert p.returncode == 0, p.stderr
        assert ("GET", "/timm/test_vit.r160_in1k/resolve/main/model.safetensors") in srv.requests
    a = tlfx.FeatureStore(str(tmp_path / "a.h5"))
    assert a.attrs["weights"]["name"] == "hf-hub:timm/test_vit.r160_in1k" and a.attrs["weights"]["sha256"] == sha
    p = run_cli(*args, "--out", tmp_path / "b.h5", env=env)  # server stopped, no offline flag: the cache answers
    assert p.returncode == 0, p.stderr
    assert (tlfx.FeatureStore(str(tmp_path / "b.h5")).features[:] == a.features[:]).all()


@pytest.mark.slow  # waits out a cut download; test_timm_mirror_down_... stays in the fast lane
def test_timm_cut_download_and_closed_port_leave_nothing(tmp_path):
    files, _ = hub_files(tmp_path)
    hf = tmp_path / "hf"
    with FileServer(files, hub=True, cut=True) as srv:
        p = run_cli("weights", "fetch", "timm:test_vit", env={"HF_HOME": str(hf), "HF_ENDPOINT": srv.url})
    line = one_error_line(p)
    assert "timm:test_vit" in line and "nothing was kept" in line
    assert not (hf / "hub" / "models--timm--test_vit.r160_in1k").exists()
    p = run_cli("weights", "fetch", "timm:test_vit",
                env={"HF_HOME": str(hf), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"})
    line = one_error_line(p)
    assert "nothing was kept" in line and not (hf / "hub" / "models--timm--test_vit.r160_in1k").exists()


def test_timm_mirror_down_is_asked_once_per_file_name(tmp_path):
    # huggingface_hub on its own retries a failing metadata request five times with back-off (a minute per file
    # name); tlfx asks once per request, so a mirror that is down is reported in seconds
    hf = tmp_path / "hf"
    with FileServer({}, hub=True, status=503) as srv:
        p = run_cli("weights", "fetch", "timm:test_vit", env={"HF_HOME": str(hf), "HF_ENDPOINT": srv.url})
    line = one_error_line(p)
    assert "timm:test_vit" in line and "nothing was kept" in line
    # per file name: one metadata request, and huggingface_hub's own "no local file, retrying" request; on its own
    # it sends 1 + 6 per name (five retries with back-off)
    asked = Counter(path.rsplit("/", 1)[-1] for _method, path in srv.requests if "/resolve/" in path)
    assert asked["model.safetensors"] >= 1, srv.requests  # the mirror was really asked
    assert max(asked.values()) <= 2, asked


def test_timm_wrong_hash_leaves_nothing(tmp_path):
    files, sha = hub_files(tmp_path)
    hf = tmp_path / "hf"
    path, good = next(iter(files.items()))
    # the hub announces the good file's sha256 as ETag; the bytes that arrive differ in their last byte
    with FileServer({path: good[:-1] + bytes([good[-1] ^ 0xFF])}, hub=True, etags={path: sha}) as srv:
        p = run_cli("weights", "fetch", "timm:test_vit", env={"HF_HOME": str(hf), "HF_ENDPOINT": srv.url})
    line = one_error_line(p)
    assert "corrupt" in line and "nothing was kept" in line
    assert not (hf / "hub" / "models--timm--test_vit.r160_in1k").exists()


# --------------------------------------------------------------------------------------------- --weights PATH

@pytest.fixture(scope="module")
def vit_sd():
    import timm

    torch.manual_seed(1)
    return timm.create_model("test_vit", pretrained=False).state_dict()


def _feature(bb):
    torch.manual_seed(3)
    x = torch.rand(2, 3, 160, 160)
    with torch.inference_mode():
        return bb.module(x)


def test_weights_file_formats(tmp_path, vit_sd):
    from safetensors.torch import save_file

    ref = _feature(tlfx.create_backbone("timm:test_vit", weights=_save(tmp_path / "plain.pth", vit_sd)))
    lightning = {"state_dict": {f"model.{k}": v for k, v in vit_sd.items()}, "epoch": 3, "global_step": 10,
                 "pytorch-lightning_version": "2.4.0"}
    ddp = {f"module.{k}": v for k, v in vit_sd.items()}
    save_file(vit_sd, tmp_path / "weights.bin")  # safetensors told by content, not by the name
    for path in (_save(tmp_path / "lightning.ckpt", lightning), _save(tmp_path / "ddp.pt", ddp),
                 str(tmp_path / "weights.bin")):
        got = _feature(tlfx.create_backbone("timm:test_vit", weights=path))
        assert torch.equal(got, ref), path


def _save(path, obj) -> str:
    torch.save(obj, path)
    return str(path)


def test_pickled_module_needs_trust_and_mismatch_is_one_line(tmp_path, vit_sd):
    import timm

    torch.manual_seed(1)
    whole = _save(tmp_path / "whole.pt", timm.create_model("test_vit", pretrained=False))
    p = run_cli("extract", "--backbone", "timm:test_vit", "--weights", whole, "--data", "digits", "--limit", "2",
                "--out", tmp_path / "w.h5")
    line = one_error_line(p)
    assert "TLFX_TRUST_PICKLE=1" in line and "whole.pt" in line
    os.environ["TLFX_TRUST_PICKLE"] = "1"
    try:
        bb = tlfx.create_backbone("timm:test_vit", weights=whole)
    finally:
        del os.environ["TLFX_TRUST_PICKLE"]
    assert torch.equal(_feature(bb), _feature(tlfx.create_backbone("timm:test_vit",
                                                                   weights=_save(tmp_path / "p.pth", vit_sd))))
    bad = dict(vit_sd)
    bad.pop("cls_token")
    bad["extra.weight"] = torch.zeros(1)
    bad["head.weight"] = torch.zeros(3, 3)
    with pytest.raises(TlfxError) as err:
        tlfx.create_backbone("timm:test_vit", weights=_save(tmp_path / "bad.pth", bad))
    msg = str(err.value)
    assert "\n" not in msg and "missing cls_token" in msg and "unexpected extra.weight" in msg and "head.weight" in msg


# ------------------------------------------------------------------------------------- transformers through timm

@pytest.mark.parametrize("name", ["timm:test_vit", "timm:test_convnext"])
def test_transformer_and_convnext_features(name):
    """penultimate = the model's own pre-logits; --layers on blocks = pooled patch tokens; deterministic and
    independent of the batch (random init, --weights none)."""
    from tlfx.backbone import PooledLayers

    bb = tlfx.create_backbone(name, weights="none")
    m = bb.module
    torch.manual_seed(0)
    x = torch.rand(5, 3, 160, 160)
    pen = PooledLayers(bb, "penultimate")
    with torch.inference_mode():
        got = pen(x)
        assert torch.allclose(got, m.forward_head(m.forward_features(x), pre_logits=True), atol=1e-6)
        assert torch.equal(got, pen(x))
        assert torch.allclose(torch.cat([pen(x[:2]), pen(x[2:])]), got, atol=1e-5)
        last = bb.stages[-1]
        blocks = PooledLayers(bb, last)(x)
        out = {}
        h = dict(m.named_modules())[last].register_forward_hook(lambda mod, a, o: out.setdefault("t", o))
        m(x)
        h.remove()
        t = out["t"]
        ref = t[:, m.num_prefix_tokens:].mean(1) if t.dim() == 3 else t.mean((2, 3))
        assert torch.allclose(blocks, ref, atol=1e-6)
        multi = PooledLayers(bb, "multi")(x)
    assert got.shape == (5, m.num_features) and multi.shape[0] == 5 and multi.shape[1] > got.shape[1]
    if name == "timm:test_vit":
        assert m.num_prefix_tokens == 1 and bb.extra["prefix_tokens"] == 1
