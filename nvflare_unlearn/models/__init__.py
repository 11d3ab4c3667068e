"""Models the unlearning engine knows how to trace and prune (CIFAR ResNets with option-B shortcuts, VGG-BN, small CNN)."""

from .registry import MODEL_NAMES, build_model, example_input, input_shape, model_name_of

__all__ = ["MODEL_NAMES", "build_model", "example_input", "input_shape", "model_name_of"]
