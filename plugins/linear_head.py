"""First-party ``linear`` head: torch ``nn.Linear`` trained on cached features
(class :class:`tlfx_plugins.linear_estimator.LinearHead`).

Registered as a ``"module:Class"`` string: neither scikit-learn nor torch is imported on plugin discovery.
"""

import tlfx


@tlfx.hookimpl
def register_heads(register):
    register("linear", "tlfx_plugins.linear_estimator:LinearHead",
             description="torch nn.Linear (softmax regression), AdamW + weight decay, early stopping; CUDA when present",
             param_grid={"weight_decay": [1e-4, 1e-2, 1e-1], "lr": [1e-3, 3e-3]})
