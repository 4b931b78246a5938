"""Storage options as the command line takes them, for tests that run a command against S3."""

from __future__ import annotations

from typing import Any


def cli_args(options: dict[str, Any]) -> list[str]:
    """`--endpoint-url URL --storage-option key=… --storage-option secret=…` of `options`."""
    return ["--endpoint-url", options["endpoint_url"], "--storage-option",
            f"key={options['key']}", "--storage-option", f"secret={options['secret']}"]  # fmt: skip
