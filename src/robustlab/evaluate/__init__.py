"""Evaluation: accuracy under attack, corruptions (OOD accuracy), gradient-masking sanity checks, reports."""
from robustlab.evaluate.accuracy import accuracy, correct_mask, fraction
from robustlab.evaluate.corruptions import (CORRUPTIONS, OODResult, corrupt, corruption_suite, default_corruptions,
                                            ood_accuracy, plot_corruptions)
from robustlab.evaluate.evaluation import evaluate_model, load_adversarial
from robustlab.evaluate.sanity import Check, SanityReport, random_search, sanity_checks, to_markdown

__all__ = ["CORRUPTIONS", "Check", "OODResult", "SanityReport", "accuracy", "corrupt", "correct_mask",
           "corruption_suite", "default_corruptions", "evaluate_model", "fraction", "load_adversarial",
           "ood_accuracy", "plot_corruptions", "random_search", "sanity_checks", "to_markdown"]
