"""Pretrained weights: first-use downloads through torchvision's and huggingface_hub's own APIs, the offline switch,
mirrors, and the cache that ``tlfx weights`` lists and fills.

- ``TLFX_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` (or ``with offline():`` in code) forbid the network: a backbone whose
  weights are not cached fails with one line naming the file to place where.
- ``TLFX_WEIGHTS_URL=http://host/path/`` replaces the base URL of torchvision's weight files (internal mirrors).
- ``HF_ENDPOINT`` points huggingface_hub (timm, ``hf-hub:`` names) at a mirror, as huggingface_hub defines it.
- Every download has a socket timeout (:data:`TIMEOUT_S`) and no retry loop of ours; a failed, cut-off or corrupt
  download leaves nothing in the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import sys
import threading
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

from .errors import TlfxError


@dataclass
class WeightsInfo:
    """Where a backbone's weights came from: ``name``, the file's ``sha256`` and ``path`` (recorded in stores)."""

    name: str
    sha256: str = ""
    path: str = ""

    def to_dict(self):
        return {"name": self.name, "sha256": self.sha256, "path": self.path}


_SHA_CACHE: dict[tuple, str] = {}


def sha256_of(path: str) -> str:
    """The sha256 of a file's content, read now (integrity checks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str) -> str:
    """The sha256 of a weights file, remembered per (path, size, mtime) for this process."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_of(path)
    return _SHA_CACHE[key]

OFFLINE_ENV = "TLFX_OFFLINE"
MIRROR_ENV = "TLFX_WEIGHTS_URL"
TIMEOUT_S = 15
HF_TIMEOUT_S = 3  # per metadata request, one attempt; timm asks for up to two file names: 2 x (3 + 3) s < 15 s
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")  # torchvision's file-name convention: name-<sha256 prefix>.pth
_forced = threading.local()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def is_offline() -> bool:
    """True when the network is forbidden: TLFX_OFFLINE, HF_HUB_OFFLINE, or inside ``with offline():``."""
    return (getattr(_forced, "depth", 0) > 0 or _truthy(os.environ.get(OFFLINE_ENV))
            or _truthy(os.environ.get("HF_HUB_OFFLINE")))


@contextlib.contextmanager
def offline():
    """Forbid every weights download in this thread while the block runs (loading a saved model, tests)."""
    _forced.depth = getattr(_forced, "depth", 0) + 1
    try:
        yield
    finally:
        _forced.depth -= 1


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """urllib (used by torch.hub) has no timeout of its own: bound connect and every read."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


# ---------------------------------------------------------------------------------------------- torchvision / torch hub

def torch_checkpoints_dir() -> str:
    """torch hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``), where torchvision keeps its weight files."""
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints")


def mirrored_url(url: str) -> str:
    """``url`` with its base replaced by ``TLFX_WEIGHTS_URL`` when that is set (same file name)."""
    base = os.environ.get(MIRROR_ENV, "").strip()
    if not base:
        return url
    if urlparse(base).scheme not in ("http", "https", "file"):
        raise TlfxError(f"{MIRROR_ENV}={base!r} is not an http(s):// or file:// URL; set it to the folder that holds "
                        f"the weight files, e.g. http://mirror.example/torchvision/")
    return base.rstrip("/") + "/" + os.path.basename(urlparse(url).path)


def expected_hash_prefix(file_name: str) -> str:
    """The sha256 prefix torchvision encodes in a weight file's name ('' when the name carries none)."""
    m = _HASH_IN_NAME.search(file_name)
    return m.group(1) if m else ""


def torch_cached_path(url: str) -> str:
    return os.path.join(torch_checkpoints_dir(), os.path.basename(urlparse(url).path))


def _place_hint(what: str, url: str) -> str:
    path = torch_cached_path(url)
    return (f"place {os.path.basename(path)} in {os.path.dirname(path)} (from {mirrored_url(url)}; "
            f"or run 'tlfx weights import {what} FILE', or pass --weights PATH)")


def load_torch_hub_state_dict(url: str, what: str) -> tuple[dict, str]:
    """State dict of a torchvision weights URL: from the hub cache, else downloaded through
    ``torch.hub.load_state_dict_from_url`` (torchvision's own path: progress bar, hash check, atomic rename).

    Returns ``(state_dict, cached_path)``.
    """
    import torch

    path = torch_cached_path(url)
    if not os.path.isfile(path):
        if is_offline():
            raise TlfxError(f"weights for {what!r} are not cached and the network is off ({OFFLINE_ENV}/HF_HUB_OFFLINE): "
                            + _place_hint(what, url))
        download_torch_hub_file(url, what)
    try:
        sd = torch.hub.load_state_dict_from_url(url, progress=False, check_hash=False, weights_only=True)
    except Exception as exc:
        raise TlfxError(f"cached weights {path!r} for {what!r} cannot be read ({type(exc).__name__}); delete the file "
                        f"and run again to download it afresh") from None
    return sd, path


def download_torch_hub_file(url: str, what: str) -> str:
    """Download a torchvision weight file into the hub cache (hash-checked, atomic); one line on any failure."""
    import torch

    src = mirrored_url(url)
    dst = torch_cached_path(url)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    prefix = expected_hash_prefix(os.path.basename(dst))
    try:
        with _socket_timeout(TIMEOUT_S):
            # torch writes <dst>.<uuid>.partial, checks the sha256 prefix, then renames; it removes the partial
            # file on every failure, so the cache never holds half a file.
            torch.hub.download_url_to_file(src, dst, hash_prefix=prefix or None, progress=sys.stderr.isatty())
    except RuntimeError as exc:
        if "invalid hash value" not in str(exc):
            raise
        raise TlfxError(f"download of {os.path.basename(dst)} from {src} was cut off or is corrupt (its sha256 does not "
                        f"start with {prefix}); nothing was kept in the cache; run again, or check the mirror") from None
    except Exception as exc:
        raise TlfxError(f"cannot download weights for {what!r} from {src} ({_reason(exc)}); nothing was kept in the "
                        f"cache; check the network or set {MIRROR_ENV} to a mirror, or on an offline machine "
                        + _place_hint(what, url)) from None
    return dst


def _reason(exc: BaseException) -> str:
    import urllib.error

    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"no answer within {TIMEOUT_S} s"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:150]}" if text else type(exc).__name__


def import_torch_hub_file(url: str, what: str, file: str) -> str:
    """Copy a weight file the user carried in into the hub cache, after checking it against the hash in its name."""
    _check_regular_file(file)
    dst = torch_cached_path(url)
    prefix = expected_hash_prefix(os.path.basename(dst))
    digest = file_sha256(file)
    if prefix and not digest.startswith(prefix):
        raise TlfxError(f"{file!r} is not the weight file of {what!r}: its sha256 starts with {digest[:len(prefix)]}, "
                        f"expected {prefix} ({os.path.basename(dst)}); download it again")
    _atomic_copy(file, dst)
    return dst


def _check_regular_file(file: str):
    if not os.path.isfile(file):
        raise TlfxError(f"{file!r} is not a regular file; pass the path of a weights file")


def _atomic_copy(src: str, dst: str):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.{uuid.uuid4().hex}.partial"
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -------------------------------------------------------------------------------------------------- huggingface_hub

def _sync_hf_constants(offline_now: bool):
    """huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import: bring its constants in line with the
    environment (which may have changed since, in a long-running process) and with tlfx's offline switch."""
    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    if endpoint and endpoint != constants.ENDPOINT:
        constants.ENDPOINT = endpoint
        constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_HUB_OFFLINE = offline_now
    constants.HF_HUB_ETAG_TIMEOUT = min(constants.HF_HUB_ETAG_TIMEOUT, HF_TIMEOUT_S)
    constants.HF_HUB_DOWNLOAD_TIMEOUT = min(constants.HF_HUB_DOWNLOAD_TIMEOUT, TIMEOUT_S)


def _hf_no_metadata_retries():
    """huggingface_hub retries a failed metadata request (HEAD) five times with back-off and a 60 s timeout when
    nothing is cached: a minute per file name before an unreachable host is reported. Bound it to one attempt of
    :data:`HF_TIMEOUT_S` while tlfx downloads (an interrupted file download still resumes as huggingface_hub does).
    Returns the function that undoes it; private names that a later huggingface_hub lacks are left alone."""
    import functools

    undo = []
    try:
        from huggingface_hub import file_download
        from huggingface_hub.utils import _http
    except ImportError:
        return lambda: None
    if isinstance(getattr(file_download, "_ETAG_RETRY_TIMEOUT", None), (int, float)):
        undo.append((file_download, "_ETAG_RETRY_TIMEOUT", file_download._ETAG_RETRY_TIMEOUT))
        file_download._ETAG_RETRY_TIMEOUT = min(file_download._ETAG_RETRY_TIMEOUT, HF_TIMEOUT_S)
    backoff = getattr(_http, "http_backoff", None)
    if callable(backoff) and not getattr(backoff, "_tlfx_bounded", False):
        @functools.wraps(backoff)
        def bounded(*args, **kwargs):
            kwargs["max_retries"] = 0
            return backoff(*args, **kwargs)

        bounded._tlfx_bounded = True
        undo.append((_http, "http_backoff", backoff))
        _http.http_backoff = bounded

    def restore():
        for module, name, value in reversed(undo):
            setattr(module, name, value)

    return restore


@contextlib.contextmanager
def hf_network(allowed: bool):
    """Run a huggingface_hub download (e.g. ``timm.create_model(pretrained=True)``) with the network on or off."""
    import logging

    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    saved = constants.HF_HUB_OFFLINE
    log = logging.getLogger("huggingface_hub")
    level, bars_off = log.level, are_progress_bars_disabled()
    _sync_hf_constants(not allowed)
    log.setLevel(logging.ERROR)  # its per-retry warnings would bury tlfx's one line
    if not sys.stderr.isatty():
        disable_progress_bars()  # a progress bar on a terminal only
    undo = _hf_no_metadata_retries()
    try:
        yield
    finally:
        undo()
        constants.HF_HUB_OFFLINE = saved
        log.setLevel(level)
        if not bars_off:
            enable_progress_bars()


def hf_endpoint() -> str:
    from huggingface_hub import constants

    _sync_hf_constants(is_offline())
    return constants.ENDPOINT


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def hf_split(hub_id: str) -> tuple[str, str | None]:
    repo, _, rev = hub_id.partition("@")
    return repo, rev or None


def hf_cached_file(hub_id: str) -> str | None:
    """The cached weight file of a hub repo id (``repo[@revision]``), or None."""
    from huggingface_hub import try_to_load_from_cache

    repo, rev = hf_split(hub_id)
    for fname in HF_WEIGHT_FILES:
        found = try_to_load_from_cache(repo, fname, revision=rev)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def hf_repo_dir(hub_id: str) -> str:
    from huggingface_hub import constants

    repo, _ = hf_split(hub_id)
    return os.path.join(constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--"))


def hf_download(hub_id: str, what: str, load):
    """Call ``load()`` (which downloads through huggingface_hub) with timeouts; on failure clean the repo's
    partial files out of the cache and raise one line. After success, check the blob against its sha256 etag."""
    repo_dir = hf_repo_dir(hub_id)
    existed = os.path.isdir(repo_dir)
    try:
        with hf_network(True):
            result = load()
    except TlfxError:
        raise
    except Exception as exc:
        _hf_clean(repo_dir, existed)
        raise TlfxError(f"cannot download weights for {what!r} from {hf_endpoint()} ({_hf_reason(exc)}); nothing was "
                        f"kept in the cache; check the network or HF_ENDPOINT, or on an offline machine "
                        f"'tlfx weights import {what} FILE' or --weights PATH") from None
    path = hf_cached_file(hub_id)
    if path:
        blob = os.path.basename(os.path.realpath(path))
        if re.fullmatch(r"[0-9a-f]{64}", blob) and file_sha256(path) != blob:
            _hf_clean(repo_dir, existed, everything=True)
            raise TlfxError(f"download of {what!r} from {hf_endpoint()} is corrupt (sha256 differs from the hub's "
                            f"{blob[:12]}...); nothing was kept in the cache; run again, or check the mirror")
    return result


def _hf_reason(exc: BaseException) -> str:
    seen, cur = [], exc
    while cur is not None and len(seen) < 5:  # the root cause names the network problem; the wrapper names the file
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    root = seen[-1]
    text = (str(root).strip().splitlines() or [""])[0]
    return f"{type(root).__name__}: {text[:150]}" if text else type(root).__name__


def _hf_clean(repo_dir: str, existed: bool, everything: bool = False):
    """Remove what a failed download left: the whole repo folder if it is new, else its partial blobs."""
    if not os.path.isdir(repo_dir):
        return
    if not existed:
        shutil.rmtree(repo_dir, ignore_errors=True)
        return
    for root, _, files in os.walk(os.path.join(repo_dir, "blobs")):
        for f in files:
            if f.endswith(".incomplete"):
                os.remove(os.path.join(root, f))
    if everything:
        shutil.rmtree(repo_dir, ignore_errors=True)


def import_hf_file(hub_id: str, file: str) -> str:
    """Place a weight file carried in by hand into the hub cache so that offline loads find it.

    The hub cache layout is ``models--org--name/{refs/<rev>, snapshots/<commit>/<file>}``; a hand-placed file gets
    the commit id ``0`` * 40, as there is no hub to ask.
    """
    _check_regular_file(file)
    repo, rev = hf_split(hub_id)
    fname = "model.safetensors" if _is_safetensors(file) else "pytorch_model.bin"
    repo_dir = hf_repo_dir(hub_id)
    commit = "0" * 40
    dst = os.path.join(repo_dir, "snapshots", commit, fname)
    _atomic_copy(file, dst)
    ref = os.path.join(repo_dir, "refs", rev or "main")
    os.makedirs(os.path.dirname(ref), exist_ok=True)
    with open(ref, "w") as f:
        f.write(commit)
    return dst


def _is_safetensors(path: str) -> bool:
    """safetensors files start with an 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000


# ---------------------------------------------------------------------------------------------------- listing

def cached_files() -> list[dict]:
    """Every weight file in the torch hub and Hugging Face caches: name, size, sha256, where."""
    rows = []
    ckpt = torch_checkpoints_dir()
    if os.path.isdir(ckpt):
        for f in sorted(os.listdir(ckpt)):
            p = os.path.join(ckpt, f)
            if os.path.isfile(p) and not f.endswith(".partial"):
                rows.append({"name": f, "source": "torchvision", "size": os.path.getsize(p), "path": p})
    from huggingface_hub import constants

    hub = constants.HF_HUB_CACHE
    if os.path.isdir(hub):
        for d in sorted(os.listdir(hub)):
            if not d.startswith("models--"):
                continue
            for root, _, files in os.walk(os.path.join(hub, d, "snapshots")):
                for f in files:
                    p = os.path.join(root, f)
                    if f in HF_WEIGHT_FILES and os.path.isfile(p):
                        repo = d[len("models--"):].replace("--", "/")
                        rows.append({"name": f"hf-hub:{repo}/{f}", "source": "huggingface", "size": os.path.getsize(p),
                                     "path": p})
    for r in rows:
        r["sha256"] = file_sha256(r["path"])
    return rows


def human_size(n: int | float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
