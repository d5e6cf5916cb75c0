"""An example third-party tlfx plugin.

It registers, through the four tlfx hooks and nothing else:

- backbone ``colour_hog``: a joint colour histogram plus HOG (histogram of oriented gradients) computed by a small
  torch module, no weights; a classic hand-made baseline to set beside pretrained CNN features;
- head ``nearest_class_mean``: a scikit-learn classifier that predicts the class whose mean feature is closest;
- head ``pca_logistic``: a scikit-learn Pipeline (standardise, PCA, logistic regression) with nested parameters
  (``tlfx fit --param pca__n_components=8``);
- dataset ``shapes[:N]``: N synthetic images per class of circles, squares, triangles and stars drawn with Pillow;
- command ``tlfx export-shapes``: writes the shapes dataset as an image folder (``imagefolder:DIR``).

Installed, ``tlfx plugins`` lists it as ``example`` (the entry-point name in pyproject.toml).
"""

import tlfx

from .backbone import build_colour_hog
from .commands import export_shapes
from .head import NearestClassMean, pca_logistic
from .shapes import SHAPES, shapes_dataset

__version__ = "0.1.0"
__all__ = ["NearestClassMean", "pca_logistic", "build_colour_hog", "shapes_dataset", "export_shapes", "SHAPES"]


@tlfx.hookimpl
def register_backbones(register):
    register("colour_hog", build_colour_hog,
             description="example plugin: 64-bin colour histogram + 4x4-cell HOG (208-d), no weights",
             weights_available=lambda: (True, "no weights: hand-made features"))


@tlfx.hookimpl
def register_heads(register):
    register("nearest_class_mean", NearestClassMean,
             description="example plugin: nearest class mean on standardised features",
             param_grid={"metric": ["cosine", "euclidean"], "temperature": [0.01, 0.03, 0.1, 0.3]})
    register("pca_logistic", pca_logistic,
             description="example plugin: Pipeline of standardise, PCA, logistic regression (nested parameters)",
             param_grid={"pca__n_components": [0.8, 0.95], "logisticregression__C": [0.1, 1.0]})


@tlfx.hookimpl
def register_datasets(register):
    register("shapes", shapes_dataset,
             description="example plugin: shapes[:N], N synthetic images per class (circle, square, triangle, star)",
             splits=("train", "test"))


@tlfx.hookimpl
def register_commands(cli):
    cli.add_command(export_shapes)
