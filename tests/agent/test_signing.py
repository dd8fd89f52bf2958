import pytest

from lineguard.agent.signing import (
    KeyFileError,
    SignatureError,
    generate_key_pair,
    key_id,
    load_private_key,
    load_public_key,
    sign,
    verify,
)


def test_a_key_pair_signs_and_verifies_and_the_private_key_is_private(tmp_path):
    private_path, public_path = generate_key_pair(tmp_path / "k.pem")
    assert private_path.stat().st_mode & 0o777 == 0o600
    private_key, public_key = load_private_key(private_path), load_public_key(public_path)
    record = sign(b"payload", private_key)
    assert record["key_id"] == key_id(public_key) and len(record["key_id"]) == 16
    assert verify(b"payload", record, [public_key]) == record["key_id"]
    with pytest.raises(SignatureError, match="altered"):
        verify(b"payload!", record, [public_key])


def test_keygen_refuses_to_overwrite_an_existing_key(tmp_path):
    generate_key_pair(tmp_path / "k.pem")
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key_pair(tmp_path / "k.pem")


def test_a_garbled_signature_or_other_algorithm_is_refused(tmp_path):
    private_path, public_path = generate_key_pair(tmp_path / "k.pem")
    public_key = load_public_key(public_path)
    record = sign(b"x", load_private_key(private_path))
    with pytest.raises(SignatureError, match="altered"):
        verify(b"x", {**record, "signature": "!!notbase64"}, [public_key])
    with pytest.raises(SignatureError, match="algorithm"):
        verify(b"x", {**record, "algorithm": "rsa"}, [public_key])


def test_a_key_file_that_is_not_a_key_is_named(tmp_path):
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(KeyFileError, match="not a PEM key"):
        load_public_key(tmp_path / "junk.pem")
    with pytest.raises(KeyFileError, match="cannot read key file"):
        load_private_key(tmp_path / "missing.pem")
