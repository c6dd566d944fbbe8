"""The one Settings class: the only reader of the environment.

Every variable has the prefix `AMEND_` except `REDIS_URL`. Defaults are the embedded development stack
(`make run`); outside development the settings refuse default or missing secrets.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from functools import lru_cache
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEV_S3_ACCESS_KEY = "amend-dev-access"
DEV_S3_SECRET_KEY = "amend-dev-secret"
DEV_AUDIT_KEY = "amend-dev-audit-key"

Scope = Literal["read", "write", "admin"]


class ApiKey:
    """A configured API key, held only as its SHA-256 digest, with its tenant and scopes."""

    __slots__ = ("digest", "tenant", "scopes")

    def __init__(self, digest: str, tenant: str, scopes: frozenset[str]) -> None:
        self.digest = digest
        self.tenant = tenant
        self.scopes = scopes


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Settings(BaseSettings):
    # hide_input_in_errors: a refused setting must not echo the secrets it was given into a crash log
    model_config = SettingsConfigDict(env_prefix="AMEND_", extra="ignore", hide_input_in_errors=True)

    environment: Literal["development", "test", "production"] = "development"

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", validation_alias=AliasChoices("REDIS_URL", "AMEND_REDIS_URL")
    )
    s3_endpoint_url: str | None = Field(None, description="None means AWS S3 itself.")
    s3_bucket: str = "amend"
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr = SecretStr(DEV_S3_ACCESS_KEY)
    s3_secret_access_key: SecretStr = SecretStr(DEV_S3_SECRET_KEY)
    s3_connect_timeout: float = Field(5.0, gt=0, le=120)
    s3_read_timeout: float = Field(60.0, gt=0, le=3600)
    s3_max_attempts: int = Field(3, ge=1, le=10)
    s3_multipart_threshold: int = Field(16 * 2**20, ge=5 * 2**20)
    s3_multipart_chunk: int = Field(16 * 2**20, ge=5 * 2**20)

    api_keys: SecretStr = Field(
        SecretStr(""),
        description='"key1:tenantA,key2:tenantB[:read+write+admin]"; key may also be given as sha256:<hex>.',
    )
    audit_hmac_key: SecretStr = SecretStr(DEV_AUDIT_KEY)

    max_upload_bytes: int = Field(2 * 2**30, ge=1024)
    max_safetensors_header_bytes: int = Field(16 * 2**20, ge=1024)
    max_tensors: int = Field(20_000, ge=1)
    max_config_bytes: int = Field(256 * 1024, ge=1024)
    max_merge_adapters: int = Field(64, ge=1, le=64)
    max_jobs_per_tenant: int = Field(32, ge=1, description="Queued + running jobs a tenant may have at once.")
    max_bytes_per_tenant: int = Field(200 * 2**30, ge=1024)
    job_max_attempts: int = Field(3, ge=1, le=20)
    job_time_limit: int = Field(3600, ge=10)
    job_lease_seconds: int = Field(30, ge=3, le=3600)
    merge_threads: int = Field(
        0, ge=0, le=256, description="AMEND_MERGE_THREADS: torch threads for merge and compression jobs; 0 (the "
        "default): every CPU this worker may use. Small decompositions run on one-thread workers side by side "
        "(workers/engines/linalg_pool.py), so more threads no longer lose to thread wake-ups.",
    )
    page_limit_max: int = Field(200, ge=1)

    # the worker's device (resolved once at worker start: workers/device.py)
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda|cuda:[0-9]{1,2})$",
        description="AMEND_DEVICE: auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N.",
    )
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="AMEND_PRECISION: unlearning's autocast dtype; auto is bfloat16 on a GPU that "
        "supports it, else float32. Merges and compressions always compute in float32.",
    )
    deterministic: bool = Field(
        False, description="AMEND_DETERMINISTIC: job processes call torch.use_deterministic_algorithms(True) (with "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8 for CUDA) and seed torch, random and numpy at start, so that a job's "
        "seeded generators give the same result run after run; an op with no deterministic kernel then fails.",
    )
    unlearn_on_cpu: bool = Field(
        True, description="AMEND_UNLEARN_ON_CPU: CPU workers take unlearning jobs while no GPU worker is alive "
        "(false: unlearning waits for a GPU worker).",
    )
    device_memory_bytes: int | None = Field(
        None, ge=2**20, description="AMEND_DEVICE_MEMORY_BYTES: the memory a worker's jobs may use; unset means "
        "the device's free memory at job start (GPU), or MemAvailable (CPU).",
    )
    worker_heartbeat_seconds: int = Field(10, ge=1, le=300, description="How often a worker reports itself.")

    # datasets and models (unlearning inputs)
    max_dataset_rows: int = Field(100_000, ge=1, description="Rows per uploaded dataset.")
    max_dataset_row_bytes: int = Field(64 * 1024, ge=64, description="Bytes per JSONL line.")
    max_model_archive_bytes: int = Field(20 * 2**30, ge=1024, description="A model tar as uploaded.")
    max_model_bytes: int = Field(40 * 2**30, ge=1024, description="A model's files, uncompressed.")
    max_model_files: int = Field(64, ge=1, le=10_000, description="Files in a model archive or directory.")
    model_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="AMEND_MODEL_ROOTS: directories (comma- or os.pathsep-separated) models may be registered "
        "from by path; empty disables registration by path.",
    )

    # observability: GET /metrics (no tenant key), webhooks
    metrics_enabled: bool = Field(True, description="AMEND_METRICS_ENABLED: serve GET /metrics (false: 404).")
    metrics_token: SecretStr = Field(
        SecretStr(""), description="AMEND_METRICS_TOKEN: when set, /metrics needs `Authorization: Bearer <it>` "
        "(a scraper's credential, separate from the tenants' API keys).",
    )
    webhook_secret: SecretStr = Field(
        SecretStr(""), description="AMEND_WEBHOOK_SECRET: each tenant's signing key is derived from it (empty: "
        "from AMEND_AUDIT_HMAC_KEY, which production already requires).",
    )
    webhook_allow_http_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="AMEND_WEBHOOK_ALLOW_HTTP_HOSTS: hosts (comma-separated) webhooks may "
        "reach over plain http, private addresses included (e.g. 127.0.0.1 for tests).",
    )
    webhook_allow_private: bool = Field(
        False, description="AMEND_WEBHOOK_ALLOW_PRIVATE: allow webhook hosts on private addresses.")
    webhook_default_urls: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="AMEND_WEBHOOK_DEFAULT_URLS: 'tenant=url,tenant=url', the URL a "
        "tenant's jobs notify when they name none.",
    )
    webhook_max_attempts: int = Field(6, ge=1, le=20)
    webhook_retry_base_seconds: float = Field(2.0, gt=0, le=3600, description="Backoff: base × 2^(attempt-1).")
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=120)

    data_dir: str = ".amend-data"
    log_level: str = "INFO"

    @field_validator("webhook_allow_http_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("webhook_default_urls", mode="before")
    @classmethod
    def _split_default_urls(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [part.strip().partition("=") for part in value.split(",") if part.strip()]
            return {tenant.strip(): url.strip() for tenant, _, url in pairs}
        return value

    @field_validator("model_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.replace(os.pathsep, ",").split(",") if part.strip()]
        return value

    @field_validator("merge_threads")
    @classmethod
    def _all_usable_cpus(cls, value: int) -> int:
        if value:
            return value
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)

    @model_validator(mode="after")
    def _no_default_secrets_outside_development(self) -> Settings:
        if self.environment == "production":
            defaults = {
                "AMEND_S3_SECRET_ACCESS_KEY": self.s3_secret_access_key.get_secret_value() == DEV_S3_SECRET_KEY,
                "AMEND_AUDIT_HMAC_KEY": self.audit_hmac_key.get_secret_value() == DEV_AUDIT_KEY,
                "AMEND_API_KEYS": not self.api_keys.get_secret_value().strip(),
            }
            bad = [name for name, is_default in defaults.items() if is_default]
            if bad:
                raise ValueError(f"refusing to start in production with default or empty secrets: {bad}")
        self.parsed_api_keys()
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """repr() and str() hide a password inside a URL (REDIS_URL may carry one), as SecretStr hides the rest."""
        for name, value in super().__repr_args__():
            if name in ("redis_url", "s3_endpoint_url") and isinstance(value, str):
                value = _without_password(value)
            yield name, value

    def parsed_api_keys(self) -> dict[str, ApiKey]:
        """Digest -> ApiKey. Raw keys never stay in memory beyond this parse."""
        keys: dict[str, ApiKey] = {}
        for item in self.api_keys.get_secret_value().split(","):
            item = item.strip()
            if not item:
                continue
            parts = item.split(":")
            if parts[0] == "sha256" and len(parts) >= 3:
                digest, rest = parts[1].lower(), parts[2:]
                if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
                    raise ValueError("a sha256:<hex> API key needs the 64 hex digits of its SHA-256")
            elif not parts[0]:
                raise ValueError("an API key is empty: key:tenant[:scope+scope]")
            else:
                digest, rest = hash_key(parts[0]), parts[1:]
            if not rest or not rest[0]:
                raise ValueError("each API key needs a tenant: key:tenant[:scope+scope]")
            tenant = rest[0]
            if not (tenant.isascii() and tenant.replace("-", "").replace("_", "").isalnum()) or len(tenant) > 64:
                raise ValueError(f"tenant names are 1..64 of [A-Za-z0-9_-], got {tenant!r}")
            scopes = frozenset(rest[1].split("+")) if len(rest) > 1 else frozenset({"read", "write"})
            unknown = scopes - {"read", "write", "admin"}
            if unknown:
                raise ValueError(f"unknown scopes {sorted(unknown)}")
            if digest in keys:
                raise ValueError("the same API key is configured twice")
            keys[digest] = ApiKey(digest, tenant, scopes)
        return keys


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


@lru_cache
def get_settings() -> Settings:
    return Settings()
