"""Ray job entry point: `ray job submit --working-dir . -- python jobs/export.py …`.

Takes the options of `harmonize export` (see `harmonize export --help`). It runs on the
node the job runs on (reading masks and images in threads); no Ray tasks.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The job's working dir holds the project; make it importable even where it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import app

if __name__ == "__main__":
    app(args=["export", *sys.argv[1:]], prog_name="jobs/export.py")
