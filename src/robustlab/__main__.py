import os
import sys

from robustlab.cli import main
from robustlab.distributed import launched_by_torchrun

code = main()
if launched_by_torchrun():
    # DDP keeps gloo's process group and its threads alive past destroy_process_group, until the interpreter
    # finalizes, and a rank whose work was done has died there ("terminate called without an active exception"),
    # failing the whole job. Everything is written by now: leave without finalizing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
