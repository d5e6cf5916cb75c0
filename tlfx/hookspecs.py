"""Hook specifications: the contract every tlfx plugin, first-party or third-party, implements.

A plugin is a module (or object) with functions decorated by :data:`tlfx.hookimpl` and named like the
specs below. It is found through the ``tlfx`` entry-point group, ``--plugins-dir`` or ``TLFX_PLUGINS_DIR``.
The author's guide, with a complete minimal plugin, is ``docs/plugins.md``; :mod:`tlfx.testing` checks a plugin
against these contracts.

Names are letters, digits, ``_``, ``-`` and ``.`` (no ``:`` or ``,``: data specs and ``--heads a,b`` use them)
and global across installed plugins: a name two plugins register is unusable (one line naming both) until
``TLFX_LOAD_PLUGINS`` leaves one out. ``factory`` is a callable or a ``"package.module:attribute"`` string imported
on first use (keeps discovery fast). ``register`` takes only the keywords listed below for its kind; another one
makes the hook fail. A hook that raises loses what it registered and is reported by ``tlfx plugins``; the other
plugins keep working.
"""

import pluggy

hookspec = pluggy.HookspecMarker("tlfx")
hookimpl = pluggy.HookimplMarker("tlfx")


@hookspec
def register_backbones(register):
    """Register frozen feature extractors.

    Call ``register(name, factory, *, description="", weights_available=None, takes_argument=False)`` once per
    backbone. ``factory(weights=None, **options)`` returns a :class:`tlfx.backbone.Backbone`: a torch module with
    its preprocessing (:class:`~tlfx.backbone.Preprocess`), feature ``stages`` (module names, for
    ``--layers multi``), ``classifier`` (the final linear layer whose input is the penultimate embedding, or None
    when the module's output is the embedding) and weights record (:class:`~tlfx.backbone.WeightsInfo`).
    ``weights`` is None for the default pretrained weights, a local state-dict path (``--weights``), or ``"none"``
    for random initialisation. tlfx sets eval mode and freezes the parameters. Features must be finite, of one
    dimension, and independent of the other images in a batch.

    ``weights_available()`` returns ``(bool, message)``: whether the default weights are present offline and where
    they come from (or which file to place where). ``takes_argument=True`` makes ``name:ARG`` valid and passes
    ``model=ARG`` to the factory. Optional: ``weights_status()`` returns ``{"status": "cached" | "downloadable" |
    "offline-only" | "missing", "size": bytes or None, "where": str}`` for ``tlfx backbones``, and
    ``import_weights(file)`` places a weights file the user carried in and returns where (``tlfx weights import``).
    Raise :class:`tlfx.TlfxError` (one line: the bad value and the fix) for missing weights or bad options.
    """


@hookspec
def register_heads(register):
    """Register classifiers trained on cached features.

    Call ``register(name, factory, *, description="", param_grid=None)``. ``factory(**params)`` returns an unfitted
    scikit-learn classifier (an estimator class will do): ``fit(X, y)`` returning self and setting ``classes_``
    (the sorted labels seen), ``predict``, ``predict_proba`` (rows sum to 1, columns in ``classes_`` order),
    ``get_params``/``set_params`` (every parameter an ``__init__`` argument, stored unchanged), and
    ``NotFittedError`` before ``fit``. ``X`` is float32 ``[N, D]``, ``y`` int64. A fitted head must survive skops
    (numpy arrays, Python scalars, scikit-learn objects: model files refuse other types).
    ``param_grid`` is the ``{param: [values]}`` grid ``tlfx fit --search`` cross-validates over; parameter names are
    ``get_params(deep=True)`` names, so a Pipeline head takes ``step__param`` (also in ``tlfx fit --param``).
    """


@hookspec
def register_datasets(register):
    """Register image sources addressed by a data spec ``NAME[:ARG]``.

    Call ``register(name, factory, *, description="", splits=("train", "test"), needs_argument=False,
    argument="ARG")``. ``factory(arg, split=None, root=None)`` returns a :class:`tlfx.datasets.ImageDataset`
    (usually :class:`~tlfx.datasets.ArrayDataset` or :class:`~tlfx.datasets.FileDataset`): unique str ``ids``,
    int64 ``labels`` (-1: unlabelled), ``class_names``, ``load(i, target=None)`` giving an RGB PIL image, the same
    order and ``fingerprint()`` every time. ``arg`` is the text after ``NAME:`` (None if absent), ``split`` the
    ``--split`` value (None: the dataset's default), ``root`` the ``--root`` value. ``splits`` lists the valid
    ``--split`` values; ``needs_argument=True`` refuses ``NAME`` without ``:ARG``. tlfx applies ``--limit`` with
    ``take(n)``.
    """


@hookspec
def register_commands(cli):
    """Add click commands or groups to the ``tlfx`` command line: ``cli.add_command(cmd)``.

    A command may not replace an existing one (core or an earlier plugin's): a clash is refused and reported by
    ``tlfx plugins``. Give commands ``Examples:`` in their help and raise :class:`tlfx.TlfxError` for bad input.
    """
