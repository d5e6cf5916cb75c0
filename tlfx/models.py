"""Model files: a zip archive holding ``meta.json`` and members of the model's kind. Safe to load by default.

A model knows the backbone configuration and class names it was trained on. Kinds:
``head`` (a head on cached features, see :mod:`tlfx.heads`) and whatever plugins add
(``finetune``) with :func:`register_model_kind`. Loading never unpickles unless ``trust=True``.
"""

from __future__ import annotations

import json
import os
import zipfile

from .errors import TlfxError

MODEL_FORMAT_VERSION = 1
_KINDS: dict[str, type] = {}


def register_model_kind(kind: str, cls: type):
    """Make ``load_model`` open files whose meta says ``kind`` with ``cls.load(zipfile, meta, trust)``."""
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
        meta = {**self.meta, "kind": self.kind, "format_version": MODEL_FORMAT_VERSION}
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                z.writestr("meta.json", json.dumps(meta, indent=2, default=str))
                self.save_members(z)
            os.replace(tmp, path)
        except OSError as exc:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise TlfxError(f"cannot write model {path!r}: {exc.strerror or exc}") from None
        return path

    def save_members(self, z: zipfile.ZipFile):
        raise NotImplementedError

    @classmethod
    def load(cls, z: zipfile.ZipFile, meta: dict, trust: bool = False) -> Model:
        raise NotImplementedError

    @staticmethod
    def read_member(z: zipfile.ZipFile, name: str, remake: str) -> bytes:
        """A required member of the model zip, or one line saying the file is damaged and how to ``remake`` it."""
        try:
            return z.read(name)
        except KeyError:
            where = getattr(z, "filename", None) or "model"
            raise TlfxError(f"model {where!r} has no {name} member; it is damaged, {remake}") from None

    def predict_proba_store(self, store):
        """Class probabilities ``[len(store), n_classes]`` for the rows of a FeatureStore."""
        raise NotImplementedError

    def predict_proba_images(self, paths: list[str]):
        """Returns ``(proba, ok_paths, [(path, reason) for unreadable files])``."""
        raise NotImplementedError


def read_meta(path: str) -> dict:
    if not os.path.isfile(path):
        raise TlfxError(f"model file {path!r} does not exist; make one with tlfx fit or tlfx finetune")
    try:
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read("meta.json"))
    except (zipfile.BadZipFile, KeyError, ValueError):
        raise TlfxError(f"{path!r} is not a tlfx model file (no meta.json in a zip archive)") from None
    version = meta.get("format_version")
    if not isinstance(version, int) or version > MODEL_FORMAT_VERSION:
        raise TlfxError(f"model {path!r} has format version {version!r}, newer than this tlfx reads "
                        f"({MODEL_FORMAT_VERSION}); upgrade tlfx")
    return meta


def load_model(path: str, trust: bool = False) -> Model:
    """Open a model file. Nothing in the file is executed unless ``trust=True`` (pickle-based exports)."""
    if os.path.isfile(path) and not zipfile.is_zipfile(path):
        if not trust:
            raise TlfxError(f"{path!r} is a pickle (joblib) file, which can run code when loaded; pass --trust "
                            f"(trust=True) only if you made it yourself, or use the .tlfx model file")
        from .head_model import HeadModel

        return HeadModel.load_joblib(path)
    meta = read_meta(path)
    kind = meta.get("kind")
    if kind not in _KINDS:
        from .plugins import get_plugin_manager

        get_plugin_manager()  # plugins register their kinds on import
    if kind not in _KINDS:
        raise TlfxError(f"model {path!r} is of kind {kind!r}, which no installed plugin reads; "
                        f"known kinds: {', '.join(sorted(_KINDS)) or '(none)'}")
    with zipfile.ZipFile(path) as z:
        return _KINDS[kind].load(z, meta, trust)


FEATURE_CONFIG_KEYS = ("backbone", "weights", "layers", "pooling", "image_size", "preprocess")


def config_differences(a: dict, b: dict, keys=FEATURE_CONFIG_KEYS, names=("model", "")) -> str:
    """'' when ``a`` and ``b`` agree on ``keys``, else a readable list of the differences (weights by name)."""
    def show(v):
        return v.get("name") if isinstance(v, dict) and "sha256" in v else v

    from .config import runtime_differences

    left, right = (f"{n} " if n else "" for n in names)
    parts = [f"{k}: {left}{show(a.get(k))} vs {right}{show(b.get(k))}" for k in keys if a.get(k) != b.get(k)]
    return "; ".join(parts + runtime_differences(a, b, names))  # torch vs OpenVINO, INT8 vs float: never mixed


def check_config(model_config: dict, store_config: dict, what: str):
    """Refuse features made with another backbone configuration than the model's."""
    detail = config_differences(model_config, store_config)
    if detail:
        raise TlfxError(f"{what} was made with another backbone configuration than the model ({detail}); "
                        f"extract it with the model's configuration")
