from robustlab.training.methods import PGDAT, Method, Standard, StepContext, StepResult
from robustlab.training.registry import METHODS
from robustlab.training.run import build_trainer, load_model, make_method
from robustlab.training.schedules import SCHEDULES, learning_rate
from robustlab.training.trainer import TrainConfig, Trainer

__all__ = ["METHODS", "PGDAT", "Method", "SCHEDULES", "Standard", "StepContext", "StepResult", "TrainConfig",
           "Trainer", "build_trainer", "learning_rate", "load_model", "make_method"]
