"""Command-line tools some tests need (promtool, systemd-analyze), found or skipped for.

A developer machine without them skips those tests; CI (`CI` set) installs
them in `.ci/run`, so there a missing tool is a failure, never a silent skip.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """The tool's path; a skip on a developer machine without it, a failure in CI."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run should have installed it")
        pytest.skip(f"{name} is not installed (.ci/run shows how to install it)")
    return path
