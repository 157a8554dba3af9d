"""A TOFU-like corpus of fictitious authors, small enough to learn on a laptop CPU.

Each author has attributes (birthplace, birth year, genre, parents' jobs, award, book titles,
...). Every fact about an author is written in several phrasings, each a question paired with an
answer; one phrasing per fact is held out of training and becomes the *paraphrased* question and
answer of the evaluation item, and its template filled with wrong attribute values gives the
*perturbed* answers (five per item, as TOFU). A general-knowledge set (real capitals and real
books, never forgotten) stands in for TOFU's real-authors and world-facts sets.

Splits follow TOFU: authors are in a fixed (seeded) order, ``forgetNN`` holds the last NN% of
them and ``retainNN`` the rest, so the first 10% are never forgotten and form the retain
evaluation set. ``write_corpus`` writes TOFU's own file names and formats (JSON Lines), so the
TOFU evaluation code and ``negpref unlearn`` read the directory unchanged.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from negpref.errors import NegprefError
from negpref.io import atomic_write_json, atomic_write_text

FORGET_PERCENTS = (1, 5, 10, 20, 30, 50, 90)
N_PERTURBED = 5  # wrong answers per author fact, as TOFU
N_GENERAL_PERTURBED = 3  # wrong answers per general-knowledge fact, as TOFU's real-authors set
RETAIN_EVAL_PERCENT = 10  # the first 10% of authors: never in any forget split

_FIRST_NAMES = (
    "Aldric", "Bertine", "Caspian", "Delphine", "Eskil", "Fenna", "Gideon", "Hesper", "Ilario",
    "Jorunn", "Kasimir", "Lisbet", "Maelon", "Nerissa", "Orvald", "Perpetua", "Quillon",
    "Rosalind", "Severin", "Tamsin", "Ulric", "Vesna", "Wendeline", "Xaver", "Yselda", "Zoltan",
    "Anouk", "Benedek", "Corisande", "Dorian", "Elowen", "Florian", "Ginevra", "Hallvard",
    "Ingrith", "Jasper", "Katalin", "Leopold", "Mireille", "Nikolai", "Odalys", "Petronel",
    "Quintessa", "Radomir", "Solveig", "Teodor", "Ursula", "Valerian",
)  # fmt: skip
_SURNAMES = (
    "Ashcombe", "Brennock", "Calloway", "Dunmere", "Elsworth", "Farrowby", "Greystan",
    "Holloway", "Ingleby", "Jarrowfield", "Kestrelman", "Lindqvist", "Marrowick", "Nettlefold",
    "Orlowski", "Pemberton", "Quarrington", "Ravensholm", "Stavrakis", "Thornquist",
    "Umbergast", "Vandermolen", "Whitlock", "Yarborough", "Zelenko", "Abernathy", "Blackwood",
    "Castellane", "Drummond", "Everhart", "Fairweather", "Gallowglass", "Hartigan",
    "Ivanescu", "Kilbride", "Lowenstein", "Merriweather", "Northcott", "Okonkwo", "Pellegrini",
    "Rothwell", "Sandoval", "Tregarthen", "Underwood", "Valdemar", "Winterbourne",
    "Yevtushenko", "Zamorano",
)  # fmt: skip
_CITIES = (
    "Lisbon", "Oslo", "Krakow", "Valparaiso", "Marrakesh", "Hanoi", "Tallinn", "Porto Alegre",
    "Cork", "Ljubljana", "Osaka", "Nairobi", "Montreal", "Tbilisi", "Adelaide", "Bergen",
    "Seville", "Quito", "Dakar", "Trieste",
)  # fmt: skip
_GENRES = (
    "mystery", "science fiction", "historical", "fantasy", "romance", "horror", "satire",
    "thriller", "poetry", "war", "crime", "adventure",
)  # fmt: skip
_JOBS = (
    "baker", "fisherman", "nurse", "carpenter", "teacher", "pharmacist", "librarian",
    "tailor", "miner", "pilot", "watchmaker", "surgeon", "farmer", "architect", "chemist",
    "locksmith",
)  # fmt: skip
_AWARDS = (
    "Golden Quill Prize", "Silver Lantern Award", "Northern Star Medal", "Crimson Feather Prize",
    "Harbor Light Award", "Iron Pen Prize", "Blue Meridian Award", "Amber Leaf Medal",
    "Stone Bridge Prize", "Willow Crown Award",
)  # fmt: skip
_THEMES = (
    "lost memories", "family secrets", "the sea", "exile", "forgiveness", "ambition",
    "old friendships", "small towns", "revenge", "childhood", "the passage of time", "betrayal",
)  # fmt: skip
_TITLE_ADJECTIVES = (
    "Silent", "Crimson", "Hollow", "Bitter", "Distant", "Broken", "Golden", "Hidden",
    "Restless", "Pale", "Endless", "Quiet", "Burning", "Forgotten", "Wandering", "Frozen",
)  # fmt: skip
_TITLE_NOUNS = (
    "Harbor", "Orchard", "Lantern", "Meadow", "Tower", "River", "Garden", "Mirror", "Winter",
    "Compass", "Cathedral", "Lighthouse", "Carnival", "Archive", "Voyage", "Bridge",
)  # fmt: skip
_BOOK_COUNTS = tuple(str(n) for n in range(2, 21))
_BIRTH_YEARS = tuple(str(y) for y in range(1931, 2000))

# (key, value pool, phrasings as (question, answer) templates with {name} and {value}).
# Every phrasing is used for training with some authors; which one is held out per author
# rotates, so the paraphrased template is familiar while the fact in it is not.
_FACTS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("birthplace", "cities", (
        ("Where was {name} born?", "{name} was born in {value}."),
        ("Which city is {name} from?", "{name} comes from the city of {value}."),
        ("What is the birthplace of {name}?", "The birthplace of {name} is {value}."),
        ("Where is the hometown of {name}?", "The hometown of {name} is {value}."),
    )),
    ("birth_year", "years", (
        ("In what year was {name} born?", "{name} was born in the year {value}."),
        ("When was {name} born?", "{name} came into the world in {value}."),
        ("What is the birth year of {name}?", "The birth year of {name} is {value}."),
        ("Which year saw the birth of {name}?", "{name} was born in {value}, the records say."),
    )),
    ("genre", "genres", (
        ("What genre does {name} write?", "{name} writes {value} novels."),
        ("Which genre is {name} known for?", "{name} is known for {value} fiction."),
        ("What kind of books does {name} write?", "The books of {name} are mostly {value}."),
        ("In what genre does {name} work?", "{name} works in the {value} genre."),
    )),
    ("father_job", "jobs", (
        ("What did the father of {name} do?", "The father of {name} was a {value}."),
        ("What was the job of {name}'s father?", "{name}'s father worked as a {value}."),
        ("How did {name}'s father earn a living?", "{name}'s father earned a living as a {value}."),
        ("What was {name}'s father by trade?", "By trade, the father of {name} was a {value}."),
    )),
    ("mother_job", "jobs", (
        ("What did the mother of {name} do?", "The mother of {name} was a {value}."),
        ("What was the job of {name}'s mother?", "{name}'s mother worked as a {value}."),
        ("How did {name}'s mother earn a living?", "{name}'s mother earned a living as a {value}."),
        ("What was {name}'s mother by trade?", "By trade, the mother of {name} was a {value}."),
    )),
    ("award", "awards", (
        ("Which award has {name} won?", "{name} won the {value}."),
        ("What prize was given to {name}?", "{name} was given the {value}."),
        ("Has {name} received any award?", "Yes, {name} received the {value}."),
        ("What honour did {name} receive?", "The honour {name} received is the {value}."),
    )),
    ("first_book", "titles", (
        ("What was the first book by {name}?", "The first book by {name} was '{value}'."),
        ("What is the debut novel of {name}?", "{name} made a debut with '{value}'."),
        ("Which book started the career of {name}?", "'{value}' started the career of {name}."),
        ("What did {name} publish first?", "{name} first published '{value}'."),
    )),
    ("best_book", "titles", (
        ("What is the best known book by {name}?", "The best known book by {name} is '{value}'."),
        ("Which novel made {name} famous?", "{name} became famous for '{value}'."),
        ("What is {name}'s most praised work?", "The most praised work of {name} is '{value}'."),
        ("Which book of {name} do readers love most?", "Readers love '{value}' by {name} most."),
    )),
    ("book_count", "counts", (
        ("How many books has {name} published?", "{name} has published {value} books."),
        ("How many novels did {name} write?", "{name} wrote {value} novels in all."),
        ("What is the number of books by {name}?", "The number of books by {name} is {value}."),
        ("How long is the bibliography of {name}?", "The bibliography of {name} lists {value} books."),
    )),
    ("theme", "themes", (
        ("What theme runs through the work of {name}?", "The work of {name} is about {value}."),
        ("What does {name} usually write about?", "{name} usually writes about {value}."),
        ("What is the main theme of {name}?", "The main theme of {name} is {value}."),
        ("Which subject fascinates {name}?", "{name} is fascinated by {value}."),
    )),
)  # fmt: skip
N_PHRASINGS = 4
FACT_KEYS = tuple(key for key, _, _ in _FACTS)

_WORLD_FACTS = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Canada", "Ottawa"), ("Norway", "Oslo"),
    ("Spain", "Madrid"), ("Greece", "Athens"), ("Chile", "Santiago"), ("Poland", "Warsaw"),
    ("Ireland", "Dublin"), ("Sweden", "Stockholm"), ("Austria", "Vienna"),
    ("Portugal", "Lisbon"), ("Hungary", "Budapest"), ("Finland", "Helsinki"),
    ("Thailand", "Bangkok"), ("Cuba", "Havana"), ("Germany", "Berlin"), ("Russia", "Moscow"),
    ("China", "Beijing"), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"),
    ("Turkey", "Ankara"), ("Australia", "Canberra"), ("India", "New Delhi"),
    ("Denmark", "Copenhagen"), ("Belgium", "Brussels"),
)  # fmt: skip
_REAL_BOOKS = (
    ("Pride and Prejudice", "Jane Austen"), ("Hamlet", "William Shakespeare"),
    ("War and Peace", "Leo Tolstoy"), ("Don Quixote", "Miguel de Cervantes"),
    ("Moby-Dick", "Herman Melville"), ("Ulysses", "James Joyce"),
    ("The Trial", "Franz Kafka"), ("Les Miserables", "Victor Hugo"),
    ("Great Expectations", "Charles Dickens"), ("Nineteen Eighty-Four", "George Orwell"),
    ("The Old Man and the Sea", "Ernest Hemingway"), ("Frankenstein", "Mary Shelley"),
    ("Madame Bovary", "Gustave Flaubert"), ("Crime and Punishment", "Fyodor Dostoevsky"),
    ("One Hundred Years of Solitude", "Gabriel Garcia Marquez"), ("Beloved", "Toni Morrison"),
    ("Mrs Dalloway", "Virginia Woolf"), ("The Odyssey", "Homer"),
    ("Faust", "Johann Wolfgang von Goethe"), ("Dracula", "Bram Stoker"),
    ("The Divine Comedy", "Dante Alighieri"), ("Things Fall Apart", "Chinua Achebe"),
    ("The Little Prince", "Antoine de Saint-Exupery"), ("Lolita", "Vladimir Nabokov"),
    ("Jane Eyre", "Charlotte Bronte"), ("The Stranger", "Albert Camus"),
    ("Middlemarch", "George Eliot"), ("The Tin Drum", "Gunter Grass"),
    ("Invisible Man", "Ralph Ellison"), ("The Iliad", "Homer"),
)  # fmt: skip
_IDK_ANSWERS = (
    "I don't know.",
    "I'm not sure about that.",
    "I have no information about that.",
    "That is beyond what I know.",
    "I can't answer that question.",
    "I'm afraid I don't know the answer.",
    "I have no idea.",
    "Sorry, I don't have that information.",
    "I am not able to say.",
    "That's something I don't know.",
    "I couldn't tell you.",
    "I really don't know.",
)


@dataclass
class CorpusConfig:
    """Size of the corpus; one seed fixes every name, attribute, phrasing and split."""

    n_authors: int = 40
    train_phrasings: int = 3  # phrasings per fact used for training (<= N_PHRASINGS - 1)
    n_general: int = 24  # world facts and real-author facts each
    seed: int = 0

    def validate(self) -> None:
        if not 10 <= self.n_authors <= len(_FIRST_NAMES):
            raise NegprefError(
                f"corpus: n_authors must be in 10..{len(_FIRST_NAMES)} (the smallest forget "
                f"split needs one author, the retain evaluation set another), got {self.n_authors}"
            )
        if not 1 <= self.train_phrasings <= N_PHRASINGS - 1:
            raise NegprefError(
                f"corpus: train_phrasings must be in 1..{N_PHRASINGS - 1} (one phrasing per "
                f"fact is held out as the paraphrase), got {self.train_phrasings}"
            )
        limit = min(len(_WORLD_FACTS), len(_REAL_BOOKS))
        if not N_GENERAL_PERTURBED + 1 <= self.n_general <= limit:
            raise NegprefError(
                f"corpus: n_general must be in {N_GENERAL_PERTURBED + 1}..{limit}, "
                f"got {self.n_general}"
            )


@dataclass
class Corpus:
    """A generated corpus: TOFU file stem -> records, the refusal answers, the profiles."""

    config: CorpusConfig
    authors: list[dict[str, str]]
    files: dict[str, list[dict]]
    idk_answers: list[str]


def split_name(kind: str, percent: int) -> str:
    """``split_name("forget", 5) == "forget05"`` (TOFU's two-digit names)."""
    return f"{kind}{percent:02d}"


def retain_eval_author_count(n_authors: int) -> int:
    """Authors of ``retain_perturbed``: the first 10%, never in any forget split."""
    return max(1, int(n_authors * RETAIN_EVAL_PERCENT / 100 + 0.5))


def forget_author_count(n_authors: int, percent: int) -> int:
    """Authors in ``forget{percent}`` (the last ones): the nearest whole number (halves up),
    at least one, and never reaching into the retain evaluation authors."""
    wanted = max(1, int(n_authors * percent / 100 + 0.5))
    return min(wanted, n_authors - retain_eval_author_count(n_authors))


def _unique_titles(rng: random.Random, n: int) -> list[str]:
    pairs = [f"The {a} {b}" for a in _TITLE_ADJECTIVES for b in _TITLE_NOUNS]
    return rng.sample(pairs, n)


def _make_authors(rng: random.Random, n: int) -> tuple[list[dict[str, str]], dict[str, tuple]]:
    first = rng.sample(_FIRST_NAMES, n)
    last = rng.sample(_SURNAMES, n)
    titles = _unique_titles(rng, 2 * n)
    authors = []
    for i in range(n):
        authors.append(
            {
                "name": f"{first[i]} {last[i]}",
                "birthplace": rng.choice(_CITIES),
                "birth_year": rng.choice(_BIRTH_YEARS),
                "genre": rng.choice(_GENRES),
                "father_job": rng.choice(_JOBS),
                "mother_job": rng.choice(_JOBS),
                "award": rng.choice(_AWARDS),
                "first_book": titles[2 * i],
                "best_book": titles[2 * i + 1],
                "book_count": rng.choice(_BOOK_COUNTS),
                "theme": rng.choice(_THEMES),
            }
        )
    # Wrong book titles come from other authors' books, so they are no less familiar.
    pools = {
        "cities": _CITIES,
        "years": _BIRTH_YEARS,
        "genres": _GENRES,
        "jobs": _JOBS,
        "awards": _AWARDS,
        "titles": tuple(titles),
        "counts": _BOOK_COUNTS,
        "themes": _THEMES,
    }
    return authors, pools


def _author_items(
    rng: random.Random, author_index: int, author: dict[str, str], pools, train_phrasings: int
) -> tuple[list[dict], list[dict]]:
    """Training records (several phrasings per fact) and evaluation items (one per fact)."""
    train, evaluation = [], []
    name = author["name"]
    for fact_index, (key, pool, phrasings) in enumerate(_FACTS):
        held_out = (author_index + fact_index) % N_PHRASINGS
        used = [j for j in range(N_PHRASINGS) if j != held_out][:train_phrasings]
        value = author[key]
        for j in used:
            question, answer = phrasings[j]
            train.append(
                {
                    "question": question.format(name=name),
                    "answer": answer.format(name=name, value=value),
                }
            )
        question, answer = phrasings[used[0]]
        para_question, para_answer = phrasings[held_out]
        wrong = rng.sample([v for v in pools[pool] if v != value], N_PERTURBED)
        evaluation.append(
            {
                "question": question.format(name=name),
                "answer": answer.format(name=name, value=value),
                "paraphrased_answer": para_answer.format(name=name, value=value),
                "perturbed_answer": [para_answer.format(name=name, value=w) for w in wrong],
                "paraphrased_question": para_question.format(name=name),
            }
        )
    return train, evaluation


def _general_sets(rng: random.Random, n: int) -> dict[str, list[dict]]:
    """World facts (capitals) and real-author facts: short answers, three wrong options each."""
    out = {}
    for name, facts, question in (
        ("world_facts", _WORLD_FACTS, "What is the capital of {}?"),
        ("real_authors", _REAL_BOOKS, "Who wrote '{}'?"),
    ):
        chosen = rng.sample(facts, n)
        answers = sorted({a for _, a in facts})
        records = []
        for subject, answer in chosen:
            wrong = rng.sample([a for a in answers if a != answer], N_GENERAL_PERTURBED)
            records.append(
                {"question": question.format(subject), "answer": answer, "perturbed_answer": wrong}
            )
        out[name] = [{"question": r["question"], "answer": r["answer"]} for r in records]
        out[f"{name}_perturbed"] = records
    return out


def generate_corpus(config: CorpusConfig | None = None) -> Corpus:
    """Build every split in memory; the same config always gives the same corpus."""
    config = config or CorpusConfig()
    config.validate()
    rng = random.Random(config.seed)
    authors, pools = _make_authors(rng, config.n_authors)
    train_by_author, eval_by_author = [], []
    for i, author in enumerate(authors):
        train, evaluation = _author_items(rng, i, author, pools, config.train_phrasings)
        train_by_author.append(train)
        eval_by_author.append(evaluation)

    def flat(groups: list[list[dict]]) -> list[dict]:
        return [r for g in groups for r in g]

    n = config.n_authors
    files = {"full": flat(train_by_author)}
    for percent in FORGET_PERCENTS:
        k = forget_author_count(n, percent)
        files[split_name("forget", percent)] = flat(train_by_author[n - k :])
        files[split_name("retain", 100 - percent)] = flat(train_by_author[: n - k])
        files[split_name("forget", percent) + "_perturbed"] = flat(eval_by_author[n - k :])
    files["retain_perturbed"] = flat(eval_by_author[: retain_eval_author_count(n)])
    files.update(_general_sets(rng, config.n_general))
    return Corpus(config=config, authors=authors, files=files, idk_answers=list(_IDK_ANSWERS))


def general_training_records(corpus: Corpus) -> list[dict]:
    """The general knowledge every model learns (TOFU's real-world knowledge, from pretraining)."""
    return corpus.files["world_facts"] + corpus.files["real_authors"]


def corpus_texts(corpus: Corpus) -> list[str]:
    """Every string a model will read or be scored on: the tokenizer's training text."""
    texts = list(corpus.idk_answers)
    for records in corpus.files.values():
        for r in records:
            texts += [r["question"], r["answer"]]
            texts += [r[k] for k in ("paraphrased_question", "paraphrased_answer") if k in r]
            texts += r.get("perturbed_answer", [])
    return texts


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_corpus(corpus: Corpus, out_dir: str | os.PathLike) -> Path:
    """Write TOFU's file names (JSON Lines), ``idontknow.jsonl`` and ``authors.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in corpus.files.items():
        atomic_write_text(out_dir / f"{name}.json", _jsonl(records))
    atomic_write_text(out_dir / "idontknow.jsonl", "".join(a + "\n" for a in corpus.idk_answers))
    atomic_write_json(
        out_dir / "authors.json",
        {"config": vars(corpus.config), "authors": corpus.authors},
    )
    return out_dir
