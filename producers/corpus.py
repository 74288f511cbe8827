"""A deterministic corpus of request texts with a realistic length spread.

Texts are built from a fixed vocabulary by a seeded generator, so every run,
machine and test sees the same inputs. Lengths follow a log-normal with a
median of about 12 words (about 16 tokens), a long tail to about 80 words:
the spread of short user queries and sentences that embedding services see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

_WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "for",
    "on",
    "with",
    "as",
    "was",
    "be",
    "by",
    "this",
    "are",
    "at",
    "from",
    "or",
    "an",
    "have",
    "not",
    "they",
    "which",
    "one",
    "you",
    "had",
    "but",
    "all",
    "were",
    "we",
    "when",
    "there",
    "can",
    "more",
    "if",
    "out",
    "so",
    "what",
    "about",
    "up",
    "into",
    "time",
    "only",
    "new",
    "some",
    "could",
    "them",
    "these",
    "may",
    "then",
    "do",
    "first",
    "any",
    "like",
    "now",
    "my",
    "such",
    "make",
    "over",
    "our",
    "even",
    "most",
    "after",
    "also",
    "made",
    "many",
    "well",
    "where",
    "through",
    "back",
    "years",
    "much",
    "before",
    "good",
    "great",
    "see",
    "long",
    "way",
    "little",
    "world",
    "still",
    "own",
    "men",
    "work",
    "life",
    "under",
    "never",
    "same",
    "another",
    "know",
    "while",
    "last",
    "might",
    "us",
    "great",
    "old",
    "year",
    "off",
    "come",
    "since",
    "against",
    "go",
    "came",
    "right",
    "used",
    "take",
    "three",
    "states",
    "himself",
    "few",
    "house",
    "use",
    "during",
    "without",
    "again",
    "place",
    "around",
    "however",
    "home",
    "small",
    "found",
    "thought",
    "went",
    "say",
    "part",
    "once",
    "general",
    "high",
    "upon",
    "school",
    "every",
    "don",
    "does",
    "got",
    "united",
    "left",
    "number",
    "course",
    "war",
    "until",
    "always",
    "away",
    "something",
    "fact",
    "though",
    "water",
    "less",
    "public",
    "put",
    "think",
    "almost",
    "hand",
    "enough",
    "far",
    "took",
    "head",
    "yet",
    "government",
    "system",
    "better",
    "set",
    "told",
    "nothing",
    "night",
    "end",
    "why",
    "called",
    "eyes",
    "find",
    "going",
    "look",
    "asked",
    "later",
    "knew",
    "point",
    "next",
    "program",
    "city",
    "business",
    "give",
    "group",
    "toward",
    "young",
    "days",
    "let",
    "room",
    "president",
    "side",
    "social",
    "given",
    "present",
    "several",
    "order",
    "national",
    "possible",
    "rather",
    "second",
    "face",
    "per",
    "among",
    "form",
    "important",
    "often",
    "things",
    "looked",
    "early",
    "white",
    "case",
    "become",
    "large",
    "big",
    "need",
    "four",
    "within",
    "felt",
    "along",
    "children",
    "saw",
    "best",
    "church",
    "ever",
    "least",
    "power",
    "development",
    "light",
    "thing",
    "family",
    "interest",
    "want",
    "members",
    "mind",
    "country",
    "area",
    "others",
    "done",
    "turned",
    "although",
    "open",
    "problem",
    "sense",
    "service",
    "order",
    "model",
    "data",
    "request",
    "stream",
    "batch",
    "cache",
    "latency",
    "cost",
    "queue",
    "worker",
    "kafka",
    "partition",
    "topic",
    "result",
    "embedding",
    "vector",
    "search",
    "query",
    "user",
    "product",
    "review",
    "price",
    "shipping",
    "delivery",
    "refund",
    "account",
    "password",
    "login",
    "error",
    "payment",
    "invoice",
    "customer",
    "support",
    "ticket",
    "issue",
    "movie",
    "music",
    "game",
    "team",
    "player",
    "score",
    "match",
    "season",
    "weather",
    "rain",
    "storm",
    "travel",
    "flight",
    "hotel",
    "booking",
    "recipe",
    "cooking",
    "dinner",
    "restaurant",
    "coffee",
    "health",
    "doctor",
    "medicine",
    "sleep",
    "exercise",
    "running",
    "market",
    "stock",
    "bank",
    "loan",
    "credit",
    "budget",
    "report",
    "meeting",
    "email",
    "calendar",
    "schedule",
    "project",
    "deadline",
    "manager",
    "design",
]

Distribution = Literal["unique", "uniform", "zipf", "mixed"]

# `unique` and the fresh part of `mixed` start here, far from the hot inputs
# of `uniform`, `zipf` and `mixed`, so a fresh text never repeats a hot one.
FRESH_BASE = 10_000_000
STEP_TEXTS = 1_000_000


def text(index: int, seed: int = 7) -> str:
    """Text number `index` of the corpus (pure: same index, same text)."""
    rng = np.random.default_rng([seed, index])
    n_words = int(np.clip(round(math.exp(rng.normal(math.log(12), 0.6))), 2, 80))
    words = rng.choice(len(_WORDS), size=n_words)
    out = " ".join(_WORDS[w] for w in words)
    return out[0].upper() + out[1:] + ("?" if index % 5 == 0 else ".")


@dataclass(frozen=True)
class Workload:
    """Which corpus texts a run sends, in which order.

    `unique`: every request a new text (0% cache hits). `uniform`: draws over
    `distinct` texts. `zipf`: draws over `distinct` texts with P(rank k)
    proportional to 1/k**exponent: a few hot inputs and a long tail.
    """

    distribution: Distribution = "zipf"
    distinct: int = 1000
    exponent: float = 1.1
    seed: int = 7
    hot_fraction: float = 0.0
    offset: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.hot_fraction <= 1.0:
            raise ValueError(f"hot_fraction={self.hot_fraction}: must be in [0, 1]")
        if self.offset < 0:
            raise ValueError(f"offset={self.offset}: must be >= 0")
        if self.distinct < 1:
            raise ValueError(f"distinct={self.distinct}: must be >= 1")
        if self.distribution == "zipf" and self.exponent <= 0:
            raise ValueError(f"exponent={self.exponent}: must be > 0")

    def step(self, n: int) -> Workload:
        """The same workload for step `n` of a run of steps: the same hot
        inputs, new texts no other step sends (up to a million a step)."""
        return replace(self, offset=self.offset + n * STEP_TEXTS)

    def indices(self, n: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        fresh = FRESH_BASE + self.offset + np.arange(n)
        if self.distribution == "unique":
            return fresh
        if self.distribution == "mixed":
            hot = rng.random(n) < self.hot_fraction
            return np.where(hot, rng.integers(0, self.distinct, size=n), fresh)
        if self.distribution == "uniform":
            return rng.integers(0, self.distinct, size=n)
        ranks = np.arange(1, self.distinct + 1, dtype=np.float64)
        p = ranks**-self.exponent
        return rng.choice(self.distinct, size=n, p=p / p.sum())

    def texts(self, n: int) -> list[str]:
        cache: dict[int, str] = {}
        out = []
        for i in self.indices(n).tolist():
            t = cache.get(i)
            if t is None:
                t = cache[i] = text(i, self.seed)
            out.append(t)
        return out
