"""The `harmonize` command line: run the pipeline, build datasets and models, read results.

Enters: command-line arguments (and, for storage credentials, the usual AWS/GCS environment
read by fsspec itself).
Leaves: the work each command does (a `RunConfig` handed to `pipeline.run.run`, a manifest, a
model folder, a report), its summary printed; an error as one line and a non-zero exit.

One module a command group, as the package is laid out: `job.py` (run, runs, schema),
`demo.py` (demo), `model_dir.py` (model assemble / check), `datasets.py` (manifest iharmony4 /
folder), `tools.py` (evaluate, select, stats, report), `compose.py` (compose, export: the
copy-paste recipe's two ends). `options.py` declares the options they share, `app.py` the
application.
"""

from __future__ import annotations

# Importing the command modules registers their commands on `app`.
from pipeline.cli import compose, datasets, demo, job, model_dir, tools  # noqa: F401
from pipeline.cli.app import app, main

__all__ = ["app", "main"]
