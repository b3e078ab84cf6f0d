"""The `large-headers` scenario's headers: what a browser request through a CDN and an API
client's request carry (40 lines, ~1.7 KiB), and what a web application answers with (the
upstream adds 15 to its own 5: 20 lines).  Values are realistic in size, not in meaning."""

from __future__ import annotations

#: 40 request headers besides the Host wrk sends
REQUEST_HEADERS: tuple[str, ...] = (
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8",
    "Accept-Language: en-GB,en;q=0.9,fr;q=0.8,de;q=0.7",
    "Accept-Encoding: gzip, deflate, br, zstd",
    "Cache-Control: no-cache",
    "Pragma: no-cache",
    "Referer: https://app.example.com/orders/2024/overview?tab=open&sort=date",
    "Origin: https://app.example.com",
    "Cookie: session=9f8e7d6c5b4a39281706f5e4d3c2b1a0; theme=dark; locale=en-GB; "
    "_ga=GA1.2.1234567890.1700000000; consent=analytics%3Dtrue%26ads%3Dfalse",
    'Sec-Ch-Ua: "Chromium";v="131", "Not_A Brand";v="24"',
    "Sec-Ch-Ua-Mobile: ?0",
    'Sec-Ch-Ua-Platform: "Linux"',
    "Sec-Fetch-Dest: empty",
    "Sec-Fetch-Mode: cors",
    "Sec-Fetch-Site: same-site",
    "Sec-Fetch-User: ?1",
    "Upgrade-Insecure-Requests: 1",
    "DNT: 1",
    "Priority: u=1, i",
    "Authorization: Bearer eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ1c2VyLTQyIiwic2"
    "NvcGUiOiJvcmRlcnM6cmVhZCJ9.c2lnbmF0dXJlLW5vdC1jaGVja2VkLWhlcmU",
    "X-Request-Id: 5f0c7e2a-3b1d-4c8e-9a6f-2d4b8e1c7a90",
    "X-Correlation-Id: corr-7a1b2c3d4e5f",
    "X-Client-Version: web/4.18.2",
    "X-Device-Id: d1e2f3a4-b5c6-47d8-9e0f-1a2b3c4d5e6f",
    "X-Api-Version: 2024-10-01",
    "X-Tenant: acme-eu-west",
    "X-Feature-Flags: new-checkout,fast-search,beta-reports",
    "X-Amzn-Trace-Id: Root=1-67891233-abcdef012345678912345678",
    "CF-Connecting-IP: 198.51.100.23",
    "CF-IPCountry: GB",
    "CF-Ray: 8f1e2d3c4b5a6978-LHR",
    "True-Client-IP: 198.51.100.23",
    "Via: 1.1 varnish, 1.1 cloudfront",
    'If-None-Match: W/"5e3b-1a2b3c4d5e6f"',
    "If-Modified-Since: Tue, 01 Oct 2024 10:00:00 GMT",
    "Content-Type: application/json",
    "Baggage: userId=user-42,region=eu-west-1",
    "X-Forwarded-Proto: https",
    "X-Real-Agent: bench",
    "Accept-Charset: utf-8",
)

#: added by the upstream to its Server, Date, Content-Type, Content-Length and Connection
RESPONSE_HEADERS: tuple[tuple[str, str], ...] = (
    ("Cache-Control", "private, max-age=0, must-revalidate"),
    ("ETag", 'W/"5e3b-1a2b3c4d5e6f"'),
    ("Last-Modified", "Tue, 01 Oct 2024 10:00:00 GMT"),
    ("Vary", "Accept-Encoding, Origin"),
    ("Strict-Transport-Security", "max-age=63072000; includeSubDomains; preload"),
    (
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data: https:; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "strict-origin-when-cross-origin"),
    ("Permissions-Policy", "camera=(), microphone=(), geolocation=()"),
    (
        "Set-Cookie",
        "session=9f8e7d6c5b4a39281706f5e4d3c2b1a0; Path=/; Secure; HttpOnly; SameSite=Lax",
    ),
    ("X-Request-Id", "5f0c7e2a-3b1d-4c8e-9a6f-2d4b8e1c7a90"),
    ("X-RateLimit-Limit", "1000"),
    ("X-RateLimit-Remaining", "998"),
    ("Server-Timing", "db;dur=2.4, app;dur=5.1"),
)


def nginx_add_headers() -> str:
    """RESPONSE_HEADERS as nginx `add_header` lines (`always`: on every status)."""
    lines = []
    for name, value in RESPONSE_HEADERS:
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'add_header {name} "{escaped}" always;')
    return " ".join(lines)


def raw_response_headers() -> bytes:
    """RESPONSE_HEADERS as header lines, each ending with CRLF."""
    return b"".join(f"{name}: {value}\r\n".encode() for name, value in RESPONSE_HEADERS)
