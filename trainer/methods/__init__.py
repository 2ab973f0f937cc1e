"""The training methods, found by name: the registry (``trainer.methods.base``) and the built-in methods.

Importing this package registers FaceGCD, recognition, DINO, LAFS and FaceCoresetNet. A new method is one module that
defines a ``Method`` subclass decorated with ``@register_method``, imported below (or by the user's own code before the
scripts run); see docs/architecture.md.
"""

from trainer.methods.base import (
    Method,
    MethodSetup,
    checkpoint_method_name,
    get_method,
    method_names,
    method_of_checkpoint,
    register_method,
    unregister_method,
)
from trainer.methods import facegcd, recognition, dino, coreset  # noqa: E402,F401  (registers the built-ins)

__all__ = [
    "Method",
    "MethodSetup",
    "checkpoint_method_name",
    "get_method",
    "method_names",
    "method_of_checkpoint",
    "register_method",
    "unregister_method",
]
