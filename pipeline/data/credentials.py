"""Keeping credentials out of what diffseg prints, records and ships.

* ``looks_secret(name)``: a setting or variable name that holds a credential
  (``secret``, ``HF_TOKEN``, ``DB_PASS``, ``APIKEY``, camel-case ``AccessKeyId``, ...).
* ``url_credential_problem(value)``: a URL that carries a credential (a password in
  ``scheme://user:PASSWORD@host``, or a query parameter such as ``sig=`` or
  ``X-Amz-Signature=``). Such URLs are refused, wherever they appear: they end up in
  manifests, logs and error messages.
* ``storage_options_json``: the argparse type of ``--storage-options``; a malformed
  value is reported by position, never echoed.
* ``shown_env_value`` / ``masked_storage_options``: what a dry run may print.
"""
from __future__ import annotations

import argparse
import json
import re
from typing import Any, Iterator
from urllib.parse import parse_qsl, urlsplit

from pipeline.arg_types import described

MASK = "****"
ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")

# Words (after splitting snake, kebab and camel case) that make a name a credential's name.
_SECRET_WORDS = frozenset({
    "key", "keys", "secret", "secrets", "token", "tokens", "pass", "passwd", "password", "passphrase", "pwd", "pw",
    "credential", "credentials", "creds", "private", "session", "auth", "authorization", "sig", "signature",
    "cookie", "bearer", "sas", "apikey", "accesskey", "secretkey", "privatekey", "connection",
})
# Substrings of the whole name, lower-cased with separators removed (catches APIKEY, DBPASSWORD, ...).
_SECRET_PARTS = ("secret", "token", "passw", "credential", "private", "apikey", "accesskey", "signature", "auth")
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")

# Environment variables whose values are settings, not secrets: shown by a dry run.
# Every other value is masked (a ${VAR} reference is shown as written, never expanded).
HARMLESS_ENV_NAMES = frozenset({
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM", "PYTHONUNBUFFERED",
    "PYTHONHASHSEED", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
    "HF_HUB_ENABLE_HF_TRANSFER", "HF_ENDPOINT", "TORCH_HOME", "CUDA_VISIBLE_DEVICES", "NCCL_DEBUG",
    "NCCL_SOCKET_IFNAME", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3", "GOOGLE_CLOUD_PROJECT", "TZ", "LANG", "LC_ALL",
})
# storage_options keys whose values are settings, not secrets (fsspec/s3fs/gcsfs/adlfs).
HARMLESS_STORAGE_KEYS = frozenset({
    "endpoint_url", "region_name", "region", "anon", "use_ssl", "requester_pays", "profile", "project",
    "default_block_size", "default_fill_cache", "default_cache_type", "version_aware", "cache_regions",
    "account_name", "asynchronous", "skip_instance_cache", "use_listings_cache", "listings_expiry_time",
    "max_concurrency", "retries", "connect_timeout", "read_timeout", "addressing_style", "signature_version",
})


def name_words(name: str) -> list[str]:
    """``AccessKeyId`` -> [access, key, id]; ``aws_secret_access_key`` -> [aws, secret, access, key]."""
    return [w.lower() for w in _WORD.findall(str(name))]


def looks_secret(name: str) -> bool:
    """Whether a setting or environment variable of this name holds a credential."""
    if str(name).lower() in HARMLESS_STORAGE_KEYS:  # "signature_version" is a setting, not a signature
        return False
    words = name_words(name)
    joined = "".join(words)
    return any(w in _SECRET_WORDS for w in words) or any(part in joined for part in _SECRET_PARTS)


def url_credential_problem(value: Any) -> str | None:
    """What makes ``value`` a URL with a credential in it (without repeating it), or None."""
    if not isinstance(value, str) or "://" not in value:
        return None
    try:
        parts = urlsplit(value.strip())
        password = parts.password
    except ValueError:
        return None
    if password:
        return "a URL with a password in it (scheme://user:PASSWORD@host)"
    for name, _ in parse_qsl(parts.query, keep_blank_values=True):
        if looks_secret(name) or name.lower().startswith(("x-amz-", "x-goog-")):
            return f"a URL with a credential in its query ({name}=...)"
    return None


def url_credentials_in(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(where, problem) for every URL with a credential inside nested mappings and lists."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from url_credentials_in(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from url_credentials_in(v, f"{where}[{i}]")
    else:
        problem = url_credential_problem(value)
        if problem:
            yield where, problem


def refuse_url_credentials(input: str, output: str, storage_options: dict[str, Any] | None) -> None:
    """Raise ValueError (one sentence, the secret not in it) when a URL carries a credential."""
    found = list(url_credentials_in({"INPUT": input, "OUTPUT": output}))
    found += [(f"--storage-options {w}", p) for w, p in url_credentials_in(storage_options or {})]
    if found:
        where, problem = found[0]
        raise ValueError(f"{where} is {problem}; pass credentials through the provider's own environment "
                         "variables or config instead (the URL would be written to the manifest and logs).")


def _storage_options(text: str) -> dict[str, Any]:
    """``--storage-options``: a JSON object. Errors never repeat the text."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({exc.msg} at character {exc.pos} of {len(text)}); the value is not shown, "
            "it may hold credentials") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"the value is a JSON {type(value).__name__}; it is not shown, it may hold "
                                         "credentials")
    return value


storage_options_json = described(_storage_options, "a JSON object of fsspec options ('{\"anon\": true}')",
                                 '{"anon": true}', '{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}',
                                 secret=True)


def shown_env_value(name: str, written: str) -> str:
    """What a dry run prints for an env var: ``${VAR}`` as written, a harmless setting's
    value, else the mask."""
    if ENV_REF.match(written):
        return written
    if name in HARMLESS_ENV_NAMES and not url_credential_problem(written):
        return written
    return MASK


def masked_storage_options(value: Any, key: str = "") -> Any:
    """storage_options for printing: ``${VAR}``, numbers, booleans and harmless settings as
    they are, every other string masked."""
    if isinstance(value, dict):
        return {k: masked_storage_options(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [masked_storage_options(v, key) for v in value]
    if not isinstance(value, str) or ENV_REF.match(value):
        return value
    if key.lower() in HARMLESS_STORAGE_KEYS and not url_credential_problem(value):
        return value
    return MASK
