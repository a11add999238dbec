import pytest

from lmforge.tokenizer import EOT, eot_id, load_tokenizer, train_tokenizer

ENGLISH = "To be, or not to be, that is the question:\n  Whether 'tis nobler in the mind to suffer"
SAMPLES = [
    ENGLISH,
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "emoji 🤖🚀 family 👨‍👩‍👧‍👦 flags 🇫🇷 and skin tones 👋🏽",
    "mixed: naïve café — Ελληνικά, русский, العربية, हिन्दी\ttabs\r\nand\x00nul",
    "",
]


@pytest.fixture(scope="module")
def tok():
    # Trained on English only: other scripts must still round-trip through the bytes.
    return train_tokenizer([ENGLISH * 20, "the question of the mind"] * 10, vocab_size=400)


@pytest.mark.parametrize("text", SAMPLES, ids=["english", "chinese", "emoji", "mixed", "empty"])
def test_utf8_round_trips_exactly(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_merges_compress_the_training_language(tok):
    ids = tok.encode(ENGLISH, add_special_tokens=False).ids
    assert len(ids) < len(ENGLISH.encode()) / 2
    assert tok.get_vocab_size() <= 400


def test_eot_is_a_single_special_token(tok, tmp_path):
    assert tok.encode(EOT, add_special_tokens=False).ids == [eot_id(tok)]
    tok.save(str(tmp_path / "tokenizer.json"))
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode(ENGLISH).ids == tok.encode(ENGLISH).ids


def test_bad_tokenizer_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="at least 257"):
        train_tokenizer(["x"], vocab_size=100)
