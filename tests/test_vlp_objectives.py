"""V&L pretraining sampling rules: ITM never pairs a sentence with its own image, QA targets are
drawn in proportion to the in-table scores (exact on fixed draws), whole-word MLM picks words as
units."""

from __future__ import annotations

import random

import pytest
import torch

from cliptransfer.config import ConfigError
from cliptransfer.contrastive.losses.declip import mask_tokens
from cliptransfer.vlp.data import VLPDataConfig
from cliptransfer.vlp.objectives import (
    IGNORE,
    itm_sentence,
    other_image_index,
    parse_word_groups,
    sample_answer,
    swap_word,
)


class FixedDraws(random.Random):
    """A Random whose random() returns the given values in turn."""

    def __init__(self, values):
        super().__init__(0)
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def test_itm_never_pairs_a_sentence_of_the_same_image():
    image_of = ["a", "a", "a", "b", "c", "c"]  # 3 sentences of image a
    rng = random.Random(0)
    draws = [other_image_index(image_of, 0, rng) for _ in range(3000)]
    assert all(image_of[j] != "a" for j in draws)
    counts = [draws.count(j) for j in (3, 4, 5)]  # uniform over the three other sentences
    assert all(abs(c / 3000 - 1 / 3) < 0.03 for c in counts), counts
    with pytest.raises(ValueError, match="at least two images; all are of 'a'"):
        other_image_index(["a", "a"], 1, rng)
    # Mismatch with probability 0.5 (binomial sd 0.007 at 5000 draws); matched -> itself.
    pairs = [itm_sentence(image_of, 4, rng) for _ in range(5000)]
    assert abs(sum(not m for _, m in pairs) / 5000 - 0.5) < 0.03
    assert all((j == 4) == m and (m or image_of[j] != "c") for j, m in pairs)
    assert itm_sentence(image_of, 2, FixedDraws([0.5])) == (2, True)  # u >= 0.5: its own


def test_qa_target_drawn_in_proportion_to_known_scores():
    ans2label = {"red": 0, "pink": 1, "blue": 2}
    label = {"red": 1.0, "pink": 0.3, "maroon": 0.9}  # maroon is not in the table: total 1.3
    # r = u * 1.3: below 1.0 -> red (listed first), else pink.
    assert sample_answer(label, ans2label, FixedDraws([0.76])) == 0  # r = 0.988
    assert sample_answer(label, ans2label, FixedDraws([0.77])) == 1  # r = 1.001
    rng = random.Random(0)
    draws = [sample_answer(label, ans2label, rng) for _ in range(20000)]
    assert abs(draws.count(1) / 20000 - 0.3 / 1.3) < 0.01
    assert sample_answer({"maroon": 1.0}, ans2label, rng) == IGNORE
    assert sample_answer({"red": 0.0}, ans2label, rng) == IGNORE
    assert sample_answer(None, ans2label, rng) == IGNORE  # a caption has no label


def test_whole_word_masking_picks_words_as_units():
    special, mask_id, vocab = [0, 1, 2], 3, 50
    # [SOT] w1 w1' w2 w3 w3' w3'' [EOT] pad
    ids = torch.tensor([1, 10, 11, 12, 13, 14, 15, 2, 0]).repeat(400, 1)
    start = torch.tensor([1, 1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool).repeat(400, 1)
    out, labels = mask_tokens(ids, mask_id, vocab, special, 0.5,
                              torch.Generator().manual_seed(0), word_start=start)  # fmt: skip
    picked = labels != IGNORE
    assert not picked[:, [0, 7, 8]].any()  # specials never
    assert torch.equal(picked[:, 1], picked[:, 2])  # word 1 as a unit
    assert torch.equal(picked[:, 4], picked[:, 5]) and torch.equal(picked[:, 4], picked[:, 6])
    assert abs(picked[:, [1, 3, 4]].float().mean().item() - 0.5) < 0.05  # per word, p = 0.5
    assert torch.equal(labels[picked], ids[picked])
    with pytest.raises(ValueError, match="word_start must be a bool tensor shaped like ids"):
        mask_tokens(ids, mask_id, vocab, special, 0.5, word_start=start[:, :3])


def test_word_swap_changes_exactly_one_group_word():
    groups = parse_word_groups("red, blue ,green;circle,square;")
    assert groups == (("red", "blue", "green"), ("circle", "square"))
    text = "a Red circle left of a blue square."
    seen = set()
    rng = random.Random(0)
    for _ in range(300):
        out = swap_word(text, groups, rng)
        before, after = text.split(" "), out.split(" ")
        diff = [k for k in range(len(before)) if before[k] != after[k]]
        assert len(diff) == 1  # one word, the rest untouched
        k = diff[0]
        old, new = before[k].rstrip(".").lower(), after[k].rstrip(".")
        group = next(g for g in groups if old in g)
        assert new in group and new != old
        assert after[k].endswith(".") == before[k].endswith(".")  # punctuation kept
        seen.add((k, new))
    # every position (1, 2, 6, 7) and every alternative word of its group is drawn
    assert seen == {(1, "blue"), (1, "green"), (2, "square"), (6, "red"), (6, "green"),
                    (7, "circle")}  # fmt: skip
    assert swap_word("two stars", groups, rng) is None


def test_word_swap_config_is_checked():
    with pytest.raises(ConfigError, match="swap_prob: needs swap_words"):
        VLPDataConfig(swap_prob=0.5)
    with pytest.raises(ConfigError, match="swap_words: each ';'-separated group needs two"):
        VLPDataConfig(swap_words="red,blue;circle", swap_prob=0.5)
    with pytest.raises(ValueError, match="at least two words"):
        parse_word_groups("red")
