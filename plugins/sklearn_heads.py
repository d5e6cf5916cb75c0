"""First-party heads built on scikit-learn: logistic, sgd, svm, random_forest, knn (classes in
:mod:`tlfx_plugins.sklearn_estimators`).

Registered as ``"module:Class"`` strings, the way docs/plugins.md shows for heavy classes: scikit-learn is
imported when a head is first built, not when tlfx discovers plugins.
"""

import tlfx
import tlfx.head_model  # noqa: F401  (registers the "head" model kind wherever heads are available)

CLASSES = "tlfx_plugins.sklearn_estimators"


@tlfx.hookimpl
def register_heads(register):
    register("logistic", f"{CLASSES}:LogisticHead",
             description="multinomial logistic regression on standardised features (lbfgs)",
             param_grid={"C": [0.01, 0.1, 0.5, 2.0]})
    register("sgd", f"{CLASSES}:SGDHead",
             description="logistic regression by SGD (partial_fit); trains on stores larger than memory, chunk by chunk",
             param_grid={"alpha": [1e-5, 1e-4, 1e-3]})
    register("svm", f"{CLASSES}:SVMHead",
             description="RBF SVM on standardised features (PCA to 256 columns when wider); Nystroem above max_exact rows",
             param_grid={"C": [1.0, 10.0, 100.0]})
    register("random_forest", f"{CLASSES}:RandomForestHead", description="random forest (200 trees, all cores)",
             param_grid={"max_features": ["sqrt", 0.05], "min_samples_leaf": [1, 3]})
    register("knn", f"{CLASSES}:KNNHead", description="k nearest neighbours, cosine distance, distance-weighted",
             param_grid={"n_neighbors": [5, 10, 20], "weights": ["uniform", "distance"]})
