"""Scan keys and pseudonyms: the properties the corpus relies on."""

from hypothesis import given
from hypothesis import strategies as st

from corpus_builder.privacy import Pseudonymizer
from corpus_builder.records import ScanRecord

ids = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20)
PSEUDO = Pseudonymizer(b"k" * 32)


@given(dataset=st.sampled_from(["UKB", "ABCD", "HCP"]), subject=ids, session=ids, run=ids)
def test_key_has_four_dot_free_fields(dataset, subject, session, run):
    rec = ScanRecord(dataset, PSEUDO(dataset, subject), session, run, "f", "tables")
    assert "." not in rec.key
    assert rec.key.split("-")[0] == dataset and len(rec.key.split("-")) == 4


@given(subject=ids)
def test_pseudonyms_are_stable_keyed_and_hide_the_id(subject):
    a = PSEUDO("UKB", subject)
    assert a == Pseudonymizer(b"k" * 32)("UKB", subject)
    assert a != Pseudonymizer(b"j" * 32)("UKB", subject)
    assert a != PSEUDO("ABCD", subject)
    assert len(a) == 12 and set(a) <= set("0123456789abcdef")  # carries nothing of the id but the hash
