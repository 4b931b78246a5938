"""`harmonize model check`: a model directory judged exactly as a run loads it.

Enters: a model directory (local path or URI), whether pickles are allowed and the refiner
required, storage options and the node cache for URIs.
Leaves: human-readable problems, one line each; an empty list means the folder is usable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.models.cache import is_remote, resolve_model_dir
from pipeline.models.components import load_all
from pipeline.models.layout import ModelDirError
from pipeline.storage import describe


def check_model_dir(
    path: str | Path,
    allow_unsafe_pickle: bool = False,
    *,
    require_refiner: bool = True,
    cache_dir: str | Path | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Human-readable problems with a model directory, one line each; empty means usable.

    Judges the folder exactly as `load_components` loads it: each component through its
    library's `from_pretrained` (on the CPU, one at a time, then dropped), the empty prompt
    encoded. A URI is first copied to the node cache.
    """
    if is_remote(str(path)):
        try:
            path = resolve_model_dir(
                str(path), cache_dir=cache_dir, storage_options=storage_options
            )
        except ModelDirError as error:  # names the URI and the cause already
            return [str(error)]
        except Exception as error:
            return [f"{path}: cannot fetch the model directory: {describe(error)}"]
    root = Path(path)
    if not root.is_dir():
        return [f"{root}: model directory not found"]
    _, problems = load_all(
        root,
        device=torch.device("cpu"),
        dtype=torch.float32,
        with_refiner=require_refiner,
        allow_unsafe_pickle=allow_unsafe_pickle,
        keep=False,
    )
    return [str(problem) for problem in problems]
