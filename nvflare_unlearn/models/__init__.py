"""Models: the registry the unlearning engine knows how to trace and prune (CIFAR ResNets with option-B shortcuts,
VGG-BN, small CNN), plus any model of your own named by import path ``"package.module:factory"`` (``registry``):
every machine rebuilds a model from its name. May import ``options`` and ``_validation`` only."""

from nvflare_unlearn.models.registry import (
    MODEL_NAMES,
    build_model,
    check_model_name,
    example_input,
    final_linear_name,
    input_shape,
    is_import_path,
    model_name_of,
    model_spec,
)

__all__ = [
    "MODEL_NAMES",
    "build_model",
    "check_model_name",
    "final_linear_name",
    "example_input",
    "input_shape",
    "is_import_path",
    "model_name_of",
    "model_spec",
]
