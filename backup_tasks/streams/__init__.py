"""Infrastructure: byte streams. Compression (``codec``: zstd, gzip), encryption (``crypto``: age) and tar.

Imports: ``errors`` and ``storage.base`` (the writer protocol the stream writers wrap). Must not import
settings, postgres, catalog, any capability or adapter.
"""
