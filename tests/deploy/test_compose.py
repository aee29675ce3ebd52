"""docker-compose.yml and the Dockerfile, checked against the code (there is no Docker engine here to run them).

Services, commands, queue, volumes and environment must agree with what the package reads and does:
an environment variable nobody reads, a queue the worker does not consume, or a backups path that
is not on the shared volume would all pass ``docker compose config`` and still be wrong.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from backup_tasks.conninfo import ConnInfo
from backup_tasks.settings import Settings
from backup_tasks.worker.config import ENV_VARS, QUEUE, build_config
from tests.support.paths import ROOT

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
CELERY_SERVICES = ("worker", "beat", "flower")
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


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


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


def variables_read_by_the_package() -> set[str]:
    """Environment variable names that appear as string constants in the modules that read the environment."""
    names: set[str] = set(ENV_VARS)
    for module in ("settings.py", "worker/config.py", "worker/sentry.py", "worker/app.py"):
        tree = ast.parse((ROOT / "backup_tasks" / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.fullmatch(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+", node.value):
                names.add(node.value)
    return names


def test_the_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "redis", "worker", "beat", "flower"}
    # One image, built from this repository, for PostgreSQL (it runs wal-push) and the three Celery services.
    for name in ("postgres", *CELERY_SERVICES):
        svc = service(compose, name)
        assert (ROOT / svc["build"]["context"]).resolve() == ROOT, name
        assert svc["image"] == service(compose, "worker")["image"]
    for name in CELERY_SERVICES:
        assert service(compose, name)["user"] == "postgres", f"{name} must not run as root (initdb refuses root)"
    assert service(compose, "redis")["image"].startswith("redis:7")


def test_worker_command_is_the_documented_one_on_the_backups_queue(compose: dict[str, Any]) -> None:
    argv = command(service(compose, "worker"))
    assert argv[:4] == ["celery", "-A", "backup_tasks", "worker"]
    assert option(argv, "-Q", "--queues") == QUEUE == build_config({})["task_default_queue"]
    # The same command the tests start (tests/support/processes.py `running_worker`).
    processes = (ROOT / "tests" / "support" / "processes.py").read_text()
    assert '[CELERY, "-A", "backup_tasks", "worker", "-Q", "backups"' in processes


def test_beat_and_flower_commands(compose: dict[str, Any]) -> None:
    beat = command(service(compose, "beat"))
    assert beat[:4] == ["celery", "-A", "backup_tasks", "beat"]
    schedule_file = option(beat, "-s", "--schedule")
    assert schedule_file, "beat must keep its schedule state on a volume, or missed runs are forgotten"
    assert str(Path(schedule_file).parent) in mounts(service(compose, "beat"))
    flower = service(compose, "flower")
    argv = command(flower)
    assert argv[:4] == ["celery", "-A", "backup_tasks", "flower"]
    # Authentication on, from the environment: no password on a command line (visible in `ps`).
    assert option(argv, "--basic-auth") is None
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    assert ":?" in flower["environment"]["FLOWER_BASIC_AUTH"], "Flower must not start without credentials"
    with pytest.raises(KeyError, match="FLOWER_BASIC_AUTH"):
        interpolate(flower["environment"]["FLOWER_BASIC_AUTH"], {})
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"]), "Flower is not for the internet"


def test_every_variable_the_compose_file_sets_is_read_by_someone(compose: dict[str, Any]) -> None:
    ours = variables_read_by_the_package()
    for name in CELERY_SERVICES:
        for variable in service(compose, name)["environment"]:
            known = variable in ours or (name == "flower" and variable.startswith("FLOWER_"))
            assert known, f"{name} sets {variable}, which nothing reads"
    for variable in service(compose, "postgres")["environment"]:
        assert variable.startswith("POSTGRES_") or variable in ours, variable


def test_environment_values_agree_with_the_services_and_volumes(compose: dict[str, Any]) -> None:
    worker = service(compose, "worker")
    env = environment(worker)
    settings = Settings.from_env(env)  # valid as written, with the defaults
    source = settings.source()
    assert source.host == "postgres" and source.port == 5432
    pg_env = environment(service(compose, "postgres"))
    assert (source.user, source.password, source.dbname) == \
        (pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"], pg_env["POSTGRES_DB"])
    assert ConnInfo.from_url(env["DATABASE_URL"]).redacted() == "postgresql://aitrapp@postgres:5432/aitrapp"
    # The password follows POSTGRES_PASSWORD for both services.
    custom = {"POSTGRES_PASSWORD": "s3cret"}
    assert Settings.from_env(environment(worker, custom)).source().password == \
        environment(service(compose, "postgres"), custom)["POSTGRES_PASSWORD"] == "s3cret"
    # Broker and results on the redis service, read the same way by all three Celery services.
    for name in CELERY_SERVICES:
        config = build_config(environment(service(compose, name)))
        assert config["broker_url"] == "redis://redis:6379/0" and config["result_backend"].startswith("redis://redis:")
        assert config["timezone"] == "Asia/Kolkata"
    assert "redis" in compose["services"]
    # Backups land on the shared volume, where PostgreSQL's archive_command writes WAL too.
    assert mounts(worker)[settings.backup_dir] == "backups"
    assert "backups" in mounts(service(compose, "postgres")).values()
    assert set(mounts(worker).values()) | {"pgdata", "redis", "beat-state"} <= set(compose["volumes"])
    # The schedule settings pass through.
    assert settings.daily_at.strftime("%H:%M") == "02:00" and settings.health_at.strftime("%H:%M") == "09:00"
    late = Settings.from_env(environment(worker, {"BACKUP_DAILY_AT": "03:30", "BACKUP_TIMEZONE": "UTC"}))
    assert late.daily_at.strftime("%H:%M") == "03:30" and late.timezone == "UTC"
    assert Settings.from_env(environment(worker, {"SENTRY_DSN": "https://k@o1.ingest.sentry.io/2"})).sentry_dsn


def test_postgres_archives_wal_to_the_archive_the_worker_reads(compose: dict[str, Any]) -> None:
    pg = service(compose, "postgres")
    argv = command(pg)
    assert argv[0] == "postgres"
    settings_given = dict(arg.split("=", 1) for arg in argv[2::2])
    assert all(flag == "-c" for flag in argv[1::2])
    assert settings_given["wal_level"] == "replica" and settings_given["archive_mode"] == "on"
    archive = shlex.split(settings_given["archive_command"])
    assert Path(archive[0]).name == "backup-tasks" and archive[1] == "wal-push" and archive[-1] == "%p"
    archive_dir = option(archive, "--archive-dir")
    assert archive_dir is not None
    worker_settings = Settings.from_env(environment(service(compose, "worker")))
    assert Path(archive_dir) == worker_settings.wal_archive  # the worker's snapshots and checks look there
    backups_mount = next(target for target, volume in mounts(pg).items() if volume == "backups")
    assert Path(archive_dir).is_relative_to(backups_mount)
    # The executable is where the Dockerfile installs it.
    assert str(Path(archive[0]).parent.parent) in DOCKERFILE.read_text()


def test_dockerfile_builds_what_compose_runs(compose: dict[str, Any]) -> None:
    text = DOCKERFILE.read_text()
    major = service(compose, "worker")["build"]["args"]["PG_MAJOR"]
    assert re.search(r"^ARG PG_MAJOR=(\d+)$", text, re.M)[1] == major  # type: ignore[index]
    assert "FROM postgres:${PG_MAJOR}" in text  # client and server tools of the server's major version
    assert re.search(r"pip install .*\.", text)
    assert "COPY celeryconfig.py" in text  # `celery -A backup_tasks` reads it from the working directory
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M)[1]  # type: ignore[index]
    assert workdir == "/opt/backup-tasks"
    for path in ("/backups", *(str(Path(t)) for t in mounts(service(compose, "beat")))):
        assert path in text, f"{path} must exist in the image, owned by postgres, for the named volume"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
    # The package the image installs declares what the services import.
    pyproject = (ROOT / "pyproject.toml").read_text()
    for dependency in ("celery[redis]", "flower", "sentry-sdk"):
        assert dependency in pyproject
