"""Model registry. Every model maps float inputs in [0, 1] to logits; normalization is its first layer."""
from robustlab.models.registry import (MODELS, Normalize, batch_norms, build_model, channels_last_safe, classifier_modules,
                                       eval_mode, fast_memory_format, model_device)

__all__ = ["MODELS", "Normalize", "batch_norms", "build_model", "channels_last_safe", "classifier_modules", "eval_mode",
           "fast_memory_format", "model_device"]
