"""Needles in real prose: a fact (a code, a name, a number) hidden among the paragraphs of a real text.

Repeated filler makes selection look easier than it is: every filler sentence is alike, so whatever differs stands
out. Here the haystack is consecutive paragraphs of a real text, cut at a seeded offset, so no sentence repeats and
the needle competes with ordinary prose. By default the text is the Python Language Reference prose shipped with
the package (``leankv_hf/data/python_reference.txt``, PSF License); ``text=`` takes any plain-text file whose
paragraphs are separated by blank lines. The question comes after the context, completion style; the answer counts
when the generated text contains the needle's value.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from ..metrics import contains
from .base import Example, fit_length

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "data" / "python_reference.txt"
MAX_NEW_TOKENS = 16

_PLACES = ("north gate", "river archive", "old observatory", "harbour office", "east tower", "seed vault")
_ROLES = ("head archivist", "chief engineer", "night warden", "lead surveyor", "ship's navigator", "head gardener")
_ORGS = ("the Marlow Institute", "the Glass Street Library", "the Orin Company", "the Vale Observatory")
_FIRST = ("Ottilie", "Bernard", "Maren", "Casimir", "Hedda", "Tobias", "Liesel", "Anselm", "Imogen", "Percival")
_LAST = ("Marchbanks", "Quillfeather", "Ashcombe", "Dunmore", "Verhoeven", "Castellane", "Pemberton", "Okonkwo")
_STORES = ("crates", "barrels", "lanterns", "maps", "coils of rope", "bottles of ink")
_HOLDERS = ("the blue warehouse", "the lower cellar", "the west depot", "the harbour shed", "the quarry store")


@dataclass(frozen=True)
class NeedleForm:
    """One kind of fact: how it is stated, asked and answered, and how its value is drawn."""

    name: str
    statement: str  # the needle sentence, with {value} and the form's other fields
    question: str
    answer_prefix: str  # what the prompt ends with; the model completes the value
    fields: Callable[[random.Random], dict[str, str]]


def _code(rng: random.Random) -> dict[str, str]:
    letters = "".join(rng.choices(string.ascii_uppercase, k=2))
    return {"place": rng.choice(_PLACES), "value": f"{letters}-{rng.randint(1000, 9999)}"}


def _name(rng: random.Random) -> dict[str, str]:
    return {
        "role": rng.choice(_ROLES),
        "org": rng.choice(_ORGS),
        "value": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
    }


def _number(rng: random.Random) -> dict[str, str]:
    return {"thing": rng.choice(_STORES), "holder": rng.choice(_HOLDERS), "value": str(rng.randint(10000, 99999))}


FORMS = (
    NeedleForm(
        "code",
        "The access code for the {place} is {value}.",
        "What is the access code for the {place}?",
        "The access code for the {place} is",
        _code,
    ),
    NeedleForm(
        "name", "The {role} of {org} is {value}.", "Who is the {role} of {org}?", "The {role} of {org} is", _name
    ),
    NeedleForm(
        "number",
        "{holder_cap} holds exactly {value} {thing}.",
        "How many {thing} does {holder} hold?",
        "{holder_cap} holds exactly",
        _number,
    ),
)


def _distinct(form: NeedleForm, rng: random.Random, others: list) -> dict[str, str]:
    """Fields for a new needle of ``form`` whose question differs from the other needles' (same place or role)."""
    while True:
        fields = form.fields(rng)
        if all(_filled(form.question, fields) != _filled(f.question, o) for _, f, o in others):
            return fields


def _filled(template: str, fields: dict[str, str]) -> str:
    holder = fields.get("holder", "")
    return template.format(**fields, holder_cap=holder[:1].upper() + holder[1:])


def paragraphs(path: str | Path) -> list[str]:
    """The text's paragraphs (blocks separated by blank lines), each with its inner line breaks kept."""
    blocks = [block.strip("\n") for block in Path(path).read_text(encoding="utf-8").split("\n\n")]
    return [block for block in blocks if block.strip()]


def needle_example(
    hay: Sequence[str],
    start: int,
    n: int,
    needles: Sequence[tuple[float, NeedleForm, dict[str, str]]],
    id: str,
    **meta,
) -> Example:
    """Paragraphs ``start .. start + n`` of ``hay`` (wrapping around), each needle ``(depth, form, fields)`` inserted
    as its own paragraph at the boundary nearest to its depth. The question asks about the first needle; the others
    are follow-ups (asked in turn by the ``reuse`` setting)."""
    body = [hay[(start + i) % len(hay)] for i in range(n)]
    for depth, form, fields in sorted(needles, key=lambda needle: -needle[0]):  # deepest first: cuts stay valid
        cut = round(depth * n)
        body.insert(cut, _filled(form.statement, fields))
    asked = [
        (f"\n\nQuestion: {_filled(form.question, f)}\nAnswer: {_filled(form.answer_prefix, f)}", (f["value"],))
        for _, form, f in needles
    ]
    depth, form, _ = needles[0]
    meta = {"depth": depth, "form": form.name, **meta}
    return Example(id, "needle", "\n\n".join(body), *asked[0], MAX_NEW_TOKENS, meta, tuple(asked[1:]))


class NeedleTask:
    """``n_per_cell`` seeded examples per (length, depth); the needle forms take turns. ``needles`` > 1 hides
    that many facts of different forms per context, spread evenly from ``depth``; the first is asked, the others
    are follow-up questions (the ``reuse`` setting asks them all in turn on one compressed context)."""

    name = "needle"
    truncate = False

    def __init__(
        self,
        lengths: Sequence[int] = (2048, 4096),
        depths: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
        n_per_cell: int = 1,
        text: str | Path | None = None,
        needles: int = 1,
    ):
        if any(not 0 <= d <= 1 for d in depths):
            raise ValueError(f"needle depths are fractions in [0, 1], got {list(depths)}")
        if isinstance(needles, bool) or not isinstance(needles, int) or not 1 <= needles <= len(FORMS) * 4:
            raise ValueError(f"needles={needles!r} must be an int in 1..{len(FORMS) * 4}")
        self.lengths, self.depths, self.n_per_cell, self.needles = list(lengths), list(depths), n_per_cell, needles
        self.text = Path(text) if text is not None else DEFAULT_TEXT
        if not self.text.is_file():
            raise FileNotFoundError(f"needle text {self.text} does not exist")

    def examples(self, tokenizer: PreTrainedTokenizerBase, seed: int) -> list[Example]:
        hay = paragraphs(self.text)
        if len(hay) < 2:
            raise ValueError(f"{self.text}: needs paragraphs separated by blank lines, found {len(hay)}")
        out, hint, turn = [], 1, 0
        for length in self.lengths:
            for depth in self.depths:
                for i in range(self.n_per_cell):
                    rng = random.Random(f"needle:{seed}:{length}:{depth}:{i}")
                    needles = []
                    for k in range(self.needles):
                        form = FORMS[(turn + k) % len(FORMS)]
                        needles.append(((depth + k / self.needles) % 1, form, _distinct(form, rng, needles)))
                    turn += 1
                    start = rng.randrange(len(hay))
                    id = f"needle/L{length}/d{depth:g}/{i}"

                    def build(n: int, needles=needles, start=start, id=id, length=length):
                        return needle_example(hay, start, n, needles, id, length=length)

                    example, hint = fit_length(build, tokenizer, length, start=hint)
                    out.append(example)
        return out

    def score(self, example: Example, prediction: str) -> float:
        return contains(prediction, example.answers[0])
