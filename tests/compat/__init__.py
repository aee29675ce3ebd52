"""Compatibility tests: catalogs and WAL archives written by earlier versions (tests/fixtures/legacy) read unchanged."""
