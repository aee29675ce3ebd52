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


def pytest_configure() -> None:
    """Ctrl-C reaches the programs under test even when the suite itself was started in the background.

    A shell starts a background job with SIGINT ignored, and an ignored signal stays ignored across exec: every
    ``backup-tasks`` a test interrupts would then finish instead of stopping (exit 0, not 130). A handler of our
    own is reset to the default in each child, as a foreground terminal would leave it.
    """
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
