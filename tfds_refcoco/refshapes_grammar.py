"""RefShapes expression grammar: vocabulary, parser, renderer and reference interpreter.

Every expression has the one regular form

    the [SUPERLATIVE] [COLOUR] NOUN [RELATION the [COLOUR] NOUN]

with SUPERLATIVE in small|big|leftmost|rightmost|top|bottom, NOUN a shape kind or the generic
"shape", and RELATION in "left of"|"right of"|"above"|"below". Its meaning (``evaluate``):

1. candidates = objects matching the head's colour and noun;
2. with a relation: the landmark description must match exactly one object L; keep the
   candidates (other than L) standing in the relation to L, compared by box centre;
3. with a superlative: there must be >= 2 candidates; keep the one that is the most extreme
   (size = longer bounding-box side; position = bounding-box centre).

``pos_margin`` (pixels) and ``size_margin`` (log size ratio) turn each comparison into "wins by
more than the margin". A positive margin is strict (only clear winners pass), a negative one is
lenient (anything that might pass does). An expression is *clear* for object r when both the
strict and the lenient reading give exactly [r]: r clearly satisfies it and every other object
clearly does not. The generator only emits clear expressions.

Horizontal words are only left/right/leftmost/rightmost, so a mirrored image with those words
swapped (``mirror_text``) describes the mirrored referent; vertical words never change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Palette: high-contrast, well separated in RGB so a small CNN tells them apart at once.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 190, 45),
    "blue": (40, 90, 255),
    "yellow": (245, 225, 30),
    "white": (245, 245, 245),
    "purple": (165, 45, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
GENERIC_NOUN = "shape"
SIZE_WORDS: tuple[str, ...] = ("small", "big")
POSITION_WORDS: tuple[str, ...] = ("leftmost", "rightmost", "top", "bottom")
SUPERLATIVES: tuple[str, ...] = SIZE_WORDS + POSITION_WORDS
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

# Words a horizontal flip must swap; nothing else in the vocabulary depends on left/right.
LR_SWAP: dict[str, str] = {
    "left": "right",
    "right": "left",
    "leftmost": "rightmost",
    "rightmost": "leftmost",
}

VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {"the", "of", "above", "below", "left", "right", GENERIC_NOUN}
        | set(COLORS)
        | set(SHAPES)
        | set(SUPERLATIVES)
    )
)


@dataclass(frozen=True)
class Description:
    """A colour (or None) and a noun (a shape kind or the generic "shape")."""

    color: str | None
    noun: str

    def words(self) -> list[str]:
        return ([self.color] if self.color else []) + [self.noun]

    def matches(self, obj: SceneObject) -> bool:
        return (self.color is None or obj.color == self.color) and (
            self.noun == GENERIC_NOUN or obj.shape == self.noun
        )


@dataclass(frozen=True)
class Expression:
    """Parsed form of one referring expression."""

    head: Description
    superlative: str | None = None
    relation: str | None = None
    landmark: Description | None = None

    def text(self) -> str:
        words = ["the"] + ([self.superlative] if self.superlative else []) + self.head.words()
        if self.relation is not None:
            assert self.landmark is not None
            words += [self.relation, "the"] + self.landmark.words()
        return " ".join(words)

    def num_attributes(self) -> int:
        """Colour, shape kind and superlative words describing the referent itself."""
        return (
            (self.head.color is not None)
            + (self.head.noun != GENERIC_NOUN)
            + (self.superlative is not None)
        )


@dataclass(frozen=True)
class SceneObject:
    """What the interpreter needs to know about one shape."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @classmethod
    def from_bbox(cls, shape: str, color: str, bbox: Sequence[float]) -> SceneObject:
        x, y, w, h = (float(v) for v in bbox)
        return cls(shape, color, x + w / 2.0, y + h / 2.0, max(w, h))

    @classmethod
    def coerce(cls, obj: SceneObject | Mapping) -> SceneObject:
        """Accept a SceneObject or a mapping with 'shape', 'color' and 'bbox' [x, y, w, h]."""
        if isinstance(obj, SceneObject):
            return obj
        return cls.from_bbox(obj["shape"], obj["color"], obj["bbox"])


def parse(text: str) -> Expression:
    """Parse an expression of the grammar above; raises ValueError on anything else."""
    toks = text.lower().split()
    pos = 0

    def take(options: Sequence[str]) -> str | None:
        nonlocal pos
        if pos < len(toks) and toks[pos] in options:
            pos += 1
            return toks[pos - 1]
        return None

    def description() -> Description:
        color = take(tuple(COLORS))
        noun = take(SHAPES + (GENERIC_NOUN,))
        if noun is None:
            raise ValueError(f"expected a noun at word {pos} of {text!r}")
        return Description(color, noun)

    if take(("the",)) is None:
        raise ValueError(f"expression must start with 'the': {text!r}")
    superlative = take(SUPERLATIVES)
    head = description()
    relation = landmark = None
    if pos < len(toks):
        word = take(("left", "right", "above", "below"))
        if word in ("left", "right"):
            if take(("of",)) is None:
                raise ValueError(f"expected 'of' after {word!r} in {text!r}")
            word += " of"
        if word is None:
            raise ValueError(f"unexpected word {toks[pos]!r} in {text!r}")
        if take(("the",)) is None:
            raise ValueError(f"expected 'the' after {word!r} in {text!r}")
        relation, landmark = word, description()
    if pos != len(toks):
        raise ValueError(f"trailing words in {text!r}")
    return Expression(head, superlative, relation, landmark)


def mirror_text(text: str) -> str:
    """The expression describing the horizontally mirrored scene."""
    return " ".join(LR_SWAP.get(w, w) for w in text.split())


def _relation_score(relation: str, obj: SceneObject, lm: SceneObject) -> float:
    """How far (pixels) ``obj`` stands in ``relation`` to ``lm``; image y grows downwards."""
    if relation == "left of":
        return lm.cx - obj.cx
    if relation == "right of":
        return obj.cx - lm.cx
    if relation == "above":
        return lm.cy - obj.cy
    if relation == "below":
        return obj.cy - lm.cy
    raise ValueError(relation)


def _superlative_key(word: str, obj: SceneObject) -> float:
    return {
        "small": -math.log(obj.size),
        "big": math.log(obj.size),
        "leftmost": -obj.cx,
        "rightmost": obj.cx,
        "top": -obj.cy,
        "bottom": obj.cy,
    }[word]


def evaluate(
    expr: Expression,
    objects: Sequence[SceneObject],
    *,
    pos_margin: float = 0.0,
    size_margin: float = 0.0,
) -> list[int]:
    """Indices of the objects ``expr`` picks out (see the module docstring for margins)."""
    cands = [i for i, o in enumerate(objects) if expr.head.matches(o)]
    if expr.relation is not None:
        assert expr.landmark is not None
        lms = [i for i, o in enumerate(objects) if expr.landmark.matches(o)]
        if len(lms) != 1:
            return []
        lm = objects[lms[0]]
        cands = [
            i
            for i in cands
            if i != lms[0] and _relation_score(expr.relation, objects[i], lm) > pos_margin
        ]
    if expr.superlative is not None:
        if len(cands) < 2:  # "the big circle" needs another circle to compare with
            return []
        margin = size_margin if expr.superlative in SIZE_WORDS else pos_margin
        keys = {i: _superlative_key(expr.superlative, objects[i]) for i in cands}
        cands = [i for i in cands if keys[i] - max(keys[j] for j in cands if j != i) > margin]
    return cands


def resolve(
    expression: str,
    objects: Sequence[SceneObject | Mapping],
    *,
    pos_margin: float = 0.0,
    size_margin: float = 0.0,
) -> list[int]:
    """Indices into ``objects`` of the objects the expression text refers to."""
    objs = [SceneObject.coerce(o) for o in objects]
    return evaluate(parse(expression), objs, pos_margin=pos_margin, size_margin=size_margin)
