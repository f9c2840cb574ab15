"""Training methods by CLI name. A new method: a `Method` subclass in its own module, listed here."""
from robustlab.training.methods import PGDAT, Standard

METHODS = {m.name: m for m in (Standard, PGDAT)}
