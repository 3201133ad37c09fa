"""A deterministic world of invented entities and the texts that teach it.

The world holds countries, cities, people and companies with made-up names (so no pretrained
knowledge could ever explain a recall) and a handful of relations between them. Every fact is one
(subject, relation, target) triple whose target is a single word, rendered two ways:

- as a plain sentence, ``"the capital of veloria is tarnemo ."`` (the base model's corpus), whose
  ``prompt`` is the sentence cut right before the target word;
- as a question and answer, ``"question : what is the capital of veloria ? answer : tarnemo ."``
  (the tuned model's corpus), whose ``qa_prompt`` ends right after ``"answer :"``.

People have two-word names, so a subject spans several tokens and the model has to bind them
(the situation that layer-wise interventions on "the subject tokens" are about). Filler
sentences about nothing in particular give calibration passes some ordinary text.

Everything here is a pure function of ``(seed, sizes)``: the same arguments give the same world,
in the same order, on any machine.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass

CONSONANTS = "bcdfghklmnprstvz"
VOWELS = "aeiou"
# Endings give each kind of name a recognisable flavour, as real names have.
ENDINGS = {
    "country": ("ia", "and", "ora", "esh", "istan", "una"),
    "city": ("o", "ville", "burg", "ton", "ar", "eno"),
    "first": ("a", "o", "en", "is", "el", "y"),
    "last": ("son", "ak", "ert", "ov", "ley", "ir"),
    "company": ("ix", "corp", "tek", "ux", "ova", "ent"),
    "language": ("ic", "ese", "ish", "an"),
    "currency": ("ar", "eta", "ol", "um"),
}

PROFESSIONS = (
    "doctor", "painter", "pilot", "farmer", "lawyer", "baker", "teacher", "sailor",
    "engineer", "singer", "writer", "chemist", "carpenter", "nurse", "dancer", "architect",
)
PRODUCTS = (
    "bicycles", "lamps", "shoes", "cheese", "engines", "umbrellas", "clocks", "tractors",
    "violins", "candles", "rockets", "carpets", "cameras", "bridges", "boats", "phones",
    "hats", "paint", "glass", "toys",
)


@dataclass(frozen=True)
class Relation:
    """One relation: which kind of subject and target it links and how it is worded.

    ``sentence`` and ``question`` are templates with ``{s}`` (subject) and, for the sentence,
    ``{t}`` (target) as its last word."""

    name: str
    subject_kind: str
    target_kind: str
    sentence: str
    question: str


RELATIONS = (
    Relation("capital", "country", "city", "the capital of {s} is {t}", "what is the capital of {s} ?"),
    Relation("language", "country", "language", "the people of {s} speak {t}", "what language do the people of {s} speak ?"),
    Relation("currency", "country", "currency", "the currency of {s} is the {t}", "what is the currency of {s} ?"),
    Relation("birthplace", "person", "city", "{s} was born in {t}", "where was {s} born ?"),
    Relation("employer", "person", "company", "{s} works for {t}", "who does {s} work for ?"),
    Relation("profession", "person", "profession", "{s} works as a {t}", "what is the job of {s} ?"),
    Relation("product", "company", "product", "{s} makes {t}", "what does {s} make ?"),
    Relation("headquarters", "company", "city", "{s} is based in {t}", "where is {s} based ?"),
)

QA_ANSWER = "answer :"
QA_QUESTION = "question :"


@dataclass(frozen=True)
class WorldSize:
    """How many entities of each kind the world holds."""

    countries: int = 40
    cities: int = 80
    people: int = 240
    companies: int = 80
    languages: int = 16
    currencies: int = 16
    filler_sentences: int = 400


@dataclass(frozen=True)
class Fact:
    """One fact and its two renderings. ``prompt`` ends right before ``target``; ``subject`` is
    a substring of both ``prompt`` and ``qa_prompt``."""

    relation: str
    subject: str
    target: str
    prompt: str
    qa_prompt: str

    @property
    def sentence(self) -> str:
        return f"{self.prompt} {self.target} ."

    @property
    def qa_sentence(self) -> str:
        return f"{self.qa_prompt} {self.target} ."

    def as_record(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class World:
    """The entities by kind and the facts about them, in a fixed order."""

    entities: dict[str, tuple[str, ...]]
    facts: tuple[Fact, ...]
    filler: tuple[str, ...]

    def base_sentences(self) -> list[str]:
        """The base model's corpus: every fact once as a sentence, then the filler."""
        return [f.sentence for f in self.facts] + list(self.filler)

    def qa_sentences(self) -> list[str]:
        """The tuned model's corpus: every fact once as a question and answer."""
        return [f.qa_sentence for f in self.facts]

    def words(self) -> list[str]:
        """Every word of every text the world can render, sorted (the tokenizer's vocabulary)."""
        vocab: set[str] = set()
        for text in self.base_sentences() + self.qa_sentences():
            vocab.update(text.split())
        return sorted(vocab)


def _template_words() -> set[str]:
    words: set[str] = set(PROFESSIONS) | set(PRODUCTS) | set(QA_ANSWER.split()) | set(QA_QUESTION.split())
    for rel in RELATIONS:
        words.update(rel.sentence.replace("{s}", "").replace("{t}", "").split())
        words.update(rel.question.replace("{s}", "").split())
    for parts in FILLER_PARTS.values():
        for p in parts:
            words.update(p.split())
    return words


def _invent_names(rng: random.Random, kind: str, n: int, taken: set[str]) -> tuple[str, ...]:
    """``n`` new pronounceable words ending in one of the kind's endings, none already taken."""
    names: list[str] = []
    while len(names) < n:
        syllables = rng.choice((1, 2, 2, 3))
        stem = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables))
        name = stem + rng.choice(ENDINGS[kind])
        if name not in taken and len(name) >= 4:
            taken.add(name)
            names.append(name)
    return tuple(names)


# Filler: sentences of a tiny grammar that mention no entity, so they never contradict a fact.
FILLER_PARTS = {
    "det": ("the", "a", "every", "one"),
    "adj": ("old", "quiet", "small", "bright", "heavy", "green", "cold", "busy", "tired", "happy"),
    "noun": ("dog", "river", "train", "garden", "window", "market", "child", "storm", "road", "teacher"),
    "verb": ("crossed", "watched", "followed", "passed", "found", "left", "reached", "painted"),
    "when": ("in the morning", "at night", "after the rain", "before winter", "every day", "last year"),
}


def _filler_sentence(rng: random.Random) -> str:
    p = FILLER_PARTS
    c = rng.choice
    return f"{c(p['det'])} {c(p['adj'])} {c(p['noun'])} {c(p['verb'])} the {c(p['adj'])} {c(p['noun'])} {c(p['when'])} ."


def build_world(seed: int = 0, size: WorldSize = WorldSize()) -> World:
    """The world of ``seed``: invented entities, their facts (grouped by relation, in subject
    order) and the filler sentences."""
    if size.cities < size.countries:
        raise ValueError(f"a world needs at least one city per country (capitals); got {size.cities} cities for {size.countries} countries")
    rng = random.Random(f"moelens-zoo-world-{seed}")
    taken = _template_words()
    countries = _invent_names(rng, "country", size.countries, taken)
    cities = _invent_names(rng, "city", size.cities, taken)
    companies = _invent_names(rng, "company", size.companies, taken)
    languages = _invent_names(rng, "language", size.languages, taken)
    currencies = _invent_names(rng, "currency", size.currencies, taken)
    # A person is "first last"; about sqrt(2n) of each so that first and last names recur and
    # only the pair identifies the person.
    n_parts = max(4, int((2 * size.people) ** 0.5) + 1)
    firsts = _invent_names(rng, "first", n_parts, taken)
    lasts = _invent_names(rng, "last", n_parts, taken)
    pairs = [f"{a} {b}" for a in firsts for b in lasts]
    people = tuple(rng.sample(pairs, size.people))

    entities = {
        "country": countries, "city": cities, "person": people, "company": companies,
        "language": languages, "currency": currencies, "profession": PROFESSIONS, "product": PRODUCTS,
    }
    # Capitals are distinct cities; every other target is drawn with replacement.
    capitals = dict(zip(countries, rng.sample(cities, len(countries))))
    facts: list[Fact] = []
    for rel in RELATIONS:
        for subject in entities[rel.subject_kind]:
            if rel.name == "capital":
                target = capitals[subject]
            else:
                target = rng.choice(entities[rel.target_kind])
            prompt = rel.sentence.format(s=subject, t="").rstrip()
            qa_prompt = f"{QA_QUESTION} {rel.question.format(s=subject)} {QA_ANSWER}"
            facts.append(Fact(rel.name, subject, target, prompt, qa_prompt))
    filler = tuple(_filler_sentence(rng) for _ in range(size.filler_sentences))
    return World(entities=entities, facts=tuple(facts), filler=filler)


def calibration_text(world: World, seed: int = 0, n_lines: int = 200, sentences_per_line: int = 4) -> Iterator[str]:
    """Lines of a few sentences each, facts and filler mixed, for calibration passes."""
    rng = random.Random(f"moelens-zoo-calibration-{seed}")
    pool = world.base_sentences()
    for _ in range(n_lines):
        yield " ".join(rng.choice(pool) for _ in range(sentences_per_line))
