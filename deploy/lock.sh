#!/usr/bin/env bash
# Regenerates the tested dependency set (run it after changing pyproject.toml; needs `uv`):
#   requirements.lock               everything `make` and CI install (all extras)
#   deploy/runtime-requirements.txt what a cluster runs (cluster.yaml, the RayJob, ray job
#                                   submit's runtime_env): the same pins, no test/bench/demo
#   deploy/kuberay/rayjob.yaml     its runtimeEnvYAML pip list: the runtime pins
# For Python 3.11 on Linux x86-64. torch is pinned to the Makefile's TORCH; its CUDA runtime
# wheels (nvidia-*, cuda-*, triton) are left to torch's own pins: the CPU build needs none.
set -euo pipefail
cd "$(dirname "$0")/.."
torch=$(sed -n 's/^TORCH *?= *//p' Makefile)
override=$(mktemp)
trap 'rm -f "$override"' EXIT
echo "$torch" >"$override"
target=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --override "$override"
        --no-annotate --quiet --custom-compile-command deploy/lock.sh)
# The CUDA runtime packages torch would bring on Linux: found, then left out.
cuda=$(uv pip compile pyproject.toml "${target[@]}" |
       sed -n -E 's/^((nvidia-[a-z0-9-]+)|(cuda-[a-z-]+)|triton)==.*/\1/p')
skip=()
for name in $cuda; do skip+=(--no-emit-package "$name"); done
uv pip compile pyproject.toml --extra demo --extra test --extra bench "${target[@]}" \
    "${skip[@]}" --output-file requirements.lock
uv pip compile pyproject.toml "${target[@]}" "${skip[@]}" --constraint requirements.lock \
    --output-file deploy/runtime-requirements.txt
# The RayJob installs the same pins (its runtimeEnvYAML cannot read a file of the project).
python3 - <<'PY'
import re
from pathlib import Path

pins = [line for line in Path("deploy/runtime-requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")]
rayjob = Path("deploy/kuberay/rayjob.yaml")
begin, end = "# BEGIN deploy/runtime-requirements.txt", "# END deploy/runtime-requirements.txt"
block = "".join(f"          - {pin}\n" for pin in pins)
text = re.sub(rf"({re.escape(begin)}\n).*?(\s+{re.escape(end)})",
              lambda m: m.group(1) + block.rstrip("\n") + m.group(2), rayjob.read_text(),
              flags=re.S)
rayjob.write_text(text)
PY
