"""Log redaction: secret values are masked where they appear, ordinary words are left alone."""

from __future__ import annotations

import pytest

from hepsub_apiban.core.logs import Redactor

GENERATED = "f3a9c01b7e2d4c55"  # a key as APIBAN hands them out
WORDS = ("apiban", "mirror", "a")  # site keys an operator may well pick


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # A generated key is masked wherever it is, even inside a longer token.
        (f"GET https://apiban.org/api/{GENERATED}/banned", "GET https://apiban.org/api/***/banned"),
        (f"ClientError: {GENERATED}x", "ClientError: ***x"),
        # Word-like keys are masked where they stand as values ...
        ("GET /api/mirror/banned/100", "GET /api/***/banned/100"),
        ("GET /api/a/check/1.2.3.4", "GET /api/***/check/1.2.3.4"),
        ("/ipset/apiban/list", "/ipset/***/list"),
        ("X-Api-Key: mirror", "X-Api-Key: ***"),
        ("Authorization: Bearer apiban", "Authorization: Bearer ***"),
        ('{"keys": ["apiban", "mirror"]}', '{"keys": ["***", "***"]}'),
        ("keys = ['a', 'mirror']", "keys = ['***', '***']"),
        ("HEPSUB_SITE_KEYS=apiban,mirror", "HEPSUB_SITE_KEYS=***,***"),
        ("postgresql://hepsub:mirror@db:5432/hepsub", "postgresql://hepsub:***@db:5432/hepsub"),
        ("?key=a&ip=1.2.3.4", "?key=***&ip=1.2.3.4"),
        # ... and left alone as the agent's own words.
        ("hepsub-apiban 0.1.0 listening on 0.0.0.0:18088; mode mirror", None),
        ("a mirror of the APIBAN list: apiban.mode = mirror is a mode", None),
        ("mirror: synced 2,750 of ~5,000 addresses", None),
        ("/api/v1/status answered a 200", None),
        ("/api/mirrors/banned", None),  # a longer token is another word
    ],
)
def test_secret_values_are_masked_ordinary_words_are_not(text: str, shown: str | None) -> None:
    redact = Redactor([GENERATED, *WORDS])
    assert redact(text) == (text if shown is None else shown)


def test_a_secret_is_case_sensitive_and_masked_whole() -> None:
    redact = Redactor(["Mirror", "mirror-key", "mirror"])
    assert redact("/api/mirror-key/banned /api/Mirror/banned /api/MIRROR/banned") == (
        "/api/***/banned /api/***/banned /api/MIRROR/banned"
    )
