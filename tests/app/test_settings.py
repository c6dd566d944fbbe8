"""Settings: production refuses default or missing secrets with a clear error, development accepts them,
and a malformed AMEND_API_KEYS is refused at start-up instead of silently locking tenants out."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from app.settings import DEV_AUDIT_KEY, DEV_S3_SECRET_KEY, Settings

GOOD_SECRETS = {
    "s3_secret_access_key": "a-real-s3-secret-0123456789",
    "audit_hmac_key": "a-real-audit-key-0123456789",
    "api_keys": "k-0123456789abcdef:tenant-a",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Settings read the environment: tests start from none of the AMEND_* variables."""
    import os

    for name in list(os.environ):
        if name.startswith("AMEND_") or name == "REDIS_URL":
            monkeypatch.delenv(name)


def test_production_with_real_secrets_starts():
    settings = Settings(environment="production", **GOOD_SECRETS)
    (key,) = settings.parsed_api_keys().values()
    assert key.tenant == "tenant-a" and key.scopes == {"read", "write"}


@pytest.mark.parametrize(
    "field, value, variable",
    [
        ("s3_secret_access_key", DEV_S3_SECRET_KEY, "AMEND_S3_SECRET_ACCESS_KEY"),
        ("audit_hmac_key", DEV_AUDIT_KEY, "AMEND_AUDIT_HMAC_KEY"),
        ("api_keys", "", "AMEND_API_KEYS"),
        ("api_keys", "  ", "AMEND_API_KEYS"),
    ],
)
def test_production_refuses_each_default_secret(field, value, variable):
    with pytest.raises(ValidationError) as error:
        Settings(environment="production", **(GOOD_SECRETS | {field: value}))
    message = str(error.value)
    assert "production" in message and variable in message
    # the error names the variable, never the secret values it checked
    for secret in GOOD_SECRETS.values():
        assert secret not in message


def test_production_refuses_all_defaults_at_once_from_the_environment(monkeypatch):
    monkeypatch.setenv("AMEND_ENVIRONMENT", "production")
    with pytest.raises(ValidationError) as error:
        Settings()
    message = str(error.value)
    for variable in ("AMEND_S3_SECRET_ACCESS_KEY", "AMEND_AUDIT_HMAC_KEY", "AMEND_API_KEYS"):
        assert variable in message


def test_production_reads_real_secrets_from_the_environment(monkeypatch):
    monkeypatch.setenv("AMEND_ENVIRONMENT", "production")
    for field, value in GOOD_SECRETS.items():
        monkeypatch.setenv(f"AMEND_{field.upper()}", value)
    settings = Settings()
    assert settings.environment == "production"
    assert settings.s3_secret_access_key.get_secret_value() == GOOD_SECRETS["s3_secret_access_key"]


def test_development_accepts_the_defaults():
    settings = Settings()
    assert settings.environment == "development"
    assert settings.s3_secret_access_key.get_secret_value() == DEV_S3_SECRET_KEY
    assert settings.audit_hmac_key.get_secret_value() == DEV_AUDIT_KEY
    assert settings.parsed_api_keys() == {}


def test_unknown_environment_is_refused():
    with pytest.raises(ValidationError):
        Settings(environment="prod")


def test_api_key_forms():
    digest = hashlib.sha256(b"hashed-key").hexdigest()
    settings = Settings(
        api_keys=f" plain-key:tenant-a , sha256:{digest.upper()}:tenant_b:read , admin-key:ops:read+write+admin ,"
    )
    keys = settings.parsed_api_keys()
    assert set(keys) == {hashlib.sha256(b"plain-key").hexdigest(), digest, hashlib.sha256(b"admin-key").hexdigest()}
    assert keys[digest].tenant == "tenant_b" and keys[digest].scopes == {"read"}
    assert keys[hashlib.sha256(b"plain-key").hexdigest()].scopes == {"read", "write"}
    assert keys[hashlib.sha256(b"admin-key").hexdigest()].scopes == {"read", "write", "admin"}


@pytest.mark.parametrize(
    "api_keys, complaint",
    [
        ("lonely-key", "tenant"),
        ("lonely-key:", "tenant"),
        (":tenant-a", "key"),
        ("k1:bad tenant", "tenant"),
        ("k1:../escape", "tenant"),
        ("k1:tenant/a", "tenant"),
        ("k1:ténant", "tenant"),
        ("k1:" + "t" * 65, "tenant"),
        ("k1:tenant-a:root", "scope"),
        ("k1:tenant-a:read+", "scope"),
        ("k1:tenant-a:", "scope"),
        ("sha256:not-hex-at-all:tenant-a", "sha256"),
        ("sha256:abcdef:tenant-a", "sha256"),
        ("sha256:" + "g" * 64 + ":tenant-a", "sha256"),
        ("k1:tenant-a,k1:tenant-b", "twice"),
        ("k1:tenant-a,sha256:" + hashlib.sha256(b"k1").hexdigest() + ":tenant-b", "twice"),
    ],
)
def test_malformed_api_keys_are_refused(api_keys, complaint):
    with pytest.raises(ValidationError) as error:
        Settings(api_keys=api_keys)
    message = str(error.value)
    assert complaint in message.lower()


def test_malformed_api_keys_are_refused_from_the_environment(monkeypatch):
    monkeypatch.setenv("AMEND_API_KEYS", "key-without-tenant")
    with pytest.raises(ValidationError, match="tenant"):
        Settings()


def test_refusal_never_echoes_the_raw_key():
    raw = "super-secret-raw-key-123"
    for api_keys in (f"{raw}:bad tenant", f"{raw}:tenant-a:root", f"{raw}", f"{raw}:a,{raw}:b"):
        with pytest.raises(ValidationError) as error:
            Settings(api_keys=api_keys)
        assert raw not in str(error.value)


def test_repr_and_dump_hide_secrets():
    settings = Settings(**GOOD_SECRETS)
    for text in (repr(settings), str(settings), str(settings.model_dump()), settings.model_dump_json()):
        for secret in GOOD_SECRETS.values():
            assert secret not in text


@pytest.mark.parametrize(
    "url", ["redis://:hunter2-secret@redis:6379/0", "rediss://amend:hunter2-secret@redis.example:6380/1"]
)
def test_repr_hides_a_password_in_the_redis_url(url):
    settings = Settings(redis_url=url)
    assert settings.redis_url == url  # the services still get the real URL
    for text in (repr(settings), str(settings)):
        assert "hunter2-secret" not in text and ":***@" in text


def test_merge_threads_default_to_every_usable_cpu(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert Settings().merge_threads == 3  # 0, the default: the CPUs this process may run on
    assert Settings(merge_threads=1).merge_threads == 1
    monkeypatch.setenv("AMEND_MERGE_THREADS", "2")
    assert Settings().merge_threads == 2
    with pytest.raises(ValidationError):
        Settings(merge_threads=-1)
