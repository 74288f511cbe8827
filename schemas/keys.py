"""Cache keys and partition keys.

Both hash the same canonical form of a request, so that identical requests
(after normalisation that cannot change the model's answer) land on one
partition, hence one worker, hence one L1 cache, and meet in one batch.
"""

from __future__ import annotations

import hashlib
import re

_WS = re.compile(r"\s+")


def normalise(text: str, *, uncased: bool) -> str:
    """Whitespace folding, plus lower-casing for an uncased model.

    Both are safe: BERT-style pre-tokenisers split on whitespace runs, and an
    uncased tokenizer lower-cases anyway. Nothing else (no Unicode folding,
    no punctuation stripping) because that could change the tokens.
    """
    folded = _WS.sub(" ", text).strip()
    return folded.lower() if uncased else folded


def cache_key(*, scope: str, model: str, task: str, labels: tuple[str, ...] | None, text: str) -> str:
    """Hash of (tenant scope, model@version, task, canonical params, normalised input).

    `scope` is the tenant, or "*" when the operator shares a model's cache
    across tenants. Labels are part of a classify answer, in the order given
    (scores are returned by label, so order does not change them, but keeping
    the order keeps the key honest if it ever does).
    """
    h = hashlib.blake2b(digest_size=16)
    for part in (scope, model, task, "\x1f".join(labels) if labels else "", text):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def partition_key(*, tenant: str, model: str | None, task: str, labels: tuple[str, ...] | None, text: str) -> bytes:
    """What producers key request records by.

    Producers do not know the model version or whether it is cased, so they
    hash the most folded form (case and whitespace); cased variants then land
    on the same partition, which costs nothing and keeps every cache key of a
    text on one worker.
    """
    return cache_key(
        scope=tenant, model=model or "", task=task, labels=labels, text=normalise(text, uncased=True)
    ).encode()
