"""Text classification tasks generated from templates and word lists, for the merge-quality benchmark.

In each task the label depends on word order, scope or a relation between words (who did it, what the
negation applies to, which number is larger, which noun heads the phrase, which topic is contrasted), while
the bag of words is nearly balanced across classes. So the frozen encoder with a centroid head (normalised
class means of its mean-pooled embeddings) does them poorly, and a small LoRA inside the encoder learns them:
that gap is what makes a merge measurable. (A full logistic-regression probe on the same frozen features
does much better, 0.91–0.99 — the pretrained encoder does carry the information, linearly but weakly.)
Every generator is a pure function of a `random.Random`, so splits are reproducible from a seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

ANIMALS = ["cat", "dog", "horse", "fox"]
OTHER_ANIMALS = ["goat", "mouse", "bear", "wolf", "duck", "rabbit", "sheep", "lion"]
VERBS = [
    ("chased", "chased"),
    ("bit", "bitten"),
    ("followed", "followed"),
    ("pushed", "pushed"),
    ("saw", "seen"),
    ("kicked", "kicked"),
    ("licked", "licked"),
    ("watched", "watched"),
    ("found", "found"),
    ("attacked", "attacked"),
    ("helped", "helped"),
    ("scared", "scared"),
]
PLACES = ["", "", " in the garden", " near the barn", " at night", " by the river", " on the hill"]

POSITIVE = [
    "good",
    "great",
    "wonderful",
    "excellent",
    "pleasant",
    "enjoyable",
    "lovely",
    "superb",
    "fine",
    "delightful",
    "brilliant",
    "charming",
    "fantastic",
    "amazing",
    "nice",
]
NEGATIVE = [
    "bad",
    "awful",
    "terrible",
    "boring",
    "dull",
    "poor",
    "horrible",
    "dreadful",
    "weak",
    "tedious",
    "disappointing",
    "mediocre",
    "unpleasant",
    "lousy",
    "bland",
]
SUBJECTS = [
    "the movie",
    "the food",
    "the hotel",
    "the service",
    "the book",
    "the concert",
    "the trip",
    "the game",
    "the show",
    "the meal",
    "the room",
    "the lecture",
    "the album",
    "the party",
]
NEGATORS = [
    "was not",
    "was not at all",
    "was never",
    "was hardly",
    "was far from",
    "was not really",
    "is not",
    "is never",
    "was by no means",
]
AFFIRMERS = [
    "was",
    "was really",
    "was truly",
    "was quite",
    "is",
    "is really",
    "was very",
    "was so",
    "was always",
    "was indeed",
]

NUMBERS = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
THINGS = [
    ("apples", "pears"),
    ("cats", "dogs"),
    ("boys", "girls"),
    ("cars", "bikes"),
    ("cups", "plates"),
    ("books", "pens"),
    ("birds", "fish"),
    ("red balls", "blue balls"),
    ("chairs", "tables"),
]

NOUNS_SG_PL = [
    ("dog", "dogs"),
    ("teacher", "teachers"),
    ("car", "cars"),
    ("child", "children"),
    ("doctor", "doctors"),
    ("bird", "birds"),
    ("student", "students"),
    ("farmer", "farmers"),
    ("tree", "trees"),
    ("singer", "singers"),
    ("player", "players"),
    ("woman", "women"),
    ("man", "men"),
    ("key", "keys"),
    ("letter", "letters"),
    ("friend", "friends"),
]
PREPS = ["near", "behind", "with", "next to", "beside", "of", "from", "under"]
VERBS_SG_PL = [
    ("is", "are"),
    ("was", "were"),
    ("has", "have"),
    ("runs", "run"),
    ("seems", "seem"),
    ("looks", "look"),
    ("stays", "stay"),
    ("waits", "wait"),
]
ENDINGS = ["here", "outside", "tired", "happy", "late", "fine", "old", "ready", "away", "quiet"]

Example = tuple[str, int]


@dataclass(frozen=True)
class Task:
    """A named task: `n_classes` labels, class names for printing, and a generator of one example."""

    name: str
    classes: tuple[str, ...]
    make: Callable[[random.Random], Example]

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def _agent(rng: random.Random) -> Example:
    """Who did it: the agent of a transitive sentence, active or passive (the patient is another animal)."""
    agent = rng.randrange(len(ANIMALS))
    patient = rng.choice([a for a in ANIMALS if a != ANIMALS[agent]] + OTHER_ANIMALS)
    past, participle = rng.choice(VERBS)
    place = rng.choice(PLACES)
    if rng.random() < 0.5:
        text = f"the {ANIMALS[agent]} {past} the {patient}{place}"
    else:
        text = f"the {patient} was {participle} by the {ANIMALS[agent]}{place}"
    return text, agent


def _negated_sentiment(rng: random.Random) -> Example:
    """Sentiment under negation: 'the food was not bad' is positive."""
    positive = rng.random() < 0.5
    negated = rng.random() < 0.5
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    verb = rng.choice(NEGATORS if negated else AFFIRMERS)
    return f"{rng.choice(SUBJECTS)} {verb} {adjective}", int(positive != negated)


def _comparison(rng: random.Random) -> Example:
    """Number words: are there more of the first thing than of the second?"""
    i, j = rng.sample(range(len(NUMBERS)), 2)
    first, second = rng.choice(THINGS)
    if rng.random() < 0.5:
        first, second = second, first
    return f"there are {NUMBERS[i]} {first} and {NUMBERS[j]} {second}", int(i > j)


def _agreement(rng: random.Random) -> Example:
    """Subject number with an attractor: 'the keys near the man are here' has a plural subject."""
    plural = rng.random() < 0.5
    noun = rng.choice(NOUNS_SG_PL)
    attractor = rng.choice([n for n in NOUNS_SG_PL if n != noun])[0 if plural else 1]
    return f"the {noun[int(plural)]} {rng.choice(PREPS)} the {attractor}", int(plural)


TOPICS = {
    "sports": ["football", "tennis", "the match", "the league", "basketball", "the olympics", "golf"],
    "food": ["cooking", "the recipe", "pasta", "baking bread", "the restaurant", "cheese", "soup"],
    "science": ["physics", "the experiment", "chemistry", "biology", "the telescope", "atoms", "genes"],
    "money": ["the stock market", "taxes", "the bank", "interest rates", "inflation", "the budget", "loans"],
}
CONTRAST = [
    "the talk was not about {a} but about {b}",
    "it was about {b}, not {a}",
    "the article discussed {b} rather than {a}",
    "forget {a}, the show is about {b}",
    "we skipped {a} and talked about {b}",
    "less about {a} and more about {b}",
    "instead of {a} the class covered {b}",
]


def _contrast_topic(rng: random.Random) -> Example:
    """The topic that the sentence is really about, with a contrasting distractor topic."""
    names = list(TOPICS)
    topic, other = rng.sample(range(len(names)), 2)
    text = rng.choice(CONTRAST).format(a=rng.choice(TOPICS[names[other]]), b=rng.choice(TOPICS[names[topic]]))
    return text, topic


TASKS: dict[str, Task] = {
    "topic": Task("topic", tuple(TOPICS), _contrast_topic),
    "agent": Task("agent", tuple(ANIMALS), _agent),
    "negation": Task("negation", ("negative", "positive"), _negated_sentiment),
    "comparison": Task("comparison", ("fewer", "more"), _comparison),
    "agreement": Task("agreement", ("singular", "plural"), _agreement),
}


def make_splits(task: Task, seed: int, sizes: tuple[int, int, int]) -> tuple[list[Example], ...]:
    """Disjoint train/val/test lists of distinct sentences, each split drawn from the same generator."""
    rng = random.Random(f"{task.name}:{seed}")
    seen: set[str] = set()
    splits: list[list[Example]] = []
    for size in sizes:
        split: list[Example] = []
        tries = 0
        while len(split) < size and tries < 100 * size:
            tries += 1
            text, label = task.make(rng)
            if text not in seen:
                seen.add(text)
                split.append((text, label))
        splits.append(split)
    return tuple(splits)
