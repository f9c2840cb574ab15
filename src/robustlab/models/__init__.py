"""Model registry. Every model maps float inputs in [0, 1] to logits; normalization is its first layer."""
from robustlab.models.registry import MODELS, Normalize, build_model, classifier_modules

__all__ = ["MODELS", "Normalize", "build_model", "classifier_modules"]
