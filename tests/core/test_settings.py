"""Configuration: every URL form the trading app writes, clear errors for bad values, no secret in reprs."""

from __future__ import annotations

import pytest

from backup_tasks.conninfo import ConnInfo, redact_url
from backup_tasks.errors import ConfigError
from backup_tasks.settings import Settings


@pytest.mark.parametrize("url", [
    "postgresql://trader:pw@db.example:6543/aitrapp",
    "postgres://trader:pw@db.example:6543/aitrapp",
    "postgresql+psycopg2://trader:pw@db.example:6543/aitrapp",
    "postgresql+psycopg://trader:pw@db.example:6543/aitrapp",
])
def test_accepts_every_url_form_the_app_uses(url: str) -> None:
    info = ConnInfo.from_url(url)
    parsed = (info.host, info.port, info.dbname, info.user, info.password)
    assert parsed == ("db.example", 6543, "aitrapp", "trader", "pw")
    env = info.libpq_env()
    assert env["PGDATABASE"] == "aitrapp" and env["PGPASSWORD"] == "pw" and env["PGHOST"] == "db.example"


def test_percent_encoded_password_and_query_options() -> None:
    info = ConnInfo.from_url("postgresql://u:p%40ss%2Fw0rd@h/db?sslmode=require&application_name=x")
    assert info.password == "p@ss/w0rd"
    assert info.kwargs()["sslmode"] == "require"


def test_socket_host_in_query_string() -> None:
    info = ConnInfo.from_url("postgresql:///aitrapp?host=/var/run/postgresql")
    assert info.host == "/var/run/postgresql" and info.dbname == "aitrapp"


@pytest.mark.parametrize(("url", "fragment"), [
    ("", "is empty"),
    ("mysql://u:secretpw@h/db", "must start with postgresql://"),
    ("trader:secretpw@localhost:5432/aitrapp", "must start with postgresql://"),
    ("postgresql://u:secretpw@h:notaport/db", "not a valid URL"),
    ("postgresql://u:secretpw@h:5432/", "names no database"),
])
def test_bad_urls_are_config_errors_without_the_password(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ConnInfo.from_url(url)
    assert fragment in str(caught.value)
    assert "secretpw" not in str(caught.value)
    assert caught.value.exit_code == 2


def test_repr_and_redaction_hide_passwords() -> None:
    info = ConnInfo.from_url("postgresql+psycopg2://trader:hunter22@h/db")
    assert "hunter22" not in repr(info) and "hunter22" not in info.redacted()
    settings = Settings(database_url="postgresql://trader:hunter22@h/db", broker_url="redis://:brokerpw@h:6379/0")
    assert "hunter22" not in repr(settings) and "brokerpw" not in repr(settings)
    assert set(settings.secrets()) >= {"hunter22", "brokerpw"}
    assert redact_url("x postgresql://a:b1c2@h/db and redis://:zz9@r/0 ?password=abc") == \
        "x postgresql://a:***@h/db and redis://:***@r/0 ?password=***"


def test_from_env_defaults_follow_the_seed() -> None:
    settings = Settings.from_env({})
    assert settings.keep_daily_days == 7 and settings.keep_weekly == 12
    assert settings.compression == "zstd" and settings.timezone == "Asia/Kolkata"
    assert settings.daily_at.strftime("%H:%M") == "02:00" and settings.weekly_at[0] == 6
    assert settings.broker_url == "redis://127.0.0.1:6379/0"
    assert settings.effective_result_backend == settings.broker_url
    with pytest.raises(ConfigError, match="DATABASE_URL is not set"):
        settings.source()


@pytest.mark.parametrize(("env", "fragment"), [
    ({"BACKUP_KEEP_DAILY_DAYS": "seven"}, "whole number"),
    ({"BACKUP_KEEP_DAILY_DAYS": "0"}, "at least 1"),
    ({"BACKUP_COMPRESSION": "lzma"}, "BACKUP_COMPRESSION"),
    ({"BACKUP_TIMEZONE": "Mars/Olympus"}, "timezone"),
    ({"BACKUP_DAILY_AT": "25:00"}, "HH:MM"),
    ({"BACKUP_WEEKLY_AT": "someday 03:00"}, "weekday"),
    ({"DATABASE_URL": "http://x/y"}, "postgresql://"),
    ({"BACKUP_TASK_SOFT_TIME_LIMIT": "100", "BACKUP_TASK_TIME_LIMIT": "50"}, "greater than"),
    ({"BACKUP_TASKS_CHAIN_CACHE": "sometimes"}, "BACKUP_TASKS_CHAIN_CACHE"),
    ({"BACKUP_DAILY_INCREMENTAL": "weekly"}, "BACKUP_DAILY_INCREMENTAL"),
])
def test_from_env_rejects_bad_values_clearly(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Settings.from_env(env)


@pytest.mark.parametrize(("raw", "kept"), [(None, True), ("", True), ("1", True), ("on", True), ("0", False),
                                           ("off", False), ("no", False)])
def test_the_chain_cache_is_on_unless_turned_off(raw: str | None, kept: bool) -> None:
    assert Settings.from_env({} if raw is None else {"BACKUP_TASKS_CHAIN_CACHE": raw}).chain_cache is kept


def test_app_timezone_is_honoured() -> None:
    assert Settings.from_env({"APP_TIMEZONE": "Europe/London"}).timezone == "Europe/London"
    assert Settings.from_env({"APP_TIMEZONE": "Europe/London", "BACKUP_TIMEZONE": "UTC"}).timezone == "UTC"
