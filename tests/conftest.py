"""Real servers for the tests, shared by every test directory.

The fixtures live in plugin modules of ``tests/support`` (PostgreSQL, Redis and worker processes,
the S3 server, the PITR scenario) and are registered here, so any test requests them by name.
Helpers that are not fixtures are imported from ``tests.support``.
"""

pytest_plugins = [
    "tests.support.postgres",
    "tests.support.processes",
    "tests.support.s3",
    "tests.support.pitr",
    "tests.support.wal",
    "tests.support.observe",
    "tests.support.regression",
    "tests.support.pg18",
    "tests.support.roles",
]
