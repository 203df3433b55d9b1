"""Offline synthetic text: the Landmark filler, prose-like "essay" sentences, and endless distinct words.

Everything is generated from a seeded ``random.Random`` so that tasks are reproducible without downloads.
The essay is not Paul Graham's (RULER's haystack) but sentences assembled from small built-in phrase lists;
it is prose-shaped enough to be a harder haystack than the repeated filler.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import islice

FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NOISE = " ".join(FILLER)

_SUBJECTS = (
    "The best startups",
    "Most founders",
    "A good essay",
    "The people who make things",
    "Every programmer",
    "Investors",
    "Young companies",
    "A small team",
    "The smartest people I know",
    "Most schools",
    "A new language",
    "Big companies",
    "The first users",
    "Good writers",
    "Hackers",
)
_VERBS = (
    "tend to underestimate",
    "rarely notice",
    "learn to value",
    "quietly depend on",
    "end up rewriting",
    "are surprised by",
    "keep returning to",
    "spend years avoiding",
    "eventually discover",
    "care less about",
    "argue endlessly about",
    "benefit most from",
)
_OBJECTS = (
    "the problems that matter",
    "what users actually want",
    "the cost of waiting",
    "their own assumptions",
    "ideas that seem wrong at first",
    "the boring parts of the work",
    "how long things take",
    "small details",
    "the advice of outsiders",
    "work that compounds",
    "the questions nobody asks",
    "unfashionable problems",
)
_TAILS = (
    "",
    " in the long run",
    " when money is tight",
    " once they start growing",
    " more than they admit",
    " without realizing it",
    " for good reasons",
    " in the early days",
)
_OPENERS = ("", "", "", "But ", "So ", "In practice, ", "Oddly enough, ", "As a rule, ")

WORDS = (
    "apple",
    "river",
    "stone",
    "garden",
    "window",
    "candle",
    "forest",
    "ladder",
    "mirror",
    "pocket",
    "rocket",
    "saddle",
    "thunder",
    "velvet",
    "wagon",
    "anchor",
    "basket",
    "cactus",
    "dragon",
    "engine",
    "feather",
    "glacier",
    "harbor",
    "island",
    "jacket",
    "kettle",
    "lantern",
    "meadow",
    "needle",
    "orchard",
    "pepper",
    "quarry",
    "ribbon",
    "shadow",
    "tunnel",
    "umbrella",
    "valley",
    "whistle",
    "yellow",
    "zipper",
    "bright",
    "calm",
    "eager",
    "gentle",
    "hollow",
    "jolly",
    "lively",
    "mellow",
    "nimble",
    "proud",
    "quiet",
    "rapid",
    "silent",
    "tender",
    "vivid",
    "wild",
    "brave",
    "clever",
    "fancy",
    "giant",
    "humble",
    "polite",
    "rustic",
    "sturdy",
    "tiny",
    "ancient",
    "bitter",
    "crisp",
    "dusty",
    "fragile",
    "golden",
    "hidden",
    "icy",
    "lonely",
    "marble",
    "narrow",
    "orange",
    "purple",
    "royal",
    "salty",
    "smooth",
    "spicy",
    "sunny",
    "tidy",
    "violet",
    "wooden",
    "copper",
    "silver",
    "cotton",
    "paper",
    "cloud",
    "ocean",
    "planet",
    "bridge",
    "castle",
    "desert",
    "jungle",
    "kitten",
    "lemon",
    "monkey",
    "noodle",
    "pencil",
    "puzzle",
    "rabbit",
    "sandal",
    "tomato",
    "turtle",
    "violin",
    "walnut",
    "bucket",
    "button",
    "carpet",
    "cherry",
    "cookie",
    "donkey",
    "falcon",
    "goblet",
    "helmet",
    "insect",
    "jigsaw",
    "koala",
    "magnet",
    "napkin",
    "oyster",
    "parrot",
    "quiver",
    "radish",
    "salmon",
    "teapot",
    "vessel",
    "wizard",
    "yogurt",
    "zebra",
)
_ONSETS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def filler(n: int) -> list[str]:
    """The first ``n`` sentences of the endlessly repeated Landmark filler."""
    return [FILLER[i % len(FILLER)] for i in range(n)]


def essay(seed: str) -> Iterator[str]:
    """An endless stream of prose-like sentences; any prefix is the same for the same seed."""
    rng = random.Random(seed)
    while True:
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}."
        opener = rng.choice(_OPENERS)
        yield opener + (sentence[0].lower() + sentence[1:] if opener else sentence)


def essay_sentences(n: int, seed: str) -> list[str]:
    """The first ``n`` sentences of ``essay(seed)``."""
    return list(islice(essay(seed), n))


def distinct_words(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct lowercase words: the built-in real words first (shuffled), then pronounceable pseudo-words."""
    real = list(WORDS)
    rng.shuffle(real)
    words = real[:n]
    seen = set(words)
    while len(words) < n:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(3))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words
