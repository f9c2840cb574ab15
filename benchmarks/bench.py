"""Throughput benchmark; the code lives in robustlab.bench so that `robustlab bench` runs the same thing."""
import sys

from robustlab.bench import main
from robustlab.errors import run_script

if __name__ == "__main__":
    sys.exit(run_script(main))
