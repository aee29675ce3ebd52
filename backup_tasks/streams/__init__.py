"""Infrastructure: byte streams. Compression (``codec``: zstd, gzip), encryption (``crypto``: age streams,
built on ``keys``: recipients and identity files, and ``bridge``: the one helper thread and bounded pipe
between a library that works on whole file objects and a pipeline that pushes or pulls chunks) and tar.

Imports: ``errors`` and ``storage.base`` (the writer protocol the stream writers wrap). Must not import
settings, postgres, catalog, any capability or adapter.
"""
