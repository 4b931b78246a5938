"""Ray job entry point: `ray job submit --working-dir . -- python jobs/compose.py …`.

Takes the options of `harmonize compose` (see `harmonize compose --help`). `ray.init()` inside
the job attaches to the cluster it was submitted to, or starts a local one.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The job's working dir holds the project; make it importable even where it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import app

if __name__ == "__main__":
    app(args=["compose", *sys.argv[1:]], prog_name="jobs/compose.py")
