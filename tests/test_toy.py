"""The bundled handwritten-digit arithmetic task."""

import re

import numpy as np
import pytest

from vedas_hf.toy import make_digit_arithmetic, reading_records


def test_deterministic_for_a_seed_and_different_across_seeds():
    a_train, a_test = make_digit_arithmetic(8, 4, seed=3)
    b_train, b_test = make_digit_arithmetic(8, 4, seed=3)
    c_train, _ = make_digit_arithmetic(8, 4, seed=4)
    assert [r["source_ids"] for r in a_train + a_test] == [r["source_ids"] for r in b_train + b_test]
    assert all(np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])) for x, y in zip(a_train, b_train))
    assert [r["source_ids"] for r in a_train] != [r["source_ids"] for r in c_train]


def test_steps_and_answer_follow_the_labels():
    train, test = make_digit_arithmetic(50, 20, seed=0)
    for record in train + test:
        a, b, c = record["label_digits"]
        assert record["answer"] == str((a + b) * c % 10)
        assert record["steps"][:3] == [f"The first digit is {a}.", f"The second digit is {b}.", f"The third digit is {c}."]
        assert record["steps"][3] == f"{a} + {b} = {a + b}."
        assert re.search(rf"= {(a + b) * c}, mod 10 is {record['answer']}\.$", record["steps"][4])
        assert record["image"].size == (3 * 8, 2 * 8)  # (width, height): 3 columns, 2 rows of 8x8 tiles


def test_each_digit_is_its_scan_in_one_tile_of_its_column():
    from sklearn.datasets import load_digits

    scans = load_digits().images
    train, _ = make_digit_arithmetic(20, 0, seed=2, num_digits=4, rows=3)
    rows_used = set()
    for record in train:
        pixels = np.asarray(record["image"])[:, :, 0].astype(float)
        assert pixels.shape == (3 * 8, 4 * 8)
        for column, source in enumerate(record["source_ids"]):
            tiles = [pixels[8 * r : 8 * r + 8, 8 * column : 8 * column + 8] for r in range(3)]
            filled = [r for r, tile in enumerate(tiles) if tile.any()]
            assert len(filled) <= 1  # the other tiles of the column are blank
            expected = (scans[source] * (255.0 / 16.0)).astype(np.uint8)
            row = filled[0] if filled else 0
            np.testing.assert_array_equal(tiles[row], expected)
            rows_used.add(row)
    assert rows_used == {0, 1, 2}


def test_reading_records_keep_images_and_spell_the_digits():
    train, _ = make_digit_arithmetic(5, 0, seed=0)
    reading = reading_records(train)
    for record, read in zip(train, reading):
        assert read["image"] is record["image"]
        assert read["answer"] == " ".join(map(str, record["label_digits"]))


def test_train_and_test_use_disjoint_source_scans():
    train, test = make_digit_arithmetic(300, 100, seed=1)
    train_sources = {s for r in train for s in r["source_ids"]}
    test_sources = {s for r in test for s in r["source_ids"]}
    assert train_sources and test_sources and not train_sources & test_sources


def test_answers_are_spread_over_digits():
    train, _ = make_digit_arithmetic(400, 0, seed=0)
    counts = np.bincount([int(r["answer"]) for r in train], minlength=10)
    assert counts.max() < 0.35 * len(train)  # no answer is a free lunch


@pytest.mark.parametrize("kwargs", [{"num_digits": 1}, {"digit_size": 4}, {"rows": 0}, {"test_fraction": 1.0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_digit_arithmetic(1, 1, **kwargs)
