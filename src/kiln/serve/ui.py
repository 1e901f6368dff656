"""The chat web page kiln serves at `/`: one HTML file (ui.html, no build step) that streams from
the server's own /v1/chat/completions. Model output is written with textContent only, and a
Content-Security-Policy lets no script run but the page's own."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib.resources import files


@cache
def page() -> tuple[str, dict[str, str]]:
    """The page's HTML and its response headers (the CSP names the inline script's hash)."""
    html = files("kiln.serve").joinpath("ui.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
        for s in scripts
    )
    csp = (
        f"default-src 'self'; script-src {hashes}; style-src 'unsafe-inline'; img-src 'none'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    )
    return html, {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"}
