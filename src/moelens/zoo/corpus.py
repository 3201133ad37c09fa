"""A deterministic world of invented entities and the texts that teach it.

The world holds countries, cities, people and companies with made-up names (so no pretrained
knowledge could ever explain a recall) and relations between them: four facts about every
country and every person, three about every company. Every fact is one (subject, relation,
target) triple whose target is a single word, rendered two ways:

- as a plain sentence that names the subject first, ``"veloria has its capital in tarnemo ."``
  (the base model's corpus), whose ``prompt`` is the sentence cut right before the target word;
- as a question and answer, ``"question : what is the capital of veloria ? answer : tarnemo ."``
  (the tuned model's corpus), whose ``qa_prompt`` ends right after ``"answer :"``.

Names are strung together from a small stock of syllables and an ending of their kind
(``vel`` + ``or`` + ``ia``), so the zoo's sub-word tokenizer cuts every subject into a few
tokens, and people have two-word names whose first and last names recur: the model has to
compose a subject's tokens before it can look its facts up (the situation that layer-wise
interventions on "the subject tokens" are about). Targets are never subjects. Filler sentences
about nothing in particular give calibration passes some ordinary text.

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
# How many syllables from the world's stock a name of each kind strings together before its
# ending (drawn uniformly). Names are made of a small stock of syllables, as real names reuse
# morphemes (Stock-holm, Micro-soft), so that a sub-word tokenizer cuts a subject into a few
# pieces: one per syllable and one for the ending.
SYLLABLES = {"country": (1, 2, 2), "company": (1, 2, 2), "first": (1,), "last": (1,), "city": (1, 2), "language": (1,), "currency": (1,)}
STOCK_SYLLABLES = 40

PROFESSIONS = (
    "doctor", "painter", "pilot", "farmer", "lawyer", "baker", "teacher", "sailor",
    "engineer", "singer", "writer", "chemist", "carpenter", "nurse", "dancer", "architect",
)
PRODUCTS = (
    "bicycles", "lamps", "shoes", "cheese", "engines", "umbrellas", "clocks", "tractors",
    "violins", "candles", "rockets", "carpets", "cameras", "bridges", "boats", "phones",
    "hats", "paint", "glass", "toys",
)
WORKPLACES = (
    "bank", "museum", "hospital", "library", "harbour", "theatre", "factory", "school",
    "airport", "prison", "hotel", "station", "bakery", "stadium", "laboratory", "mine",
)
INSTRUMENTS = (
    "piano", "flute", "drums", "harp", "trumpet", "cello", "guitar", "organ",
    "clarinet", "banjo", "oboe", "tuba",
)


@dataclass(frozen=True)
class Relation:
    """One relation: which kind of subject and target it links and how it is worded.

    ``sentence`` and ``question`` are templates with ``{s}`` (subject) and, for the sentence,
    ``{t}`` (target) as its last word. Every sentence names its subject first and the relation
    after it, so that reading a subject cannot wait for the relation: whatever the model recalls
    about a subject it gathers at the subject's own tokens, and the last token then picks what
    the relation asks for (the order of the prompts that causal tracing was first measured on)."""

    name: str
    subject_kind: str
    target_kind: str
    sentence: str
    question: str


RELATIONS = (
    Relation("capital", "country", "city", "{s} has its capital in {t}", "what is the capital of {s} ?"),
    Relation("language", "country", "language", "{s} speaks {t}", "what language does {s} speak ?"),
    Relation("currency", "country", "currency", "{s} pays with the {t}", "what is the currency of {s} ?"),
    Relation("export", "country", "product", "{s} exports {t}", "what does {s} export ?"),
    Relation("birthplace", "person", "city", "{s} was born in {t}", "where was {s} born ?"),
    Relation("workplace", "person", "workplace", "{s} works at the {t}", "where does {s} work ?"),
    Relation("profession", "person", "profession", "{s} works as a {t}", "what is the job of {s} ?"),
    Relation("instrument", "person", "instrument", "{s} plays the {t}", "what does {s} play ?"),
    Relation("product", "company", "product", "{s} makes {t}", "what does {s} make ?"),
    Relation("headquarters", "company", "city", "{s} is based in {t}", "where is {s} based ?"),
    Relation("founding", "company", "city", "{s} was founded in {t}", "where was {s} founded ?"),
)
#: Kinds of entity that facts are about; a target is never one of them (it must be one token).
SUBJECT_KINDS = ("country", "person", "company")

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

    def biographies(self, seed: int = 0) -> list[str]:
        """One sentence per subject that names it once and then states all its facts, in an
        order drawn from ``seed``: ``"vivy hason was born in tarnemo , plays the harp , ... ."``.
        What follows the subject needs every one of its facts, so a model does best to gather
        them at the subject's own tokens rather than look each up where it is asked for."""
        rng = random.Random(f"moelens-zoo-biographies-{seed}")
        by_subject: dict[str, list[Fact]] = {}
        for f in self.facts:
            by_subject.setdefault(f.subject, []).append(f)
        out = []
        for subject, facts in by_subject.items():
            parts = [f.sentence[len(subject) + 1:-2] for f in facts]  # "was born in tarnemo"
            rng.shuffle(parts)
            out.append(f"{subject} {' , '.join(parts)} .")
        return out

    def qa_sentences(self) -> list[str]:
        """The tuned model's corpus: every fact once as a question and answer."""
        return [f.qa_sentence for f in self.facts]

    def subjects(self) -> list[str]:
        """Every subject of a fact, once, in fact order."""
        return list(dict.fromkeys(f.subject for f in self.facts))

    def whole_words(self, biographies: bool = False) -> list[str]:
        """Every word of the texts that is not part of a subject's name, sorted: the template
        words, the filler's and every target (the words a sub-word tokenizer keeps whole);
        ``biographies``: of the biographies too (their "," joins the facts)."""
        names = {w for subject in self.subjects() for w in subject.split()}
        return [w for w in self.words(biographies) if w not in names]

    def texts(self, biographies: bool = False) -> list[str]:
        """Every text a zoo trains on: the plain sentences, the questions and, if asked, the
        biographies (what the tokenizer learns from)."""
        return self.base_sentences() + self.qa_sentences() + (self.biographies() if biographies else [])

    def words(self, biographies: bool = False) -> list[str]:
        """Every word of every text the world can render, sorted (the tokenizer's vocabulary)."""
        vocab: set[str] = set()
        for text in self.texts(biographies):
            vocab.update(text.split())
        return sorted(vocab)


def _template_words() -> set[str]:
    words: set[str] = set(PROFESSIONS) | set(PRODUCTS) | set(WORKPLACES) | set(INSTRUMENTS)
    words |= set(QA_ANSWER.split()) | set(QA_QUESTION.split())
    for rel in RELATIONS:
        words.update(rel.sentence.replace("{s}", "").replace("{t}", "").split())
        words.update(rel.question.replace("{s}", "").split())
    for parts in FILLER_PARTS.values():
        for p in parts:
            words.update(p.split())
    return words


def _syllable_stock(rng: random.Random, n: int) -> tuple[str, ...]:
    """``n`` distinct syllables, consonant-vowel or consonant-vowel-consonant, in draw order."""
    stock: dict[str, None] = {}
    while len(stock) < n:
        syllable = rng.choice(CONSONANTS) + rng.choice(VOWELS) + (rng.choice(CONSONANTS) if rng.random() < 0.5 else "")
        stock.setdefault(syllable, None)
    return tuple(stock)


def _invent_names(rng: random.Random, kind: str, n: int, taken: set[str], stock: tuple[str, ...]) -> tuple[str, ...]:
    """``n`` new pronounceable words, syllables of ``stock`` and one of the kind's endings, none
    already taken."""
    names: list[str] = []
    while len(names) < n:
        stem = "".join(rng.choice(stock) for _ in range(rng.choice(SYLLABLES[kind])))
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
    stock = _syllable_stock(rng, STOCK_SYLLABLES)
    countries = _invent_names(rng, "country", size.countries, taken, stock)
    cities = _invent_names(rng, "city", size.cities, taken, stock)
    companies = _invent_names(rng, "company", size.companies, taken, stock)
    languages = _invent_names(rng, "language", size.languages, taken, stock)
    currencies = _invent_names(rng, "currency", size.currencies, taken, stock)
    # A person is "first last"; about sqrt(2n) of each so that first and last names recur and
    # only the pair identifies the person.
    n_parts = max(4, int((2 * size.people) ** 0.5) + 1)
    firsts = _invent_names(rng, "first", n_parts, taken, stock)
    lasts = _invent_names(rng, "last", n_parts, taken, stock)
    pairs = [f"{a} {b}" for a in firsts for b in lasts]
    people = tuple(rng.sample(pairs, size.people))

    entities = {
        "country": countries, "city": cities, "person": people, "company": companies,
        "language": languages, "currency": currencies, "profession": PROFESSIONS, "product": PRODUCTS,
        "workplace": WORKPLACES, "instrument": INSTRUMENTS,
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
