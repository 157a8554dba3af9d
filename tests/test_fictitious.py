"""The fictitious-authors corpus: determinism, TOFU file layout, splits, held-out paraphrases."""

from __future__ import annotations

import json

import pytest

from negpref.data import load_lines, load_records
from negpref.data.fictitious import (
    FACT_KEYS,
    FORGET_PERCENTS,
    N_GENERAL_PERTURBED,
    N_PERTURBED,
    CorpusConfig,
    corpus_texts,
    forget_author_count,
    general_training_records,
    generate_corpus,
    retain_eval_author_count,
    split_name,
    write_corpus,
)
from negpref.errors import NegprefError

SMALL = CorpusConfig(n_authors=20, train_phrasings=3, n_general=8, seed=5)


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(SMALL)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, corpus):
    return write_corpus(corpus, tmp_path_factory.mktemp("corpus"))


def test_same_seed_same_corpus_other_seed_other_corpus(corpus):
    again = generate_corpus(CorpusConfig(n_authors=20, train_phrasings=3, n_general=8, seed=5))
    assert again.files == corpus.files
    assert again.authors == corpus.authors
    other = generate_corpus(CorpusConfig(n_authors=20, train_phrasings=3, n_general=8, seed=6))
    assert other.files["full"] != corpus.files["full"]
    assert [a["name"] for a in other.authors] != [a["name"] for a in corpus.authors]


def test_written_files_have_tofu_names_and_load(corpus, corpus_dir):
    names = {p.name for p in corpus_dir.iterdir()}
    expected = {"full.json", "retain_perturbed.json", "idontknow.jsonl", "authors.json"}
    expected |= {"real_authors.json", "real_authors_perturbed.json"}
    expected |= {"world_facts.json", "world_facts_perturbed.json"}
    for percent in FORGET_PERCENTS:
        expected |= {
            f"forget{percent:02d}.json",
            f"retain{100 - percent:02d}.json",
            f"forget{percent:02d}_perturbed.json",
        }
    assert names == expected
    assert load_records(corpus_dir / "full.json", ("question", "answer")) == corpus.files["full"]
    evaluation = ("question", "answer", "paraphrased_answer", "perturbed_answer")
    for name in ("forget10_perturbed", "retain_perturbed"):
        records = load_records(corpus_dir / f"{name}.json", (*evaluation, "paraphrased_question"))
        assert records == corpus.files[name]
    for name in ("real_authors_perturbed", "world_facts_perturbed"):
        records = load_records(
            corpus_dir / f"{name}.json", ("question", "answer", "perturbed_answer")
        )
        assert len(records) == SMALL.n_general
    # TOFU's idontknow.jsonl is plain lines, one refusal each
    assert load_lines(corpus_dir / "idontknow.jsonl") == corpus.idk_answers
    # JSON Lines, like TOFU's own files
    first = (corpus_dir / "forget01.json").read_text().splitlines()[0]
    assert json.loads(first) == corpus.files["forget01"][0]


def test_the_tofu_loader_reads_every_split(corpus, corpus_dir):
    from negpref.eval import load_tofu_sets

    for percent in FORGET_PERCENTS:
        sets = load_tofu_sets(corpus_dir, split_name("forget", percent))
        n_forget = forget_author_count(SMALL.n_authors, percent)
        assert len(sets.forget) == n_forget * len(FACT_KEYS)
        assert len(sets.retain) == retain_eval_author_count(SMALL.n_authors) * len(FACT_KEYS)
        assert len(sets.real_authors) == len(sets.world_facts) == SMALL.n_general


@pytest.mark.parametrize(
    ("n_authors", "percent", "count"),
    [(40, 1, 1), (40, 5, 2), (40, 10, 4), (40, 90, 36), (30, 5, 2), (50, 5, 3), (15, 90, 13)],
)
def test_forget_author_counts(n_authors, percent, count):
    # nearest whole number, halves up (30 x 5% = 1.5 -> 2); 15 x 90% = 13.5 would reach the
    # two retain-evaluation authors, so it stops at 13
    assert forget_author_count(n_authors, percent) == count


def test_forget_splits_are_the_last_authors_and_retain_their_complement(corpus):
    per_author = len(FACT_KEYS) * SMALL.train_phrasings
    full = corpus.files["full"]
    assert len(full) == SMALL.n_authors * per_author
    n_eval = retain_eval_author_count(SMALL.n_authors)
    protected = {a["name"] for a in corpus.authors[:n_eval]}
    for percent in FORGET_PERCENTS:
        k = forget_author_count(SMALL.n_authors, percent)
        forget = corpus.files[split_name("forget", percent)]
        retain = corpus.files[split_name("retain", 100 - percent)]
        assert len(forget) == k * per_author
        assert retain + forget == full
        forget_names = {a["name"] for a in corpus.authors[-k:]}
        assert all(any(n in r["question"] for n in forget_names) for r in forget)
        assert not any(n in r["question"] for r in forget for n in protected)
    # the retain evaluation set asks about the protected first authors only
    assert all(any(n in r["question"] for n in protected) for r in corpus.files["retain_perturbed"])


def test_perturbed_answers_are_wrong_and_paraphrases_held_out(corpus):
    train_answers = {r["answer"] for r in corpus.files["full"]}
    train_questions = {r["question"] for r in corpus.files["full"]}
    items = corpus.files["forget90_perturbed"] + corpus.files["retain_perturbed"]
    assert len(items) == SMALL.n_authors * len(FACT_KEYS)
    for item in items:
        assert item["answer"] in train_answers and item["question"] in train_questions
        assert item["paraphrased_answer"] not in train_answers
        assert item["paraphrased_question"] not in train_questions
        perturbed = item["perturbed_answer"]
        assert len(perturbed) == N_PERTURBED == len(set(perturbed))
        assert item["paraphrased_answer"] not in perturbed
        assert not set(perturbed) & train_answers
    # wrong values are the true one swapped: same template, value differs
    author = corpus.authors[0]
    year_item = next(
        r for r in corpus.files["retain_perturbed"] if author["birth_year"] in r["answer"]
    )
    assert author["birth_year"] in year_item["paraphrased_answer"]
    assert all(author["birth_year"] not in p for p in year_item["perturbed_answer"])


def test_every_fact_is_trained_in_several_phrasings(corpus):
    author = corpus.authors[3]
    about = [r for r in corpus.files["full"] if author["name"] in r["question"]]
    assert len(about) == len(FACT_KEYS) * SMALL.train_phrasings
    mentions = [r for r in about if author["genre"] in r["answer"]]
    assert len(mentions) >= SMALL.train_phrasings
    assert len({r["answer"] for r in mentions}) == len(mentions)


def test_general_knowledge_sets(corpus):
    for name in ("world_facts", "real_authors"):
        items = corpus.files[f"{name}_perturbed"]
        assert len(items) == SMALL.n_general
        for item in items:
            assert len(item["perturbed_answer"]) == N_GENERAL_PERTURBED
            assert item["answer"] not in item["perturbed_answer"]
    assert len(general_training_records(corpus)) == 2 * SMALL.n_general
    # the tokenizer sees every string that is trained or scored
    texts = set(corpus_texts(corpus))
    assert corpus.files["world_facts_perturbed"][0]["perturbed_answer"][0] in texts
    assert corpus.files["forget10_perturbed"][0]["paraphrased_answer"] in texts
    assert corpus.idk_answers[0] in texts


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (CorpusConfig(n_authors=5), "n_authors"),
        (CorpusConfig(train_phrasings=4), "train_phrasings"),
        (CorpusConfig(n_general=2), "n_general"),
    ],
)
def test_bad_sizes_are_refused(config, field):
    with pytest.raises(NegprefError, match=field):
        generate_corpus(config)
