"""A storage URL's secrets, hidden wherever the URL or an error about it is shown or written.

A password sits in a URL as `user:password@host` or as a query item, and the database's driver reads query keys
percent-decoded and in any case: `pass%77ord=` is `password=` to SQLAlchemy, and PostgreSQL also takes
`sslpassword=`. So every key is decoded before it is judged, and any key that names a password or a secret counts.
"""

from __future__ import annotations

import re
import urllib.parse

HIDDEN = "***"  # what a password becomes in everything written
SECRET_KEY = re.compile(r"pass|pwd|secret|token", re.IGNORECASE)  # password, passwd, sslpassword, PWD, auth_token


def is_secret_key(key: str) -> bool:
    """Whether a URL query key, as the driver decodes it, names a password or another secret."""
    return bool(SECRET_KEY.search(urllib.parse.unquote_plus(key)))


def masked_url(url: str | None) -> str | None:
    """`url` with its password (user:password@...) and every secret query item's value replaced by ***."""
    if url is None or "://" not in url:
        return url
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc and ":" in netloc.rpartition("@")[0]:
        user = netloc.rpartition("@")[0].split(":", 1)[0]
        netloc = f"{user}:{HIDDEN}@{netloc.rpartition('@')[2]}"
    query = "&".join(f"{item.partition('=')[0]}={HIDDEN}" if is_secret_key(item.partition("=")[0]) else item
                     for item in parts.query.split("&") if item)
    # Replaced in the text rather than rebuilt: urlunsplit would turn sqlite:////abs.db into sqlite://abs.db.
    return url.replace(parts.netloc, netloc, 1).replace("?" + parts.query, "?" + query, 1)


def url_secrets(url: str) -> list[str]:
    """Every secret `url` holds, as written in it and as decoded (the forms an error message may quote)."""
    parts = urllib.parse.urlsplit(url)
    user_info = parts.netloc.rpartition("@")[0]
    written = [user_info.split(":", 1)[1]] if ":" in user_info else []
    written += [item.partition("=")[2] for item in parts.query.split("&") if is_secret_key(item.partition("=")[0])]
    found = {form for secret in written for form in (secret, urllib.parse.unquote(secret),
                                                     urllib.parse.unquote_plus(secret))}
    return sorted(filter(None, found), key=len, reverse=True)  # longest first: no secret left half-hidden


def scrubbed(text: str, url: str) -> str:
    """`text` (an error message about `url`) with the URL shown masked and every form of its secrets hidden."""
    text = text.replace(url, masked_url(url) or url)
    for secret in url_secrets(url) if "://" in url else []:
        text = text.replace(secret, HIDDEN)
    return text
