"""Tests of the core modules: settings and connection info."""
