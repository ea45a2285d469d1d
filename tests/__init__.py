"""The test suite. ``HEP_FIXTURES``: the public HEP test packets, copied with their provenance."""

from pathlib import Path

HEP_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hep"
