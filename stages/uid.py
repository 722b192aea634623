"""Stable sample identifiers.

A uid is derived from the (url, caption) pair alone, as DataComp does, so the same row gets the
same uid on every run, every machine and every sharding of the input.
"""

import hashlib


def compute_uid(url: str, caption: str) -> str:
    """128-bit hex uid of a url/caption pair (md5 is fine here: identity, not security)."""
    digest = hashlib.md5(usedforsecurity=False)
    digest.update(url.encode("utf-8"))
    digest.update(b"\x00")
    digest.update(caption.encode("utf-8"))
    return digest.hexdigest()
