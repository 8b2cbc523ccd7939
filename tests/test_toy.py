"""The bundled tasks: handwritten-digit arithmetic (primary) and easy-VQA panel counting (secondary)."""

import re
import warnings

import numpy as np
import pytest

from vedas_hf.toy import (
    COLORS,
    SHAPES,
    make_digit_arithmetic,
    make_shape_panels,
    make_task,
    reading_records,
    toy_sft_config,
)


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
        assert record["image"].size == (3 * 16, 2 * 16)  # (width, height): 3 columns, 2 rows of 16x16 tiles


def test_sum_operation_adds_one_number_per_step():
    train, _ = make_digit_arithmetic(30, 0, seed=0, operation="sum")
    for record in train:
        a, b, c = record["label_digits"]
        assert record["steps"][3:] == [f"{a} + {b} = {a + b}.", f"{a + b} + {c} = {a + b + c}, mod 10 is "
                                                               f"{(a + b + c) % 10}."]
        assert record["answer"] == str((a + b + c) % 10)
    two, _ = make_digit_arithmetic(5, 0, seed=0, num_digits=2)  # two digits: one step, either operation
    assert all(r["steps"][2] == f"{r['label_digits'][0]} + {r['label_digits'][1]} = {sum(r['label_digits'])}, "
               f"mod 10 is {sum(r['label_digits']) % 10}." for r in two)
    with pytest.raises(ValueError, match="operation='product'"):
        make_digit_arithmetic(1, 0, operation="product")


def test_each_digit_is_its_scan_in_one_tile_of_its_column():
    from sklearn.datasets import load_digits

    scans = load_digits().images
    train, _ = make_digit_arithmetic(20, 0, seed=2, num_digits=4, rows=3, digit_size=8)
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


# ---- easy-VQA panels -------------------------------------------------------------------------------------------


def _foreground_colour(image) -> np.ndarray:
    """Mean RGB of the pixels that differ from the image's corner (the pale background) by more than 60."""
    pixels = np.asarray(image).astype(float)
    mask = np.abs(pixels - pixels[0, 0]).max(-1) > 60
    return pixels[mask].mean(0)


def test_easy_vqa_labels_recovered_from_questions_agree_with_the_pixels():
    # Group the full-size renders by the colour recovered from their questions: every render must lie nearer its own
    # group's mean colour than any other group's (a wrong label would sit in the wrong group).
    import easy_vqa
    from PIL import Image

    from vedas_hf.toy import _easy_vqa_labels

    labels = _easy_vqa_labels("test")
    assert len(labels) > 800  # of 1000 renders; the rest are skipped as ambiguous
    assert {shape for shape, _ in labels.values()} == set(SHAPES)
    paths = easy_vqa.get_test_image_paths()
    colours = {i: _foreground_colour(Image.open(paths[i]).convert("RGB")) for i in sorted(labels)[:400]}
    centroids = {c: np.mean([colours[i] for i in colours if labels[i][1] == c], 0) for c in COLORS}
    for i, colour in colours.items():
        nearest = min(COLORS, key=lambda c: np.linalg.norm(colour - centroids[c]))
        assert nearest == labels[i][1], (i, labels[i], colour)


def test_shape_panels_are_deterministic_and_follow_the_labels():
    a_train, a_test = make_shape_panels(40, 20, seed=5)
    b_train, _ = make_shape_panels(40, 0, seed=5)
    c_train, _ = make_shape_panels(40, 0, seed=6)
    assert [r["source_ids"] for r in a_train] == [r["source_ids"] for r in b_train]
    assert all(np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])) for x, y in zip(a_train, b_train))
    assert [r["source_ids"] for r in a_train] != [r["source_ids"] for r in c_train]
    for record in a_train + a_test:
        target = re.fullmatch(r"How many panels show a (\w+)( shape)?\?", record["question"])
        attribute = 1 if target.group(2) else 0
        count = sum(panel[attribute] == target.group(1) for panel in record["panel_labels"])
        assert record["answer"] == str(count)
        assert record["steps"][:3] == [f"Panel {i + 1} shows a {c} {s}." for i, (s, c) in enumerate(record["panel_labels"])]
        assert record["steps"][3].startswith(f"{count} panel")
        assert record["image"].size == (3 * 16, 16)


def test_shape_panels_paste_the_labelled_renders_and_split_by_easy_vqa_split():
    from vedas_hf.toy import _shape_pool

    train, test = make_shape_panels(30, 30, seed=0)
    for records, split in ((train, "train"), (test, "test")):
        images, labels = _shape_pool(split, 16)
        for record in records:
            pixels = np.asarray(record["image"])
            for column, source in enumerate(record["source_ids"]):
                np.testing.assert_array_equal(pixels[:, 16 * column : 16 * column + 16], np.asarray(images[source]))
                assert record["panel_labels"][column] == labels[source]
    train_renders = {np.asarray(im).tobytes() for im in _shape_pool("train", 16)[0]}
    assert not any(np.asarray(im).tobytes() in train_renders for im in _shape_pool("test", 16)[0])


def test_shape_panel_answers_are_uniform_over_counts():
    train, _ = make_shape_panels(800, 0, seed=0)
    counts = np.bincount([int(r["answer"]) for r in train], minlength=4)
    assert counts.min() > 0.2 * len(train) and counts.max() < 0.3 * len(train)


def test_reading_records_name_the_shapes():
    train, _ = make_shape_panels(3, 0, seed=0)
    for record, read in zip(train, reading_records(train)):
        assert read["image"] is record["image"] and read["question"] == "Name the shapes from left to right."
        assert read["answer"] == ", ".join(f"{c} {s}" for s, c in record["panel_labels"])


@pytest.mark.parametrize("kwargs", [{"num_panels": 1}, {"panel_size": 4}, {"panel_size": 128}])
def test_bad_shape_arguments(kwargs):
    with pytest.raises(ValueError, match="must be between"):
        make_shape_panels(1, 1, **kwargs)


def test_make_task_names_the_bundled_tasks():
    train, _ = make_task("digits", 2, 0, seed=0, num_digits=2)
    assert len(train[0]["label_digits"]) == 2
    with pytest.raises(ValueError, match="digits.*shapes"):
        make_task("mnist", 1, 1)


def test_toy_config_turns_checkpointing_off_without_deprecation_warnings(tmp_path):
    """Off by default under the name the installed transformers uses (5.24 renamed it: the old name warns); a
    caller's setting under either name wins."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert toy_sft_config(str(tmp_path)).gradient_checkpointing is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert toy_sft_config(str(tmp_path), gradient_checkpointing=True).gradient_checkpointing is True
