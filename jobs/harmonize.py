"""Ray job entry point: `ray job submit --working-dir . -- python jobs/harmonize.py …`.

Takes the options of `harmonize run` (see `harmonize run --help`). `ray.init()` inside the
run attaches to the cluster the job was submitted to, or starts a local one.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The job's working dir holds the project; make it importable even where it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import app

if __name__ == "__main__":
    app(args=["run", *sys.argv[1:]], prog_name="jobs/harmonize.py")
