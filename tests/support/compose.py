"""docker-compose.yml and the Dockerfile read as data: services, commands, environments, mounts."""

from __future__ import annotations

import re
import shlex
from typing import Any

from tests.support.paths import ROOT

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$``, with ``env`` as the shell."""
    def replace(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"] or ""
        if env.get(name):
            return env[name]
        if op and op.endswith("?"):
            raise KeyError(f"{name} must be set: {arg}")
        return arg if op else ""
    return INTERPOLATION.sub(replace, value).replace("$$", "$")


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    return compose["services"][name]


def command(svc: dict[str, Any]) -> list[str]:
    value = svc["command"]
    return shlex.split(value) if isinstance(value, str) else list(value)


def environment(svc: dict[str, Any], shell: dict[str, str] | None = None) -> dict[str, str]:
    shell = {"FLOWER_BASIC_AUTH": "ops:pw", **(shell or {})}
    raw = svc.get("environment") or {}
    assert isinstance(raw, dict), "use the mapping form for environment"
    return {key: interpolate(str(value), shell) for key, value in raw.items()}


def option(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Container path -> named volume."""
    found = {}
    for entry in svc.get("volumes", []):
        source, target = str(entry).split(":")[:2]
        found[target] = source
    return found


def read_only_mounts(svc: dict[str, Any]) -> set[str]:
    """Container paths mounted ``:ro``."""
    return {str(entry).split(":")[1] for entry in svc.get("volumes", []) if str(entry).split(":")[2:] == ["ro"]}
