from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.gateway import signature


def test_known_vector() -> None:
    # HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog")
    assert signature.sign(b"The quick brown fox jumps over the lazy dog", "key") == (
        "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    )


@given(body=st.binary(max_size=2048), secret=st.text(min_size=1, max_size=64))
def test_a_signature_verifies_only_its_own_body_and_secret(body: bytes, secret: str) -> None:
    header = signature.sign(body, secret)
    assert signature.verify(body, header, secret)
    assert signature.verify(body, header.upper().replace("SHA256=", "sha256="), secret)
    assert not signature.verify(body + b"x", header, secret)
    assert not signature.verify(body, header, secret + "x")


def test_missing_or_malformed_headers_fail() -> None:
    for header in (None, "", "sha256=", "sha1=abc", "abc", "sha256=zz"):
        assert not signature.verify(b"{}", header, "secret")
    assert not signature.verify(b"{}", signature.sign(b"{}", "s"), "")
