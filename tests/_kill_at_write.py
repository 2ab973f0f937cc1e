"""Run a top-level script and SIGKILL this process right after its atomic write of a named file.

    python tests/_kill_at_write.py NAME SCRIPT [script args...]

Every file the scripts write goes through ``os.replace`` (a temporary file renamed into place); the first replace onto
a file called NAME is let through, then the process kills itself, as a power cut or an OOM kill would.
"""

import importlib
import os
import signal
import sys
from pathlib import Path


def main() -> None:
    name, script, *argv = sys.argv[1:]
    replace = os.replace

    def replace_then_die(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        if Path(dst).name == name:
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace_then_die
    sys.argv = [script, *argv]
    sys.exit(importlib.import_module(Path(script).stem).cli(argv))


if __name__ == "__main__":
    main()
