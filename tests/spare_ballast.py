"""Imported by a warm spare in tests/test_spare.py (``policy.warm_spare_imports``): holds
BALLAST_MB of touched memory, so the spare's measured size is large and known."""

BALLAST_MB = 200
BALLAST = bytearray(b"\x01" * (BALLAST_MB * 2**20))
