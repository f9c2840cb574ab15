"""robustlab: adversarial robustness for PyTorch — attacks, adversarial training, honest evaluation."""
__version__ = "0.1.0"


def load_model(path, which: str | None = None):
    """Load a run directory or checkpoint file as an eval-mode model on inputs in [0, 1]."""
    from robustlab.training.run import load_model as _load
    return _load(path, which)


__all__ = ["__version__", "load_model"]
