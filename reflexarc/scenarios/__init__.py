"""Bundled scenarios for ``reflexarc demo`` and the end-to-end tests."""
