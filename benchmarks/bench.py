"""Throughput benchmark; the code lives in robustlab.bench so that `robustlab bench` runs the same thing."""
from robustlab.bench import main

if __name__ == "__main__":
    main()
