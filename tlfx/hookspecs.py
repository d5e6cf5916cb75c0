"""Hook specifications: the contract every tlfx plugin, first-party or third-party, implements.

A plugin is a module (or object) with functions decorated by :data:`tlfx.hookimpl` and named like the
specs below. It is found through the ``tlfx`` entry-point group, ``--plugins-dir`` or ``TLFX_PLUGINS_DIR``.
"""

import pluggy

hookspec = pluggy.HookspecMarker("tlfx")
hookimpl = pluggy.HookimplMarker("tlfx")


@hookspec
def register_backbones(register):
    """Register frozen feature extractors.

    Call ``register(name, factory, *, description="", weights_available=None)`` once per backbone.
    ``factory(weights=None, **options)`` returns a :class:`tlfx.backbone.Backbone` (a torch module with its
    preprocessing, feature stages and weights record). ``weights`` is a local state-dict path or None for the
    default pretrained weights; ``"none"`` asks for random initialisation. ``weights_available()`` returns
    ``(bool, message)``: whether the default weights are present offline and where they come from.
    """


@hookspec
def register_heads(register):
    """Register classifiers trained on cached features.

    Call ``register(name, factory, *, description="", param_grid=None)``. ``factory(**params)`` returns a
    scikit-learn estimator (``fit``/``predict``/``predict_proba``/``get_params``/``set_params``).
    ``param_grid`` is the grid ``tlfx fit --search`` cross-validates over.
    """


@hookspec
def register_datasets(register):
    """Register image sources addressed by a data spec ``NAME[:ARG]``.

    Call ``register(name, factory, *, description="", splits=("train", "test"))``.
    ``factory(arg, split, root=None)`` returns a :class:`tlfx.datasets.ImageDataset`.
    """


@hookspec
def register_commands(cli):
    """Add click commands or groups to the ``tlfx`` command line: ``cli.add_command(cmd)``."""
