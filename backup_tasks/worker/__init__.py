"""Adapter: the Celery side. The app and its configuration, the tasks, Sentry, and the client that enqueues.

Tasks are a thin shell over the plain functions the CLI calls; the post-close decision (skip, start,
resume) is ``workflow.start_post_close``, a plain function given the sender. ``client`` sends
``backup_tasks.post_close`` and follows the workflow without importing the tasks.

May import capabilities, catalog, infrastructure and core. Must not import cli.
"""
