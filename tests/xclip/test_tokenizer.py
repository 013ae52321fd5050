"""xclip.tokenize against ids of the official CLIP tokenizer."""

import pytest
import torch

import xclip

START, END = 49406, 49407


@pytest.mark.parametrize(
    "text, ids",
    [
        # The examples of OpenAI's CLIP README, tokenised by the official simple_tokenizer.
        ("a diagram", [320, 22697]),
        ("a dog", [320, 1929]),
        ("a cat", [320, 2368]),
        ("a photo of a cat", [320, 1125, 539, 320, 2368]),
    ],
)
def test_known_ids(text: str, ids: list[int]) -> None:
    tokens = xclip.tokenize(text)
    assert tokens.shape == (1, 77) and tokens.dtype == torch.int64
    expected = torch.zeros(77, dtype=torch.int64)
    expected[: len(ids) + 2] = torch.tensor([START, *ids, END])
    assert torch.equal(tokens[0], expected)


def test_batch_rows_are_independent_and_zero_padded() -> None:
    tokens = xclip.tokenize(["a dog", "a photo of a cat"])
    assert tokens.shape == (2, 77)
    assert torch.equal(tokens[0], xclip.tokenize("a dog")[0])
    assert tokens[0, 4:].eq(0).all() and tokens[1, 7:].eq(0).all()
    # The model takes the end token by argmax: it must be the largest id in each row.
    assert tokens.argmax(dim=-1).tolist() == [3, 6]


def test_cleaning_as_official() -> None:
    # Lower-casing, whitespace collapsing and (double) HTML unescaping happen before BPE.
    assert torch.equal(xclip.tokenize("A   Dog "), xclip.tokenize("a dog"))
    assert torch.equal(xclip.tokenize("rock &amp;amp; roll"), xclip.tokenize("rock & roll"))


def test_over_long_text_raises_like_official() -> None:
    long = "dog " * 80
    with pytest.raises(ValueError, match="context_length=77"):
        xclip.tokenize(long)
    exact = "dog " * 75  # 75 ids + start + end = 77: fits
    assert xclip.tokenize(exact)[0, -1].item() == END


def test_over_long_text_error_carries_its_fields() -> None:
    """A front end other than Python (the CLI) must be able to phrase the error itself, so
    the error says which text, how long it is and the limit, as attributes."""
    import pickle

    from xclip.tokenizer import TextTooLongError

    labels = ["archery", "dog " * 80, "bowling"]
    with pytest.raises(TextTooLongError) as info:
        xclip.tokenize(labels)
    error = info.value
    assert isinstance(error, ValueError)  # callers catching ValueError keep working
    assert (error.index, error.text, error.num_tokens, error.context_length) == (1, labels[1], 82, 77)
    assert "texts[1]" in str(error) and "truncate=True" in str(error)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is TextTooLongError and str(again) == str(error) and again.num_tokens == 82
    with pytest.raises(TextTooLongError) as info:
        xclip.tokenize(["a b c d e f"], context_length=5)
    assert info.value.num_tokens == 8 and info.value.context_length == 5
    assert str(info.value).endswith("'a b c d e f'")  # short text: shown whole, no "..."


def test_truncate_keeps_end_token() -> None:
    tokens = xclip.tokenize("dog " * 80, truncate=True)
    assert tokens.shape == (1, 77)
    assert tokens[0, 0].item() == START and tokens[0, -1].item() == END
    assert tokens[0, 1:-1].eq(xclip.tokenize("dog")[0, 1]).all()


def test_context_length_argument() -> None:
    assert xclip.tokenize("a dog", context_length=8).shape == (1, 8)
    with pytest.raises(ValueError, match="context_length"):
        xclip.tokenize("a dog", context_length=1)


@pytest.mark.parametrize("bad", [None, 3, [b"bytes"], ["ok", 1]])
def test_bad_texts(bad: object) -> None:
    with pytest.raises(TypeError, match="texts"):
        xclip.tokenize(bad)  # type: ignore[arg-type]


def test_empty_list() -> None:
    with pytest.raises(ValueError, match="texts"):
        xclip.tokenize([])
