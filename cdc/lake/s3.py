"""The lake on S3 (or an S3-compatible store: MinIO, SeaweedFS, ...), with boto3 only.

``s3://bucket/prefix``: keys live under ``prefix/``. A write is one PUT (multipart through
boto3's managed transfer above ``MULTIPART_BYTES``): S3 makes an object visible whole or
not at all, and durable when the PUT returns, which is the lake contract. Keys are
deterministic, so a retried PUT overwrites with the same bytes (idempotent by construction).

Credentials and region come from the standard AWS chain (env, profile, SSO, instance or
task role). The endpoint is ``--s3-endpoint`` / ``CDC_S3_ENDPOINT``, else
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS itself; plain HTTP is used only
when the named endpoint says ``http://``. Requests are retried by botocore (adaptive mode);
the final failure becomes a :class:`LakeError` with a fix, never with a secret in it.
"""

from __future__ import annotations

import io
import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import boto3
import pyarrow.fs as pafs
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    IncompleteReadError,
    NoCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    ResponseStreamingError,
)

from cdc.errors import ConfigError, LakeError
from cdc.lake.layout import check_key

MULTIPART_BYTES = 64 * 2**20
PROBE_KEY = "_cdc/.write-check"
_MISSING = ("NoSuchKey", "404", "NotFound")
#: a conditional PUT lost: the object exists (412), or a concurrent one is in flight (409)
_EXISTS = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
_BODY_ERRORS = (ResponseStreamingError, IncompleteReadError, ReadTimeoutError)
_AUTH = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
         "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "403")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → (``bucket``, ``some/prefix``)."""
    rest = uri[len("s3://"):] if uri.startswith("s3://") else ""
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError(f"lake {uri!r} names no bucket", fix="use s3://bucket/prefix")
    return bucket, prefix.strip("/")


def resolve_endpoint(endpoint: str | None, env: dict[str, str] | None = None) -> str | None:
    """The named endpoint, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; None: AWS."""
    env = dict(os.environ) if env is None else env
    chosen = endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    if chosen is not None and not chosen.startswith(("http://", "https://")):
        raise ConfigError("the S3 endpoint (--s3-endpoint, CDC_S3_ENDPOINT or "
                          "AWS_ENDPOINT_URL) is not an http(s) URL",
                          fix="pass e.g. --s3-endpoint https://minio.internal:9000")
    return chosen.rstrip("/") if chosen else None


def public_endpoint(endpoint: str) -> str:
    """The endpoint without any user:password part, safe to print."""
    parts = urlsplit(endpoint)
    if parts.username is None and parts.password is None:
        return endpoint
    return urlunsplit(parts._replace(netloc=parts.hostname or ""))


class StorageOptions(dict[str, str]):
    """delta-rs storage options whose ``repr`` (tracebacks with locals) hides credentials."""

    def __repr__(self) -> str:
        return repr({k: "***" if any(w in k.upper() for w in ("SECRET", "TOKEN", "KEY_ID"))
                     else v for k, v in self.items()})


class S3Lake:
    """A lake under ``s3://bucket/prefix``."""

    def __init__(self, uri: str, *, endpoint: str | None = None, max_attempts: int = 10,
                 connect_timeout: float = 10.0, read_timeout: float = 60.0) -> None:
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.endpoint = resolve_endpoint(endpoint)
        self.max_attempts = max_attempts
        try:
            self.session = boto3.session.Session()
        except ProfileNotFound as exc:
            raise ConfigError(f"AWS profile not found: {exc}",
                              fix="check AWS_PROFILE against ~/.aws/config, or unset it") from exc
        self.region = self.session.region_name or "us-east-1"
        config = Config(retries={"total_max_attempts": max_attempts, "mode": "adaptive"},
                        connect_timeout=connect_timeout, read_timeout=read_timeout,
                        s3={"addressing_style": "path"} if self.endpoint else None)
        self.client: Any = self.session.client(
            "s3", endpoint_url=self.endpoint, config=config,
            region_name=self.session.region_name or ("us-east-1" if self.endpoint else None),
            use_ssl=not (self.endpoint or "").startswith("http://"))
        self.transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES,
                                       multipart_chunksize=MULTIPART_BYTES, max_concurrency=4)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def object_key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def write_bytes(self, key: str, data: bytes) -> None:
        name = self.object_key(key)
        try:
            if len(data) > MULTIPART_BYTES:
                self.client.upload_fileobj(io.BytesIO(data), self.bucket, name,
                                           Config=self.transfer)
            else:
                self.client.put_object(Bucket=self.bucket, Key=name, Body=data)
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            raise self._error("write", key, exc) from exc

    def write_if_absent(self, key: str, data: bytes) -> bool:
        """A conditional PUT (``If-None-Match: *``): AWS S3 since 2024, MinIO, moto."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.object_key(key), Body=data,
                                   IfNoneMatch="*")
        except ClientError as exc:
            if _code(exc) in _EXISTS:
                return False
            raise self._error("write", key, exc) from exc
        except BotoCoreError as exc:
            raise self._error("write", key, exc) from exc
        return True

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._error("delete", key, exc) from exc

    def read_bytes(self, key: str) -> bytes | None:
        name = self.object_key(key)
        for attempt in range(1, self.max_attempts + 1):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=name)
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    return None
                raise self._error("read", key, exc) from exc
            except BotoCoreError as exc:  # botocore has retried already
                raise self._error("read", key, exc) from exc
            try:
                data: bytes = response["Body"].read()
                return data
            except _BODY_ERRORS as exc:  # the body broke off after the call: read it again
                if attempt == self.max_attempts:
                    raise self._error("read", key, exc) from exc
        raise AssertionError("unreachable")

    def list(self, prefix: str) -> list[str]:
        root = self.object_key("")
        keys = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.object_key(prefix))
            for page in pages:
                for item in page.get("Contents", []):
                    key = str(item["Key"])[len(root):]
                    if not key.rsplit("/", 1)[-1].startswith("."):
                        keys.append(key)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("list", prefix, exc) from exc
        return sorted(keys)

    def check_writable(self) -> None:
        self.write_bytes(PROBE_KEY, b"ok")
        self.delete(PROBE_KEY)

    # -- pyarrow and Delta tables (delta-rs / object_store) ------------------------------

    def arrow_filesystem(self) -> pafs.SubTreeFileSystem:
        """pyarrow's S3 filesystem on the same endpoint with the same identity, at the prefix.

        Reads are ranged GETs: a footer or a column chunk, never the whole object.
        """
        options: dict[str, Any] = {
            "region": self.region,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts)}
        if self.endpoint:
            parts = urlsplit(self.endpoint)
            options["endpoint_override"] = parts.netloc + parts.path
            options["scheme"] = parts.scheme
        frozen = self._credentials()
        if frozen is not None:
            options.update(access_key=frozen.access_key, secret_key=frozen.secret_key,
                           session_token=frozen.token or None)
        root = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        return pafs.SubTreeFileSystem(root, pafs.S3FileSystem(**options))

    def delta_location(self, key: str) -> tuple[str, dict[str, str] | None]:
        return f"{self.uri}/{key}", self.delta_storage_options()

    def delta_storage_options(self) -> StorageOptions:
        """Storage options for delta-rs that reach the same bucket with the same identity.

        ``conditional_put=etag`` makes every Delta commit a put-if-absent (S3 conditional
        writes; MinIO and moto support them too), so two writers can never overwrite each
        other's commit: no locking provider is needed.
        """
        options = StorageOptions({"AWS_REGION": self.region, "conditional_put": "etag"})
        if self.endpoint:
            options["AWS_ENDPOINT_URL"] = self.endpoint
            if self.endpoint.startswith("http://"):
                options["AWS_ALLOW_HTTP"] = "true"
        frozen = self._credentials()
        if frozen is not None:
            options["AWS_ACCESS_KEY_ID"] = frozen.access_key
            options["AWS_SECRET_ACCESS_KEY"] = frozen.secret_key
            if frozen.token:
                options["AWS_SESSION_TOKEN"] = frozen.token
        return options

    def _credentials(self) -> Any:
        """The AWS chain's credentials now (``access_key``, ``secret_key``, ``token``), or None."""
        credentials = self.session.get_credentials()
        return None if credentials is None else credentials.get_frozen_credentials()

    # -- errors --------------------------------------------------------------------------------

    def _error(self, verb: str, key: str, exc: Exception) -> LakeError:
        where = f"s3://{self.bucket}/{self.object_key(key)}"
        via = f" via {public_endpoint(self.endpoint)}" if self.endpoint else ""
        cause = exc
        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__cause__, Exception):
            cause = exc.__cause__
        code = _code(cause) if isinstance(cause, ClientError) else type(cause).__name__
        if isinstance(cause, NoCredentialsError):
            fix = ("configure AWS credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                   "AWS_PROFILE, or an instance/task role")
        elif code == "NoSuchBucket":
            fix = f"create bucket {self.bucket!r} or fix --lake"
        elif code in _AUTH:
            fix = (f"check the AWS credentials and that they may read, write, list and delete "
                   f"in s3://{self.bucket}/{self.prefix}")
        else:
            fix = (f"the store kept failing after {self.max_attempts} attempts; check "
                   "--s3-endpoint and the network, then run again (nothing past the last "
                   "durable write was acknowledged)")
        return LakeError(f"cannot {verb} {where}{via}: {code}", fix=fix)


def _code(exc: ClientError) -> str:
    error = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
    code = error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(code or "error")
