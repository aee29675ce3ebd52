"""What a test needs from the machine that it cannot make itself: a skip on a developer's machine, a failure in CI.

``make test`` (and so CI, ``CI`` set) installs and starts every real service and tool the suite uses
(``scripts/bootstrap.sh``, ``scripts/services.sh``), so under CI a missing one is a broken set-up to
fix, never a test to skip quietly: a green run must mean the real thing was exercised. Skipping is
left to developers' machines, and to the paths that have a fallback (testcontainers without a
Docker engine falls back to the local servers, which are then required).
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def unavailable(what: str, remedy: str) -> NoReturn:
    """Skip the test (developer's machine) or fail it (CI): ``what`` is missing, ``remedy`` says how to get it."""
    reason = f"{what}; {remedy}"
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run this test: scripts/bootstrap.sh and scripts/services.sh provide it)",
                    pytrace=False)
    pytest.skip(reason)


def tool(name: str, package: str, *alternatives: str) -> str:
    """The path of the command ``name`` (or one of ``alternatives``); ``unavailable`` naming Debian's ``package``."""
    for candidate in (name, *alternatives):
        path = shutil.which(candidate)
        if path is not None:
            return path
    unavailable(f"{name} is not installed", f"apt-get install {package} (scripts/bootstrap.sh installs it)")
