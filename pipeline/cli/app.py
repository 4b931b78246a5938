"""The `harmonize` application: its command groups, how a command fails, and the entry point.

Enters: command-line arguments (`main`), or a command's error (`fail`).
Leaves: the Typer apps the command modules register on (`app`, `model_app`, `manifest_app`);
an error as one red line and an exit code, never a traceback for what a user can fix.
"""

from __future__ import annotations

import logging
import os
from typing import NoReturn

import typer

app = typer.Typer(
    help="Harmonize composite images at scale: manifests on object storage in, harmonized "
    "images and scored results Parquet out, on a Ray cluster or this machine.",
    no_args_is_help=True,
    add_completion=False,
)
model_app = typer.Typer(
    help="Build and inspect DiffHarmony model directories.", no_args_is_help=True
)
app.add_typer(model_app, name="model")
manifest_app = typer.Typer(
    help="Build a manifest: from the iHarmony4 layout, or any folder with a naming rule.",
    no_args_is_help=True,
)
app.add_typer(manifest_app, name="manifest")


@app.callback()
def _before_any_command() -> None:
    """Ray 2.60 turns token authentication on for a local cluster it starts, and warns that it
    did whenever RAY_AUTH_MODE is unset; it says nothing when the mode is set. The same choice,
    made explicit, before anything imports Ray (Ray reads it once, at import). Not for a job
    Ray started (`ray job submit`, a RayJob: RAY_ADDRESS is set): there Ray follows the
    cluster's own mode, which may be no authentication at all."""
    if "RAY_ADDRESS" not in os.environ:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def fail(exc: Exception | str, code: int) -> NoReturn:
    """A user's mistake or a missing input: one red line, no traceback, exit `code`."""
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code) from None


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # huggingface_hub's HTTP client logs every request at INFO (hf:// model folders).
    for client in ("httpx", "httpx2"):
        logging.getLogger(client).setLevel(logging.WARNING)
    app()
