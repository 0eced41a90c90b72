"""The derived task sets: genre passages and First Folio -> modern spelling pairs."""

import json

import pytest

from conftest import CACHE
from prepare.folio import align_play, folio_speeches, modern_speeches, norm_word
from prepare.genre import LABELS, PASSAGE_LINES, genre_splits
from prepare.shakespeare import TEST_WORKS, VAL_WORKS, WORKS, read_texts


@pytest.fixture(scope="module")
def genre():
    return genre_splits(CACHE)


def test_genre_passages_labels_and_splits(genre):
    splits, stats = genre
    works = {s: {r["work"] for r in records} for s, records in splits.items()}
    assert works["test"] == set(TEST_WORKS) and works["val"] == set(VAL_WORKS)
    assert not works["train"] & (works["val"] | works["test"])
    for records in splits.values():
        for r in records:
            assert r["label"] == WORKS[r["work"]][0] and r["label"] in LABELS
            assert len(r["text"].split("\n")) == PASSAGE_LINES
    assert {label for r in splits["test"] for label in [r["label"]]} == set(LABELS)
    assert stats["class_counts"]["train"]["comedy"] == sum(r["label"] == "comedy" for r in splits["train"])


def test_genre_passages_never_show_the_title(genre):
    splits, _ = genre
    for records in splits.values():
        for r in records:
            assert "DRAMATIS PERSONAE" not in r["text"].upper()
            assert "TRAGEDY OF" not in r["text"].upper() and "by William Shakespeare" not in r["text"]


def test_spelling_normalisation():
    assert norm_word("loue") == norm_word("love") and norm_word("vs") == norm_word("us")
    assert norm_word("iust") == norm_word("just") and norm_word("houre") == norm_word("hour")


def test_speech_parsers():
    modern = "ACT I.\n\nHAMLET.\nTo be, or not to be,\n[Aside.] that is the question.\n\nTHESEUS\nGo.\n"
    assert modern_speeches(modern) == ["To be, or not to be,\nthat is the question.", "Go."]
    folio = "  Ham. To be, or not to be,\nthat is the Question:\nEnter Ophelia.\nnot speech\n\n  Oph. Good my Lord"
    assert folio_speeches(folio) == ["To be, or not to be,\nthat is the Question:", "Good my Lord"]


def test_tempest_alignment_is_one_to_one_and_faithful():
    fol = folio_speeches(read_texts(CACHE, folio=True)["tempest"])
    mod = modern_speeches(read_texts(CACHE)["tempest"])
    pairs = align_play(fol, mod)
    assert len(pairs) > 500
    assert len({i for i, _ in pairs}) == len(pairs) == len({j for _, j in pairs})
    assert all(b[0] > a[0] and b[1] > a[1] for a, b in zip(pairs, pairs[1:]))  # order preserved
    text = {fol[i]: mod[j] for i, j in pairs}
    assert text["Worke you then."] == "Work you, then."
    assert text["Nay, good be patient."] == "Nay, good, be patient."


@pytest.mark.slow
def test_folio_copy_baseline_bleu_is_about_40():
    sacrebleu = pytest.importorskip("sacrebleu")
    from prepare.folio import folio_splits
    splits, stats = folio_splits(CACHE)
    assert 20_000 < sum(stats["pairs"].values()) < 30_000
    assert {r["work"] for r in splits["test"]} == set(TEST_WORKS) - {"pericles"}
    test = splits["test"]
    bleu = sacrebleu.corpus_bleu([r["prompt"] for r in test], [[r["completion"] for r in test]]).score
    assert 35 < bleu < 45
    json.dumps(stats)  # stats are plain JSON
