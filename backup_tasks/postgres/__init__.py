"""Infrastructure: everything that talks to PostgreSQL or runs its binaries.

``connect`` (connections), ``failures`` (the one classifier of server and tool errors),
``tools`` (finding pg_dump & co., their environment without passwords on argv), ``queries``
(catalog queries, row counts, amcheck), ``archiver`` (``pg_stat_archiver``, one query, and the
server's WAL position within one timeout), ``cluster`` (throwaway clusters), ``template`` (their
cached initdb output), ``leftovers`` (scratch directories that name their owner process, and the sweep
that stops and removes those of killed runs), ``servercmd`` (the command PostgreSQL's OS user runs), ``controldata``
(pg_controldata), ``sampledata``, ``globals`` (the roles and database properties a database needs, read from
the shared catalogs) and ``recreate`` (replaying them on another server).

Imports: core only (errors, conninfo). Must not import streams, storage, settings, catalog, any capability or adapter.
"""
