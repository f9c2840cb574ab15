from robustlab.evaluate.accuracy import accuracy, correct_mask

__all__ = ["accuracy", "correct_mask"]
