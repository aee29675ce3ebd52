"""docker-compose.yml and the Dockerfile, checked against the code (there is no Docker engine here to run them).

Services, commands, queue, volumes and environment must agree with what the package reads and does:
an environment variable nobody reads, a queue the worker does not consume, or a backups path that
is not on the shared volume would all pass ``docker compose config`` and still be wrong. The same
for the monitoring: the exporter's command must be one the CLI accepts, and the Prometheus of the
``monitoring`` profile must load the shipped rules and scrape the ports the exporter and Flower use.
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
from tests.support.compose import (
    COMPOSE,
    DOCKERFILE,
    command,
    environment,
    interpolate,
    mounts,
    option,
    read_only_mounts,
    service,
)
from tests.support.paths import ROOT
from tests.support.prometheus import CONFIG, PROMETHEUS_DIR, RULES

CELERY_SERVICES = ("worker", "beat", "flower")
#: Services built from this repository that read the backups' settings.
BACKUP_SERVICES = (*CELERY_SERVICES, "exporter")
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())





def published(svc: dict[str, Any]) -> dict[int, str]:
    """Container port -> the host address it is published on."""
    found = {}
    for entry in svc.get("ports", []):
        host, host_port, container_port = str(entry).split(":")
        assert host_port == container_port, entry
        found[int(container_port)] = host
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
    assert set(compose["services"]) == {"postgres", "redis", "worker", "beat", "flower", "exporter", "prometheus"}
    # One image, built from this repository, for PostgreSQL (it runs wal-push), the three Celery services
    # and the exporter.
    for name in ("postgres", *BACKUP_SERVICES):
        svc = service(compose, name)
        assert (ROOT / svc["build"]["context"]).resolve() == ROOT, name
        assert svc["image"] == service(compose, "worker")["image"]
    for name in BACKUP_SERVICES:
        assert service(compose, name)["user"] == "postgres", f"{name} must not run as root (initdb refuses root)"
    assert service(compose, "redis")["image"].startswith("redis:7")
    # `docker compose up` starts everything but Prometheus, which is the optional `monitoring` profile.
    profiled = {name: svc["profiles"] for name, svc in compose["services"].items() if "profiles" in svc}
    assert profiled == {"prometheus": ["monitoring"]}


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
    for name in BACKUP_SERVICES:
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


def test_the_exporter_serves_the_catalog_the_worker_writes(compose: dict[str, Any]) -> None:
    from backup_tasks.cli.main import build_parser
    from backup_tasks.observe.metrics import parse_listen

    exporter = service(compose, "exporter")
    argv = command(exporter)
    assert argv[0] == "backup-tasks"
    args = build_parser().parse_args(argv[1:])  # a command and flags the CLI accepts
    assert args.command == "metrics" and args.listen
    host, port = parse_listen(args.listen)
    assert host == "0.0.0.0", "Prometheus in another container must reach it"
    assert published(exporter) == {port: "127.0.0.1"}, "the metrics are for this host, not the internet"
    assert f"127.0.0.1:{port}/metrics" in " ".join(exporter["healthcheck"]["test"])
    # The same settings as the worker: the catalog it writes and the database it backs up.
    env, worker_env = environment(exporter), environment(service(compose, "worker"))
    settings, worker_settings = Settings.from_env(env), Settings.from_env(worker_env)
    assert settings.backup_dir == worker_settings.backup_dir and settings.wal_archive == worker_settings.wal_archive
    assert env["DATABASE_URL"] == worker_env["DATABASE_URL"]  # pg_stat_archiver of the archiving server
    # It reads the backups volume and may not change it.
    assert mounts(exporter) == {settings.backup_dir: "backups"}
    assert read_only_mounts(exporter) == {settings.backup_dir}


def test_the_monitoring_profile_runs_prometheus_with_the_shipped_rules(compose: dict[str, Any]) -> None:
    prometheus = service(compose, "prometheus")
    assert prometheus["image"].startswith("prom/prometheus:v2.")  # the rules are tested with promtool 2.x
    argv = command(prometheus)
    # The configuration directory is this repository's deploy/prometheus, read-only.
    config_dir = next(target for target, source in mounts(prometheus).items()
                      if (ROOT / source).resolve() == PROMETHEUS_DIR)
    assert config_dir in read_only_mounts(prometheus)
    config_file = option(argv, "--config.file")
    assert config_file and Path(config_file).parent == Path(config_dir)
    assert PROMETHEUS_DIR / Path(config_file).name == CONFIG
    config = yaml.safe_load(CONFIG.read_text())
    assert [(CONFIG.parent / name).resolve() for name in config["rule_files"]] == [RULES]
    # Its data on a volume of its own; the UI and API for this host only.
    storage = option(argv, "--storage.tsdb.path")
    assert storage and mounts(prometheus)[storage] in compose["volumes"]
    assert published(prometheus) == {9090: "127.0.0.1"}
    # It scrapes the exporter and Flower at the ports they listen on, by their service names.
    targets = {job["job_name"]: (job.get("metrics_path", "/metrics"), job["static_configs"][0]["targets"])
               for job in config["scrape_configs"]}
    listen = option(command(service(compose, "exporter")), "--listen")
    flower_port = option(command(service(compose, "flower")), "--port")
    assert listen and flower_port
    assert targets["backup-tasks"] == ("/metrics", [f"exporter:{listen.rpartition(':')[2]}"])
    assert targets["flower"] == ("/metrics", [f"flower:{flower_port}"])
    assert {"exporter", "flower"} <= set(prometheus["depends_on"])
