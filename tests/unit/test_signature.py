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


# What an environment variable can hold, but the separator.
SECRET_CHARACTERS = st.characters(exclude_categories=["Cs"], exclude_characters=",\x00")


@given(
    body=st.binary(max_size=512),
    old=st.text(alphabet=SECRET_CHARACTERS, min_size=1, max_size=32),
    new=st.text(alphabet=SECRET_CHARACTERS, min_size=1, max_size=32),
)
def test_during_a_rotation_either_secret_signs(body: bytes, old: str, new: str) -> None:
    secrets = signature.secrets_of(f"{new},{old}")
    if len(secrets) < 2 or old.strip() == new.strip():
        return  # blank or equal secrets: not a rotation
    assert signature.verify(body, signature.sign(body, old.strip()), secrets)
    assert signature.verify(body, signature.sign(body, new.strip()), secrets)
    assert not signature.verify(body, signature.sign(body, old.strip() + new.strip()), secrets)
    assert not signature.verify(body, signature.sign(body, f"{new},{old}"), secrets)


def test_the_secrets_of_a_value() -> None:
    assert signature.secrets_of("one") == ("one",)
    assert signature.secrets_of(" new , old ") == ("new", "old")
    assert signature.secrets_of(",, ,") == ()
    assert not signature.verify(b"{}", signature.sign(b"{}", "s"), ())
