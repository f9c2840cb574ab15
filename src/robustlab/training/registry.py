"""Training methods by CLI name. A new method: a `Method` subclass in its own module, listed here."""
from robustlab.training.awp import PGDATAWP, TRADESAWP
from robustlab.training.fast_at import FastAT
from robustlab.training.free_at import FreeAT
from robustlab.training.generalist import Generalist
from robustlab.training.methods import PGDAT, Standard
from robustlab.training.trades import MART, TRADES
from robustlab.training.yopo import YOPO

METHODS = {m.name: m for m in (Standard, PGDAT, FastAT, FreeAT, YOPO, TRADES, MART, PGDATAWP, TRADESAWP,
                                 Generalist)}
