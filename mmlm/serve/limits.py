"""What a served model accepts, with safe defaults (``mmlm serve --limit KEY=VALUE`` changes one),
and reading a request's images within them: data URLs always; remote ``http(s)`` URLs only from
an allow-list of domains, never from private, loopback or link-local addresses (checked again at
every redirect), with a byte cap and a timeout. Every refusal is a ``RequestError`` naming the
request field; the API answers it with a 400."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
import urllib.parse
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mmlm.errors import SampleError
from mmlm.images import decode_image


class ServeLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(32_000_000, gt=0)  # a request body larger than this is refused unread
    max_image_bytes: int = Field(16_000_000, gt=0)  # one image's encoded bytes (after base64 decoding)
    max_image_pixels: int = Field(25_000_000, gt=0)  # width x height, read from the header before decoding
    max_images: int = Field(8, ge=0)  # images in one request
    max_prompt_tokens: int | None = Field(None, gt=0)  # null: the model's processor.max_length
    max_tokens: int = Field(1024, gt=0)  # the largest max_tokens a request may ask for
    default_max_tokens: int = Field(256, gt=0)  # when a request gives none
    max_queue: int = Field(64, gt=0)  # requests waiting for the engine; beyond: 429
    max_batch: int = Field(8, gt=0)  # requests decoded (or embedded) together
    batch_window_ms: float = Field(10.0, ge=0)  # how long the engine waits for more requests to batch
    max_embedding_inputs: int = Field(256, gt=0)  # items in one embeddings request
    allow_domains: list[str] = Field(default_factory=list)  # remote image URLs: only these hosts (and subdomains)
    fetch_timeout_s: float = Field(10.0, gt=0)  # one remote image, connection and download
    max_error_chars: int = Field(500, gt=50)  # error messages are cut to this length


class RequestError(ValueError):
    """A client's mistake: ``status`` (400 unless said), OpenAI's ``type``/``code`` and the field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request", status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status
        self.type = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error"
        )


def parse_limit(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from the command line; the key must be a ``ServeLimits`` field."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or key not in ServeLimits.model_fields:
        known = ", ".join(ServeLimits.model_fields)
        raise ValueError(f"--limit {text!r}: expected KEY=VALUE with KEY one of {known}")
    if key == "allow_domains":
        return key, [d.strip() for d in value.split(",") if d.strip()]
    return key, value


def limits_from(pairs: list[str]) -> ServeLimits:
    values: dict[str, Any] = {}
    for p in pairs:
        k, v = parse_limit(p)
        values[k] = v
    try:
        return ServeLimits(**values)
    except Exception as err:  # pydantic's message names the field
        raise ValueError(f"--limit: {err}") from None


# ------------------------------------------------------------------------------------------ images
def image_from_url(url: str, limits: ServeLimits, param: str, resolve=socket.getaddrinfo):
    """A checked PIL image from a ``data:`` URL or an allowed remote URL."""
    if not isinstance(url, str) or not url:
        raise RequestError("an image_url needs a non-empty url", param)
    if url.startswith("data:"):
        return decode_checked(data_url_bytes(url, limits, param), limits, param)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return decode_checked(fetch(url, limits, param, resolve), limits, param)
    raise RequestError(f"image url scheme {scheme or '(none)'!r} is not accepted; send a data: URL", param)


def data_url_bytes(url: str, limits: ServeLimits, param: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:"):
        raise RequestError("a data URL must look like data:image/png;base64,...", param)
    if not head.endswith(";base64"):
        raise RequestError("only base64 data URLs are accepted (data:image/...;base64,...)", param)
    if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
        raise RequestError(
            f"the image is over max_image_bytes={limits.max_image_bytes:,} bytes", param, "image_too_large"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"the data URL's base64 cannot be decoded: {err}", param, "invalid_base64") from None


def decode_checked(data: bytes, limits: ServeLimits, param: str):
    if len(data) > limits.max_image_bytes:
        raise RequestError(
            f"the image is {len(data):,} bytes, over max_image_bytes={limits.max_image_bytes:,}",
            param,
            "image_too_large",
        )
    try:
        return decode_image(data, limits.max_image_pixels, name="the image", setting="max_image_pixels")
    except SampleError as err:
        code = "image_too_large" if err.reason == "image too large" else "invalid_image"
        raise RequestError(str(err), param, code) from None


def _allowed(host: str, domains: list[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == d.lower().rstrip(".") or host.endswith("." + d.lower().rstrip(".")) for d in domains)


def _public(host: str, port: int, resolve) -> None:
    """Every address the host resolves to must be public (not private, loopback, link-local,
    reserved, multicast or unspecified)."""
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise RequestError(f"the image host {host!r} cannot be resolved: {err}", None, "fetch_failed") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if (
            ip.is_private
            or ip.is_loopback
            or ip.is_link_local
            or ip.is_reserved
            or ip.is_multicast
            or ip.is_unspecified
        ):
            raise RequestError(
                f"the image host {host!r} resolves to {ip}, a private, loopback or link-local address: refused",
                None,
                "url_not_allowed",
            )


def fetch(url: str, limits: ServeLimits, param: str, resolve=socket.getaddrinfo, max_redirects: int = 3) -> bytes:
    """The bytes at an allowed URL: refused unless its host is in ``allow_domains``; each hop's
    host checked for the domain and for public addresses; at most ``max_image_bytes`` read."""
    import urllib.error
    import urllib.request

    if not limits.allow_domains:
        raise RequestError(
            "remote image URLs are not fetched by this server; send the image as a data: URL "
            "(or start the server with --limit allow_domains=example.com)",
            param,
            "url_not_allowed",
        )

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    for _ in range(max_redirects + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RequestError(f"image url {url[:100]!r} is not an http(s) URL", param, "url_not_allowed")
        if not _allowed(parts.hostname, limits.allow_domains):
            raise RequestError(f"the image host {parts.hostname!r} is not in allow_domains", param, "url_not_allowed")
        try:
            _public(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), resolve)
        except RequestError as err:
            err.param = param
            raise
        try:
            with opener.open(url, timeout=limits.fetch_timeout_s) as resp:
                data = resp.read(limits.max_image_bytes + 1)
        except urllib.error.HTTPError as err:
            if err.code in (301, 302, 303, 307, 308) and err.headers.get("Location"):
                url = urllib.parse.urljoin(url, err.headers["Location"])
                continue
            raise RequestError(f"fetching the image gave HTTP {err.code}", param, "fetch_failed") from None
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            raise RequestError(f"fetching the image failed: {err}", param, "fetch_failed") from None
        if len(data) > limits.max_image_bytes:
            raise RequestError(
                f"the image is over max_image_bytes={limits.max_image_bytes:,} bytes", param, "image_too_large"
            )
        return data
    raise RequestError(f"more than {max_redirects} redirects", param, "fetch_failed")
