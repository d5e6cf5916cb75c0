"""Model files: a zip archive holding ``meta.json`` and members of the model's kind. Safe to load by default.

A model knows the backbone configuration and class names it was trained on. Kinds:
``head`` (a head on cached features, see :mod:`tlfx.heads`) and whatever plugins add
(``finetune``) with :func:`register_model_kind`.

A model file comes from other people, so loading it is bounded: the number of members and every member's size
(declared and actually read), the record's fields and types, and ``image_size`` and friends; loading never
touches the network (:func:`no_network`). Nothing is unpickled unless the caller says ``trust_pickle``, and a
head file may only hold types the caller names in ``trust_types`` beyond the known-safe ones (:class:`Trust`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
import sys
import tempfile
import zipfile
import zlib

from .config import COMPARED, FeatureConfig
from .errors import TlfxError

MODEL_FORMAT_VERSION = 1
_KINDS: dict[str, type] = {}
MAX_MEMBERS = 64  # a model zip holds meta.json and a handful of members
MAX_DIRECTORY_BYTES = 16 << 20  # a zip's central directory, parsed whole by zipfile before anything else
MAX_META_BYTES = 1 << 20
MAX_MEMBER_BYTES = 2 << 30  # the largest network or head a model file may carry
MAX_DEPTH = 32  # nesting of the JSON record
MAX_CLASSES = 100_000
MAX_NAME_CHARS = 1000
IMAGE_SIZE_RANGE = (8, 2048)  # pixels; 2048 px is already ~50 MB per image in float32


@dataclasses.dataclass(frozen=True)
class Trust:
    """What a caller trusts in a model file beyond what is known to be safe.

    ``types``: extra type names (``module.Class``) a skops member may hold; ``pickle``: unpickle a joblib export
    or a pickled member (runs any code in the file). A ``Trust`` is true only when ``pickle`` is, so a model kind
    written when this argument was a plain ``trust`` flag does not widen silently.
    """

    types: tuple[str, ...] = ()
    pickle: bool = False

    def __bool__(self):
        return self.pickle


def register_model_kind(kind: str, cls: type):
    """Make ``load_model`` open files whose meta says ``kind`` with ``cls.load(zipfile, meta, trust)``.

    ``trust`` is a :class:`Trust`; the zip is already bounded (member count) and ``meta`` validated by
    :func:`validate_meta`. Read members with :meth:`Model.read_member` (size-bounded).
    """
    _KINDS[kind] = cls


class Model:
    """Base class of everything ``tlfx evaluate`` / ``tlfx predict`` / ``tlfx compare`` accept.

    Subclasses implement :meth:`save_members`, :meth:`load`, :meth:`predict_proba_store` and
    :meth:`predict_proba_images`.
    """

    kind = "base"

    def __init__(self, meta: dict):
        self.meta = meta

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or [])

    @property
    def config(self) -> dict:
        """The backbone configuration (same keys as a store's config) the model expects its inputs from."""
        return dict(self.meta.get("config") or {})

    def save(self, path: str):
        """Write the model file atomically: a temporary file created exclusively beside ``path``, then renamed."""
        meta = {**self.meta, "kind": self.kind, "format_version": MODEL_FORMAT_VERSION}

        def write(f):
            with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
                z.writestr("meta.json", json.dumps(meta, indent=2, default=str))
                self.save_members(z)

        return write_atomically(path, write, "model")

    def save_members(self, z: zipfile.ZipFile):
        raise NotImplementedError

    @classmethod
    def load(cls, z: zipfile.ZipFile, meta: dict, trust: Trust = Trust()) -> Model:
        raise NotImplementedError

    @staticmethod
    def read_member(z: zipfile.ZipFile, name: str, remake: str, limit: int = MAX_MEMBER_BYTES) -> bytes:
        """A required member of the model zip (at most ``limit`` bytes), or one line saying the file is damaged
        or too large and how to ``remake`` it."""
        return read_member(z, name, remake, limit)

    def predict_proba_store(self, store):
        """Class probabilities ``[len(store), n_classes]`` for the rows of a FeatureStore."""
        raise NotImplementedError

    def predict_proba_images(self, paths: list[str]):
        """Returns ``(proba, ok_paths, [(path, reason) for unreadable files])``."""
        raise NotImplementedError

    def predict_proba_features(self, X):
        """Class probabilities for a feature array ``[n, d]``: only models that read features have them."""
        raise TlfxError(f"a {self.kind!r} model predicts from images, not from a feature array; pass a feature store "
                        f"(a path or FeatureStore) whose images it can read")

    # ---------------------------------------------------------------------- used like a fitted estimator
    @property
    def classes_(self):
        """The labels ``predict`` returns, in the order of ``predict_proba``'s columns: ``0 .. len(class_names)-1``
        (``class_names[label]`` is the name), as in a store's ``/labels``."""
        import numpy as np

        return np.arange(len(self.class_names))

    def check_store(self, store):
        """Refuse a store made with another backbone configuration or holding other classes (what evaluate checks)."""
        if getattr(self, "reads_features", True):  # a fine-tuned network reads the store's images, not its features
            fix = ("evaluate on a store combined from stores made the same way, in the same order (tlfx info on the "
                   "training store lists them)" if self.config.get("components") else
                   "extract it with the model's configuration")
            check_config(self.config, store.config, f"store {store.path!r}", fix)
        if self.class_names and store.class_names and self.class_names != store.class_names:
            raise TlfxError(f"store {store.path!r} has classes {store.class_names[:5]}... but the model was trained on "
                            f"{self.class_names[:5]}...; evaluate on a store of the same dataset")

    def predict_proba(self, X):
        """Class probabilities ``[n, len(classes_)]`` for ``X``: a feature array ``[n, d]``, or a feature store
        (a path or :class:`~tlfx.store.FeatureStore`, checked like ``evaluate`` checks it)."""
        import numpy as np

        store = _as_store(X)
        if store is None:
            return np.asarray(self.predict_proba_features(X))
        self.check_store(store)
        return np.asarray(self.predict_proba_store(store))

    def predict(self, X):
        """The most probable label of each row of ``X`` (see :meth:`predict_proba`): an index into ``class_names``."""
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(axis=1)] if len(proba) else self.classes_[:0]

    def score(self, X, y=None) -> float:
        """Accuracy on ``X`` (features ``[n, d]`` or a store); ``y`` defaults to a store's labels. Rows labeled
        -1 (unlabeled) are left out, as ``evaluate`` leaves them out."""
        import numpy as np

        store = _as_store(X)
        if y is None:
            if store is None:
                raise TlfxError("score(X, y) needs the labels y for a feature array (only a store carries its own)")
            y = store.labels
        y = np.asarray(y)
        pred = self.predict(store if store is not None else X)
        if len(pred) != len(y):
            raise TlfxError(f"score: X has {len(pred)} rows but y has {len(y)} labels")
        keep = y >= 0
        if not keep.any():
            raise TlfxError("score: no labeled rows (every label is -1)")
        return float(np.mean(pred[keep] == y[keep]))


def _as_store(X):
    """``X`` as a :class:`~tlfx.store.FeatureStore` when it is one or a path to one (complete), else None."""
    from .store import FeatureStore

    if isinstance(X, FeatureStore):
        return X
    if isinstance(X, (str, os.PathLike)):
        return FeatureStore(os.fspath(X), allow_incomplete=False)
    return None


def write_atomically(path: str, write, what: str = "file") -> str:
    """Call ``write(binary file)`` on a new temporary file in ``path``'s folder, then rename it to ``path``.

    The temporary file is created exclusively (``mkstemp``: a name nobody else has, never a planted link), and
    removed when anything fails, so neither a half-written ``path`` nor a leftover stays behind.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise TlfxError(f"cannot write {what} {path!r}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_member(z: zipfile.ZipFile, name: str, remake: str, limit: int = MAX_MEMBER_BYTES) -> bytes:
    """Member ``name`` of a model zip, read through a reader bounded to ``limit`` bytes (the declared size can
    lie); one line naming the file and how to ``remake`` it when the member is missing, too large or damaged."""
    where = getattr(z, "filename", None) or "model"
    try:
        info = z.getinfo(name)
    except KeyError:
        raise TlfxError(f"model {where!r} has no {name} member; it is damaged, {remake}") from None
    too_big = TlfxError(f"model {where!r}: member {name} is larger than {limit} bytes ({info.file_size} declared); "
                        f"refusing to read it (a damaged or hostile file); {remake}")
    if info.file_size > limit:
        raise too_big
    try:
        with z.open(info) as f:
            data = f.read(limit + 1)
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError, OSError, RuntimeError) as exc:
        raise TlfxError(f"model {where!r}: member {name} cannot be read ({type(exc).__name__}); it is damaged, "
                        f"{remake}") from None
    if len(data) > limit:
        raise too_big
    return data


def open_model_zip(path: str) -> zipfile.ZipFile:
    """The model file as an open zip, refused with one line when it is not a regular file, not a zip, or holds
    more than :data:`MAX_MEMBERS` members."""
    try:
        st = os.stat(path)
    except OSError:
        raise TlfxError(f"model file {path!r} does not exist; make one with tlfx fit or tlfx finetune") from None
    if not stat.S_ISREG(st.st_mode):
        raise TlfxError(f"model file {path!r} is not a regular file; pass a .tlfx file made by tlfx fit or tlfx finetune")
    try:
        with open(path, "rb") as f:
            check_zip_directory(f, f"model {path!r}", MAX_MEMBERS, 64 * MAX_MEMBERS * 1024)
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise TlfxError(f"{path!r} is not a tlfx model file (no meta.json in a zip archive)") from None
    if len(z.infolist()) > MAX_MEMBERS:
        n = len(z.infolist())
        z.close()
        raise TlfxError(f"model {path!r} holds {n} members, more than a tlfx model file has ({MAX_MEMBERS}); "
                        f"refusing it (a damaged or hostile file)")
    return z


def check_zip_directory(f, what: str, max_entries: int, max_bytes: int = MAX_DIRECTORY_BYTES):
    """Refuse a zip (open binary file ``f``) whose central directory is too large to parse, from its end record,
    before :class:`zipfile.ZipFile` reads the whole directory into memory. The entry count can lie, so the
    directory's byte size is bounded too (zipfile parses by size); the exact count is checked after opening."""
    end = zipfile._EndRecData(f)
    if end is None:
        raise zipfile.BadZipFile("no end of central directory")
    entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if entries > max_entries or size > max_bytes:
        raise TlfxError(f"{what} holds {entries} members in a {size}-byte directory, more than a tlfx model file has "
                        f"({max_entries} members, {max_bytes} bytes); refusing it (a damaged or hostile file)")


def read_meta(path: str) -> dict:
    """The validated JSON record of model file ``path`` (see :func:`validate_meta`)."""
    with open_model_zip(path) as z:
        return _meta_of(z, path)


def _meta_of(z: zipfile.ZipFile, path: str) -> dict:
    if "meta.json" not in z.namelist():
        raise TlfxError(f"{path!r} is not a tlfx model file (no meta.json in a zip archive)")
    raw = read_member(z, "meta.json", "make it again with tlfx fit or tlfx finetune", MAX_META_BYTES)
    try:
        meta = json.loads(raw)
    except RecursionError:
        raise TlfxError(f"model {path!r}: meta.json is nested too deeply; it is damaged or hostile") from None
    except ValueError:
        raise TlfxError(f"model {path!r}: meta.json is not valid JSON; it is damaged, make it again") from None
    return validate_meta(meta, path)


def bad_record(path: str, what: str) -> TlfxError:
    """The one-line error for a model record whose ``what`` is wrong (a field of the wrong type or range)."""
    return TlfxError(f"model {path!r}: {what} in meta.json; the file is damaged or was not made by tlfx "
                     f"(make it again with tlfx fit or tlfx finetune)")


def _depth(value, limit: int) -> int:
    """Nesting depth of a JSON value, walked without recursion; stops counting past ``limit``."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            break
        if isinstance(v, dict):
            todo.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            todo.extend((x, d + 1) for x in v)
    return deepest


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_field(path: str, name: str, value, types: tuple, optional: bool = True):
    """Refuse a record field of another type than ``types`` (one line naming the field and the type found)."""
    if value is None and optional:
        return
    ok = any(is_int(value) if t is int else isinstance(value, t) for t in types)
    if not ok:
        want = " or ".join(t.__name__ for t in types)
        raise bad_record(path, f"field {name!r} is {type(value).__name__} {_short(value)}, not {want}")


def check_pixels(path: str, name: str, value, optional: bool = True):
    """An image size in pixels within :data:`IMAGE_SIZE_RANGE`."""
    check_field(path, name, value, (int,), optional)
    lo, hi = IMAGE_SIZE_RANGE
    if value is not None and not lo <= value <= hi:
        raise bad_record(path, f"field {name!r} is {value}, outside {lo}..{hi} pixels")


def check_preprocess(path: str, name: str, p, optional: bool = True, complete: bool = True):
    """A recorded preprocessing: resize and crop within range, mean and std three finite numbers (std positive).
    ``complete``: every field must be there (a record the model is rebuilt from); else only present ones are checked
    (a configuration that is only compared)."""
    check_field(path, name, p, (dict,), optional)
    if p is None:
        return
    for key in ("resize", "crop"):
        check_pixels(path, f"{name}.{key}", p.get(key), optional=not complete)
    for key in ("mean", "std"):
        v = p.get(key)
        if v is None and not complete:
            continue
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                            and abs(x) < 1e6 for x in v)):
            raise bad_record(path, f"field {name}.{key} is {_short(v)}, not a list of 3 numbers")
        if key == "std" and not all(x > 0 for x in v):
            raise bad_record(path, f"field {name}.std is {_short(v)}; every value must be positive")
    check_field(path, f"{name}.interpolation", p.get("interpolation"), (str,))


def validate_meta(meta, path: str) -> dict:
    """Check the record's shape and types (what every kind relies on); one line and exit 2 for anything else."""
    if not isinstance(meta, dict):
        raise bad_record(path, f"the record is a {type(meta).__name__}, not an object")
    if _depth(meta, MAX_DEPTH) > MAX_DEPTH:
        raise bad_record(path, f"the record is nested deeper than {MAX_DEPTH} levels")
    version = meta.get("format_version")
    if not is_int(version) or version < 1:
        raise bad_record(path, f"format_version is {_short(version)}, not a positive integer")
    if version > MODEL_FORMAT_VERSION:
        raise TlfxError(f"model {path!r} has format version {version!r}, newer than this tlfx reads "
                        f"({MODEL_FORMAT_VERSION}); upgrade tlfx")
    check_field(path, "kind", meta.get("kind"), (str,), optional=False)
    names = meta.get("class_names")
    check_field(path, "class_names", names, (list,))
    if names is not None:
        if len(names) > MAX_CLASSES:
            raise bad_record(path, f"class_names holds {len(names)} names, more than {MAX_CLASSES}")
        bad = next((n for n in names if not isinstance(n, str) or len(n) > MAX_NAME_CHARS), None)
        if bad is not None:
            raise bad_record(path, f"class name {_short(bad)} is not a string of at most {MAX_NAME_CHARS} characters")
    config = meta.get("config")
    check_field(path, "config", config, (dict,))
    if config:
        check_config_record(path, config)
    return meta


def check_config_record(path: str, config: dict, prefix: str = "config"):
    """The recorded backbone configuration: names are strings, sizes in range, weights and preprocess objects."""
    check_field(path, f"{prefix}.backbone", config.get("backbone"), (str,))
    w = config.get("weights")
    check_field(path, f"{prefix}.weights", w, (dict,))
    for key in ("name", "sha256", "path"):
        check_field(path, f"{prefix}.weights.{key}", (w or {}).get(key), (str,))
    layers = config.get("layers")
    check_field(path, f"{prefix}.layers", layers, (str, list))
    if isinstance(layers, list) and not all(isinstance(x, str) for x in layers):
        raise bad_record(path, f"field {prefix}.layers is {_short(layers)}, not a list of layer names")
    check_field(path, f"{prefix}.pooling", config.get("pooling"), (str,))
    check_field(path, f"{prefix}.precision", config.get("precision"), (str,))
    check_field(path, f"{prefix}.tta", config.get("tta"), (str,))
    check_pixels(path, f"{prefix}.image_size", config.get("image_size"))
    check_preprocess(path, f"{prefix}.preprocess", config.get("preprocess"), complete=False)
    comps = config.get("components")
    if comps is not None:  # a head fitted on a combined store (tlfx combine): each source's configuration
        from .config import components_problem

        problem = components_problem(comps)
        if problem:
            raise bad_record(path, f"field {prefix}.components: {problem}")
        for i, c in enumerate(comps):
            check_config_record(path, c["config"], f"{prefix}.components[{i}].config")


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def load_model(path: str, trust_types=(), trust_pickle: bool = False) -> Model:
    """Open a model file. Nothing in it runs: a head file may hold only known-safe types plus the type names in
    ``trust_types``; a pickle (joblib export) opens only with ``trust_pickle=True`` (which runs any code in it)."""
    trust = Trust(tuple(trust_types or ()), bool(trust_pickle))
    if os.path.isfile(path) and not zipfile.is_zipfile(path):
        if not trust.pickle:
            raise TlfxError(f"{path!r} is a pickle (joblib) file, which runs any code it holds when loaded; pass "
                            f"--trust-pickle (trust_pickle=True) only if you made it yourself, or use the .tlfx file")
        from .head_model import HeadModel

        return HeadModel.load_joblib(path)
    with open_model_zip(path) as z:
        meta = _meta_of(z, path)
        kind = meta["kind"]
        if kind not in _KINDS:
            from .plugins import get_plugin_manager

            get_plugin_manager()  # plugins register their kinds on import
        if kind not in _KINDS:
            raise TlfxError(f"model {path!r} is of kind {kind!r}, which no installed plugin reads; "
                            f"known kinds: {', '.join(sorted(_KINDS)) or '(none)'}")
        return _KINDS[kind].load(z, meta, trust)


_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TLFX_OFFLINE")


@contextlib.contextmanager
def no_network():
    """Within this block no weights are downloaded: the offline switches are on, including huggingface_hub's
    constant (read once when it was imported, so setting the environment alone is not enough)."""
    from .weights import offline

    with offline(), _offline_environment():
        yield


@contextlib.contextmanager
def _offline_environment():
    """The offline variables and huggingface_hub's constant, for plugins that download through the hub themselves."""
    saved = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    hub = sys.modules.get("huggingface_hub.constants")
    hub_before = getattr(hub, "HF_HUB_OFFLINE", None)
    os.environ.update({k: "1" for k in _OFFLINE_ENV})
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        hub = sys.modules.get("huggingface_hub.constants")
        if hub is not None:
            hub.HF_HUB_OFFLINE = hub_before if hub_before is not None else \
                (saved["HF_HUB_OFFLINE"] or "").upper() in ("1", "ON", "YES", "TRUE")


def config_differences(a: dict, b: dict, keys=COMPARED, names=("model", "")) -> str:
    """'' when configurations ``a`` and ``b`` agree on ``keys``, else a readable list of the differences."""
    return "; ".join(FeatureConfig.from_dict(a).diff(FeatureConfig.from_dict(b), names=names, keys=keys))


def check_config(model_config: dict, other_config: dict, what: str, fix: str = "extract it with the model's configuration"):
    """Refuse features (or a rebuilt backbone) made with another backbone configuration than the model's.

    ``what`` names the other side ("store 't.h5'", "the backbone as installed here"); ``fix`` says what to do.
    """
    # older files record less; a missing tta means none (made before TTA), so it is always compared
    recorded = [k for k in COMPARED if (model_config or {}).get(k) is not None or k == "tta"]
    detail = config_differences(model_config, other_config, keys=recorded)
    if detail:
        raise TlfxError(f"{what} was made with another backbone configuration than the model ({detail}); {fix}")
