"""Paths and URLs as users write them: `~` expanded once, credentials hidden when shown.

Every path key of the config (declared with `key(..., path=True)`) goes through `expand_home`
when the config is built, so all of sft and the libraries it calls see the same directory.
Relative paths are left relative: they resolve against the working directory, for every key.
"""

from __future__ import annotations

import re
from pathlib import Path


def expand_home(value: str | None) -> str | None:
    """`~/x` and `~user/x` → the home directory; anything else (Hub id, URL, text) unchanged."""
    if value is None or not value.startswith("~") or "\n" in value or "{" in value:
        return value
    try:
        return str(Path(value).expanduser())
    except RuntimeError:  # ~user of an unknown user: leave it, the path will not be found
        return value


REDACTED = "<redacted>"

# scheme://user:password@host → scheme://<redacted>@host (also s3://KEY:SECRET@bucket)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s'\"`]+)@")
# ?token=...&X-Amz-Signature=... (pre-signed and SAS URLs carry their secret in the query)
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&][^=&\s'\"`]*(?:token|sig|signature|secret|password|credential|key)[^=&\s'\"`]*=)"
    r"(?P<value>[^&#\s'\"`:,)\]>]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with the credentials of any URL in it replaced by `<redacted>`.

    For everything sft shows or saves that may hold a dataset URL: the resolved config, the model
    card, summaries and error messages.
    """
    if "://" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['name']}{REDACTED}", text)


__all__ = ["REDACTED", "expand_home", "redact"]
