"""Capability: the catalog. What backups exist, what they contain, and what may be deleted.

Owns the manifest (``<id>.manifest.json`` beside every backup), the names and keys of every object
in a backup location (``ids``), the retention policy as a pure function of manifests and a clock
(``retention``), ``prune`` (which applies it, WAL expiry included), the trading-day rules
(``tradingday``), row-count comparison, which key opens an encrypted backup, clearing what killed
runs left in the catalog (``leftovers``), which PostgreSQL system the catalog belongs to
(``system``), and the generations a major upgrade adds (``generations``: the catalog's and the WAL
archive's records merged, pure rules on them). Health is judged in ``observe.health``, from the one
reading of catalog, WAL archive and server that the metrics show.

Imports: core, infrastructure (storage, streams, postgres, locks) and ``wal`` (names and the
archive, for WAL expiry). Must not import logical, physical, worker or cli.
"""
