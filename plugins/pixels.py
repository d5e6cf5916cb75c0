"""The ``pixels`` baseline backbones: the image resized to 32x32, raw pixels flattened (no transfer learning).

Registered as ``"module:function"`` strings, so torch is imported when a pixels backbone is built, not on plugin
discovery; the module and factories are in :mod:`tlfx_plugins.pixels_backbone`.
"""

import tlfx

MODULE = "tlfx_plugins.pixels_backbone"


def _no_weights_needed():
    return True, "no weights needed"


@tlfx.hookimpl
def register_backbones(register):
    register("pixels", f"{MODULE}:pixels",
             description="baseline without transfer: raw RGB pixels at 32x32 (--image-size), flattened",
             weights_available=_no_weights_needed)
    register("pixels_grey", f"{MODULE}:pixels_grey",
             description="baseline without transfer: grey pixels at 32x32 (--image-size), flattened",
             weights_available=_no_weights_needed)
