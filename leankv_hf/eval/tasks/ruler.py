"""RULER's synthetic tasks (NIAH variants, variable tracking, common/frequent words), generated offline.

Templates, needle formats, subtask configurations (``synthetic.yaml``) and tokens to generate follow RULER; the
answer prefix is appended to the question, as RULER does for base models. Differences: the "essay" haystack is
built-in generated prose (``text.essay``), words come from a small built-in list, no few-shot example is
prepended to vt/cwe, and prompts target ``length`` tokens (RULER targets ``length`` minus the generation budget).
cwe keeps RULER's 30 repeats per common word once the prompt can hold them; shorter prompts repeat common words
less (4 to 30 times, always more than the uncommon words' 3) so that they still fit.

Scoring is RULER's ``string_match_all`` for every subtask here, multivalue and multiquery included: RULER's
``constants.py`` uses ``string_match_part`` only for its QA tasks, which need SQuAD/HotpotQA and are not built.
"""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from ..metrics import string_match_all
from .base import Example, fit_length
from .text import NOISE, WORDS, distinct_words, essay_sentences

_NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
    " The special magic {type_needle_v} for {query} mentioned in the provided text are"
)
_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
_VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assgined the value {query}, they are: "
)
_CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
    " Answer: The top 10 words that appear most often in the list are:"
)
_FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
    " Answer: According to the coded text above, the three most frequently appeared words are:"
)
_DEPTHS = sorted({round(100 * i / 39) for i in range(40)})  # RULER: np.linspace(0, 100, 40) rounded


@dataclass(frozen=True)
class Niah:
    """One needle-in-a-haystack configuration (RULER ``synthetic.yaml``)."""

    haystack: str  # "noise" (repeated filler), "essay" (prose) or "needle" (distractor needles)
    key_type: str  # "words", "numbers" or "uuids"
    value_type: str
    keys: int = 1
    values: int = 1
    queries: int = 1


SUBTASKS: dict[str, Niah | str] = {
    "niah_single_1": Niah("noise", "words", "numbers"),
    "niah_single_2": Niah("essay", "words", "numbers"),
    "niah_single_3": Niah("essay", "words", "uuids"),
    "niah_multikey_1": Niah("essay", "words", "numbers", keys=4),
    "niah_multikey_2": Niah("needle", "words", "numbers"),
    "niah_multikey_3": Niah("needle", "uuids", "uuids"),
    "niah_multivalue": Niah("essay", "words", "numbers", values=4),
    "niah_multiquery": Niah("essay", "words", "numbers", keys=4, queries=4),
    "vt": "vt",
    "cwe": "cwe",
    "fwe": "fwe",
}
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}


def _random_value(kind: str, rng: random.Random) -> str:
    if kind == "words":
        return f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _fill(template: str, context: str, **fields) -> tuple[str, str]:
    """(context part, question part) of a template: the split is right after ``{context}``."""
    before, after = template.split("{context}")
    return before.format(**fields) + context, after.format(**fields)


def _insert(items: list[str], extras: Sequence[str], rng: random.Random) -> list[str]:
    """``items`` with ``extras`` inserted, in order, at random positions."""
    out = list(items)
    for offset, (position, extra) in enumerate(
        zip(sorted(rng.randint(0, len(items)) for _ in extras), extras, strict=True)
    ):
        out.insert(position + offset, extra)
    return out


def _niah(config: Niah, seed: str) -> Callable[[int], tuple[str, str, list[str]]]:
    rng = random.Random(f"{seed}:needles")
    keys: list[str] = []
    while len(keys) < config.keys:
        key = _random_value(config.key_type, rng)
        keys += [key] if key not in keys else []
    values = [[_random_value(config.value_type, rng) for _ in range(config.values)] for _ in keys]
    type_v = config.value_type
    needles = [
        _NEEDLE.format(type_needle_v=type_v, key=k, value=v) for k, vs in zip(keys, values, strict=True) for v in vs
    ]
    rng.shuffle(needles)
    queried = rng.sample(range(config.keys), config.queries)
    queries = [keys[i] for i in queried]
    answers = [v for i in queried for v in values[i]]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    template = _NIAH_TEMPLATE
    if config.queries * config.values == 1:  # RULER's singular wording
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(old, new)
        type_v = type_v[:-1]

    def build(n: int) -> tuple[str, str, list[str]]:
        layout = random.Random(f"{seed}:layout:{n}")
        if config.haystack == "essay":
            sentences = essay_sentences(n, f"{seed}:essay")
            cuts = sorted(round(n * d / 100) for d in layout.sample(_DEPTHS, len(needles)))
            parts, start = [], 0
            for cut, needle in zip(cuts, needles, strict=True):
                parts += sentences[start:cut] + [needle]
                start = cut
            context = " ".join(parts + sentences[start:])
        else:
            if config.haystack == "noise":
                hay = [NOISE] * n
            else:
                hay_rng = random.Random(f"{seed}:hay")
                hay = [
                    _NEEDLE.format(
                        type_needle_v=config.value_type,
                        key=_random_value(config.key_type, hay_rng),
                        value=_random_value(config.value_type, hay_rng),
                    )
                    for _ in range(n)
                ]
            context = "\n".join(_insert(hay, needles, layout))
        return *_fill(template, context, type_needle_v=type_v, query=query), answers

    return build


def _vt(seed: str, hops: int = 4) -> Callable[[int], tuple[str, str, list[str]]]:
    rng = random.Random(f"{seed}:chain")
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        names += [name] if name not in names else []
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]

    def build(n: int) -> tuple[str, str, list[str]]:
        context = "\n".join(_insert([NOISE] * n, chain, random.Random(f"{seed}:layout:{n}")))
        return *_fill(_VT_TEMPLATE, context, query=value, num_v=hops + 1), names

    return build


def _cwe(seed: str, common: int = 10, common_repeats: int = 30, uncommon_repeats: int = 3):
    def build(n: int) -> tuple[str, str, list[str]]:
        repeats = min(common_repeats, uncommon_repeats + 1 + n)
        uncommon = max(0, n - (common_repeats - uncommon_repeats - 1))
        rng = random.Random(f"{seed}:{n}")
        words = distinct_words(common + uncommon, rng)
        listed = words[:common] * repeats + words[common:] * uncommon_repeats
        rng.shuffle(listed)
        context = " ".join(f"{i + 1}. {word}" for i, word in enumerate(listed))
        return *_fill(_CWE_TEMPLATE, context), words[:common]

    return build


def _fwe(seed: str, vocab_size: int = 2000, word_length: int = 6, alpha: float = 2.0):
    rng = random.Random(f"{seed}:vocab")
    vocab = sorted({"".join(rng.choices(string.ascii_lowercase, k=word_length)) for _ in range(vocab_size)})
    rng.shuffle(vocab)
    vocab[0] = "..."  # the most frequent "word" is noise, as in RULER
    zeta = sum(k**-alpha for k in range(1, 100_000))

    def build(n: int) -> tuple[str, str, list[str]]:
        words = [w for k, w in enumerate(vocab, start=1) for _ in range(int(n * k**-alpha / zeta))]
        random.Random(f"{seed}:{n}").shuffle(words)
        return *_fill(_FWE_TEMPLATE, " ".join(words)), vocab[1:4]

    return build


def _builder(subtask: str, seed: str) -> Callable[[int], tuple[str, str, list[str]]]:
    config = SUBTASKS[subtask]
    if isinstance(config, Niah):
        return _niah(config, seed)
    return {"vt": _vt, "cwe": _cwe, "fwe": _fwe}[config](seed)


def _family(subtask: str) -> str:
    return "niah" if subtask.startswith("niah") else subtask


class RulerTask:
    """``n_per_cell`` seeded examples per (subtask, length); lengths are prompt sizes in tokens."""

    name = "ruler"
    truncate = False

    def __init__(self, subtasks: Sequence[str] | None = None, lengths: Sequence[int] = (4096,), n_per_cell: int = 5):
        unknown = sorted(set(subtasks or ()) - set(SUBTASKS))
        if unknown:
            raise ValueError(f"unknown RULER subtasks {unknown}; valid: {', '.join(SUBTASKS)}")
        self.subtasks = list(subtasks or SUBTASKS)
        self.lengths, self.n_per_cell = list(lengths), n_per_cell

    def examples(self, tokenizer: PreTrainedTokenizerBase, seed: int) -> list[Example]:
        out = []
        for subtask in self.subtasks:
            for length in self.lengths:
                hint = 1
                for i in range(self.n_per_cell):
                    id = f"ruler/{subtask}/L{length}/{i}"
                    generate = _builder(subtask, f"ruler:{seed}:{subtask}:{length}:{i}")

                    def build(n: int, generate=generate, id=id, subtask=subtask, length=length) -> Example:
                        context, question, answers = generate(n)
                        limit = TOKENS_TO_GENERATE[_family(subtask)]
                        return Example(
                            id, f"ruler/{subtask}", context, question, tuple(answers), limit, {"length": length}
                        )

                    example, hint = fit_length(build, tokenizer, length, start=hint)
                    out.append(example)
        return out

    def score(self, example: Example, prediction: str) -> float:
        return string_match_all(prediction, example.answers)
