"""Records, adapters, curriculum stage construction and the collator."""

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vedas_hf.data import (
    IGNORE_INDEX,
    NormalizedRecords,
    VedasDataCollator,
    answer_text,
    build_stage_example,
    dataset_adapter,
    from_m3cot,
    from_scienceqa,
    load_records,
    normalize_record,
    split_rationale,
    stage_plan,
)
from vedas_hf.testing import make_tiny_images


@pytest.fixture
def record(images):
    return normalize_record(
        {"image": images[0], "question": "What is 3 + 4?", "steps": ["Read 3.", "Read 4.", "3 + 4 = 7."],
         "answer": "7"}, 0)


def ids(processor, text):
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def token(processor, name):
    return processor.tokenizer.convert_tokens_to_ids(name)


# ---- records ---------------------------------------------------------------------------------------------------


def test_split_rationale_keeps_short_and_merges_long():
    assert split_rationale("a\n\nb\n\n\nc", 4) == ["a", "b", "c"]
    # Windows line ends and blank lines holding spaces or tabs are blank lines too
    assert split_rationale("a\r\n\r\nb\r\n \r\nc", 4) == split_rationale("a\n \nb\n\t\nc", 4) == ["a", "b", "c"]
    pieces = [f"step {i} " + "x" * 10 for i in range(9)]
    steps = split_rationale("\n\n".join(pieces), 4)
    assert len(steps) == 4
    assert "\n".join(steps).split("\n") == pieces  # nothing lost, order kept
    assert max(len(s) for s in steps) <= 3 * min(len(s) for s in steps)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"question": "", "steps": ["a"], "answer": "1"}, "Record 3: field 'question'"),
        ({"question": "q", "steps": ["a"]}, "Record 3: field 'answer'"),
        ({"question": "q", "rationale": "  ", "answer": "1"}, "Record 3: needs 'steps'"),
        ({"question": "q", "steps": [], "answer": "1"}, "Record 3: field 'steps'"),
        ({"question": "q", "steps": ["a"], "answer": "1", "image": "/no/such.png"}, "/no/such.png"),
        ({"question": "q", "steps": ["a"], "answer": "1", "image": 5}, "Record 3: field 'image'"),
    ],
)
def test_normalize_record_errors_name_index_and_field(bad, message):
    with pytest.raises(ValueError, match=message):
        normalize_record(bad, 3)


@pytest.mark.parametrize("max_steps", [0, -1, 1.5])
def test_max_steps_below_one_is_an_error(max_steps):
    record = {"question": "q", "rationale": "a\n\nb", "answer": "1"}
    with pytest.raises(ValueError, match=rf"max_steps={max_steps!r} must be an integer >= 1"):
        normalize_record(record, 0, max_steps=max_steps)
    with pytest.raises(ValueError, match=rf"max_steps={max_steps!r}"):
        split_rationale("a\n\nb", max_steps)
    assert normalize_record(record, 0, max_steps=1)["steps"] == ["a\nb"]


def test_json_number_answers_are_written_as_a_model_writes_them():
    assert [answer_text(a) for a in (3.0, 7, 2.5, -4.0, "3.0", True)] == ["3", "7", "2.5", "-4", "3.0", True]
    base = {"question": "q", "steps": ["a"]}
    assert [normalize_record({**base, "answer": a}, 0)["answer"] for a in (3.0, 12, 0.5)] == ["3", "12", "0.5"]
    with pytest.raises(ValueError, match="Record 0: field 'answer'"):
        normalize_record({**base, "answer": True}, 0)


def test_reasoning_steps_are_optional_only_when_not_required():
    answer_only = {"question": "q", "answer": "1"}
    with pytest.raises(ValueError, match="Record 2: needs 'steps'"):
        normalize_record(answer_only, 2)  # training needs the reasoning
    assert normalize_record(answer_only, 2, require_steps=False)["steps"] == []
    assert normalize_record({**answer_only, "rationale": ""}, 2, require_steps=False)["steps"] == []
    assert normalize_record({**answer_only, "rationale": "a\n\nb"}, 2, require_steps=False)["steps"] == ["a", "b"]
    with pytest.raises(ValueError, match="Record 2: field 'steps'"):  # present reasoning is still checked
        normalize_record({**answer_only, "steps": [""]}, 2, require_steps=False)


def test_trl_messages_record_error_says_how_to_convert():
    trl_record = {"messages": [{"role": "user", "content": "What is 3 + 4?"}], "images": []}
    with pytest.raises(ValueError, match=r"Record 0: field 'question' .* TRL conversational record .* 'rationale'"):
        normalize_record(trl_record, 0)
    with pytest.raises(ValueError) as plain:
        normalize_record({"steps": ["a"], "answer": "1"}, 0)
    assert "messages" not in str(plain.value)  # the hint only where it applies


def test_adapters_map_choices_to_letters():
    m3 = from_m3cot({"question": "Which?", "choices": ["cat", "dog"], "answer": "B", "rationale": "r", "image": None}, 0)
    assert m3["answer"] == "B" and m3["question"].endswith("Options: (A) cat (B) dog")
    sq = from_scienceqa({"question": "Pick", "choices": ["x", "y", "z"], "answer": 2, "solution": "s"}, 1)
    assert sq["answer"] == "C" and sq["rationale"] == "s"
    with pytest.raises(ValueError, match="Record 4: answer 'D'"):
        from_m3cot({"question": "q", "choices": ["a", "b"], "answer": "D"}, 4)


def test_adapters_keep_context_and_hint_in_the_question():
    m3 = {"question": "Which?", "choices": ["cat", "dog"], "answer": "B", "rationale": "r", "context": " A farm. "}
    assert from_m3cot(m3, 0)["question"] == "Context: A farm.\nWhich?\nOptions: (A) cat (B) dog"
    assert from_m3cot({**m3, "context": ""}, 0)["question"] == "Which?\nOptions: (A) cat (B) dog"
    sq = {"question": "Pick", "choices": ["x", "y"], "answer": 1, "solution": "s", "hint": "Whales breathe air."}
    assert from_scienceqa(sq, 1)["question"] == "Context: Whales breathe air.\nPick\nOptions: (A) x (B) y"
    assert from_scienceqa({**sq, "hint": ""}, 1)["question"] == "Pick\nOptions: (A) x (B) y"
    assert from_scienceqa({**sq, "hint": None}, 1)["question"] == "Pick\nOptions: (A) x (B) y"
    with pytest.raises(ValueError, match="Record 5: field 'hint' must be a string"):
        from_scienceqa({**sq, "hint": 3}, 5)


def test_dataset_adapter_names_the_formats():
    assert dataset_adapter("canonical") is None
    assert dataset_adapter("m3cot") is from_m3cot and dataset_adapter("scienceqa") is from_scienceqa
    with pytest.raises(ValueError, match=r"dataset_format='m3c0t'; use one of canonical, m3cot, scienceqa"):
        dataset_adapter("m3c0t")


def test_load_records_from_jsonl_resolves_relative_images(tmp_path):
    make_tiny_images(1)[0].save(tmp_path / "img.png")
    (tmp_path / "dicts.json").write_text(json.dumps([{"question": "q", "steps": ["s"], "answer": "1",
                                                      "images": [{"bytes": None, "path": "img.png"}]}]))
    (record,) = load_records(tmp_path / "dicts.json")
    assert record["images"] == [{"bytes": None, "path": str(tmp_path / "img.png")}]
    rows = [{"question": "q", "choices": ["a", "b"], "answer": "A", "rationale": "r1\n\nr2", "image": "img.png"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    records = load_records(tmp_path / "data.jsonl", adapter=from_m3cot)
    normalized = normalize_record(records[0], 0)
    assert normalized["steps"] == ["r1", "r2"] and normalized["images"][0].size == (32, 32)


def test_load_records_from_an_image_folder_with_metadata(tmp_path):
    # the `datasets` imagefolder layout: images + metadata.jsonl naming each row's image in `file_name`
    images = make_tiny_images(2)
    rows = []
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "question": f"q{i}", "steps": ["s1", "s2"], "answer": str(i)})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    records = load_records(tmp_path)
    assert [r["image"] for r in records] == [str(tmp_path / "0.png"), str(tmp_path / "1.png")]
    normalized = [normalize_record(r, i) for i, r in enumerate(records)]
    assert [n["answer"] for n in normalized] == ["0", "1"]
    for n, image in zip(normalized, images):
        assert np.array_equal(np.asarray(n["images"][0]), np.asarray(image.convert("RGB")))


def _image_records(tmp_path, count, side=64):
    images = make_tiny_images(count, sizes=((side, side),))
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    rows = [{"image": f"{i}.png", "question": f"q{i}", "steps": ["s1", "s2"], "answer": str(i)} for i in range(count)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return images, load_records(tmp_path / "data.jsonl")


def test_records_that_would_train_or_score_wrongly_are_errors():
    base = {"question": "q", "steps": ["a"], "answer": "1"}
    with pytest.raises(ValueError, match=r"Record 2 has both 'image' and 'images' \(images=\[\]\); keep one field"):
        normalize_record({**base, "image": make_tiny_images(1)[0], "images": []}, 2)
    with pytest.raises(ValueError, match=r"Record 2: field 'answer' is nan \(a missing value in the data\?\)"):
        normalize_record({**base, "answer": float("nan")}, 2)
    with pytest.raises(ValueError, match=r"Record 2: field 'answer' spans several lines .* Write the answer on one"):
        normalize_record({**base, "answer": "line one\nline two"}, 2)
    # an integer index column read as floats (pandas)
    assert from_scienceqa({"question": "q", "choices": ["x", "y"], "answer": 1.0, "solution": "s"}, 0)["answer"] == "B"


def test_images_are_read_as_the_model_should_see_them(tmp_path):
    """Transparency composited onto white (as transformers' processors do), 16-bit greyscale scaled (not clipped),
    EXIF orientation applied (as `datasets` decodes), `datasets` `Image(decode=False)` values accepted."""
    from PIL import Image

    def read(image):
        record = normalize_record({"image": image, "question": "q", "steps": ["a"], "answer": "1"}, 0)
        return np.asarray(record["images"][0])

    drawing = np.zeros((4, 6, 4), np.uint8)
    drawing[1, 2] = (10, 20, 30, 255)  # one opaque pixel on a transparent (black) background
    rgba = read(Image.fromarray(drawing, "RGBA"))
    assert rgba.shape == (4, 6, 3) and rgba[1, 2].tolist() == [10, 20, 30] and (rgba[0] == 255).all()
    palette = Image.fromarray(np.array([[0, 1], [1, 1]], np.uint8), "P")
    palette.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png")
    assert read(str(tmp_path / "p.png")).tolist() == [[[255, 255, 255], [200, 0, 0]], [[200, 0, 0], [200, 0, 0]]]
    Image.fromarray(np.array([[0, 32896, 65535]], np.uint16)).save(tmp_path / "deep.png")
    assert read(str(tmp_path / "deep.png"))[0, :, 0].tolist() == [0, 128, 255]
    tall = Image.fromarray(np.zeros((8, 4, 3), np.uint8))
    exif = tall.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    tall.save(tmp_path / "rotated.jpg", exif=exif)
    assert read(str(tmp_path / "rotated.jpg")).shape == (4, 8, 3)
    raw = (tmp_path / "p.png").read_bytes()
    from_path = read({"bytes": None, "path": str(tmp_path / "p.png")})
    assert read({"bytes": raw, "path": None}).tolist() == from_path.tolist()
    with pytest.raises(ValueError, match=r"Record 0: cannot read image '<image bytes>'"):
        read({"bytes": b"not an image", "path": None})


def test_image_values_that_are_easy_to_get_wrong(tmp_path):
    """Pickled lazily opened images (dataloader workers), a selected GIF frame, unreadable EXIF on an edited JPEG,
    8-bit values in mode "I", and malformed `{"bytes", "path"}` values."""
    import pickle

    from PIL import Image

    def read(image):
        return normalize_record({"image": image, "question": "q", "steps": ["a"], "answer": "1"}, 4)["images"][0]

    Image.new("RGB", (4, 4), (10, 200, 30)).save(tmp_path / "green.png")
    lazy = NormalizedRecords([{"image": Image.open(tmp_path / "green.png"), "question": "q", "steps": ["a"],
                               "answer": "1"}])
    assert pickle.loads(pickle.dumps(lazy))[0]["images"][0].getpixel((0, 0)) == (10, 200, 30)
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "two.gif", save_all=True, append_images=frames[1:])
    gif = Image.open(tmp_path / "two.gif")
    gif.seek(1)
    assert read(gif).getpixel((0, 0)) == (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (8, 4)).save(tmp_path / "bad_exif.jpg", exif=exif.tobytes()[:12])
    assert read(Image.open(tmp_path / "bad_exif.jpg").resize((16, 8))).size == (16, 8)
    assert read(Image.fromarray(np.full((2, 2), 200, np.int32))).getpixel((0, 0)) == (200, 200, 200)
    with pytest.raises(ValueError, match=r"Record 4: an image value .* needs bytes or a path, got bytes of type list"):
        read({"bytes": [1, 2], "path": None})
    with pytest.raises(ValueError, match=r"Record 4: an image value .* got bytes of type NoneType and path None"):
        read({"bytes": None, "path": None})


def test_normalized_records_check_everything_up_front_and_decode_images_on_access(tmp_path, processor):
    import pickle

    images, records = _image_records(tmp_path, 6, side=128)
    lazy = NormalizedRecords(records, max_steps=2, tokenizer=processor.tokenizer)
    assert len(lazy) == 6 and [r["question"] for r in lazy] == [f"q{i}" for i in range(6)]
    assert [r["answer"] for r in lazy[1:6:2]] == ["1", "3", "5"] and lazy[-1]["answer"] == "5"
    for record, image in zip(lazy, images):
        assert np.array_equal(np.asarray(record["images"][0]), np.asarray(image.convert("RGB")))
    assert lazy[0]["images"][0] is not lazy[0]["images"][0]  # decoded per access, not kept
    # images the caller opened lazily are read from their files, not loaded (and kept) in the caller's objects
    from PIL import Image

    opened = [Image.open(tmp_path / f"{i}.png") for i in range(2)]
    NormalizedRecords([{**records[i], "image": image} for i, image in enumerate(opened)])
    assert all(image.fp is not None for image in opened)
    # what a dataloader worker is sent: the paths, not 6 x 128 x 128 x 3 bytes of pixels
    assert len(pickle.dumps(lazy)) < 4_000 < 6 * 128 * 128 * 3
    with pytest.raises(IndexError, match="record index 6 out of range for 6 records"):
        lazy[6]
    with pytest.raises(IndexError, match="record index -7 out of range for 6 records"):
        lazy[-7]
    import pandas

    with pytest.raises(ValueError, match=r"pandas DataFrame; pass its records: df.to_dict\('records'\)"):
        NormalizedRecords(pandas.DataFrame(records))
    # every record is checked when it is built: fields, images, special token strings
    (tmp_path / "3.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="Record 3: cannot read image"):
        NormalizedRecords(records)
    with pytest.raises(ValueError, match=r"Record 1: field 'question' contains the special token string '<\|latent\|>'"):
        NormalizedRecords([records[0], {**records[0], "question": "a <|latent|> b"}], tokenizer=processor.tokenizer)
    with pytest.raises(ValueError, match=r"got a dict with keys \['train'\] \(a dict of splits\?\)"):
        NormalizedRecords({"train": records})


@pytest.mark.parametrize("name", ["data.ndjson", "DATA.JSONL", "data.Jsonl"])
def test_load_records_reads_json_lines_under_any_extension_case(tmp_path, name):
    rows = [{"question": f"q{i}", "steps": ["s"], "answer": str(i)} for i in range(2)]
    (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_records(tmp_path / name) == rows


def test_load_records_names_the_supported_formats_and_splits(tmp_path):
    (tmp_path / "data.csv").write_text("question,answer\nq,1\n")
    with pytest.raises(ValueError, match=r"data.csv: unsupported file extension '.csv'; .* .json, .jsonl, .ndjson"):
        load_records(tmp_path / "data.csv")
    (tmp_path / "DATA.JSON").write_text(json.dumps([{"question": "q", "steps": ["s"], "answer": "1"}]))
    assert len(load_records(tmp_path / "DATA.JSON")) == 1
    from datasets import Dataset, DatasetDict

    split = Dataset.from_list([{"question": "q", "steps": ["s"], "answer": "1"}])
    splits = DatasetDict({"train": split, "test": split})
    with pytest.raises(ValueError, match=r"DatasetDict with keys \['train', 'test'\], .* e.g. dataset\['train'\]"):
        load_records(splits)
    assert list(load_records(splits["train"])) == [{"question": "q", "steps": ["s"], "answer": "1"}]


def test_load_records_reads_a_dataset_one_row_at_a_time(processor):
    from datasets import Dataset, Features, Image, Sequence, Value

    images = make_tiny_images(3)
    rows = {"question": ["q0", "q1", "q2"], "choices": [["a", "b"]] * 3, "answer": ["A", "B", "C"],
            "rationale": ["r1\n\nr2"] * 3, "image": images}
    features = Features({"question": Value("string"), "choices": Sequence(Value("string")),
                         "answer": Value("string"), "rationale": Value("string"), "image": Image()})
    dataset = Dataset.from_dict(rows, features=features)
    records = load_records(dataset, adapter=from_m3cot)  # answer "C" of row 2 is not a choice: found when read
    assert not isinstance(records, list) and len(records) == 3
    assert [r["answer"] for r in records[:2]] == ["A", "B"] and records[0]["question"] == "q0\nOptions: (A) a (B) b"
    assert records[0]["image"] is not records[0]["image"]  # decoded from the table per read
    assert np.array_equal(np.asarray(records[1]["image"].convert("RGB")), np.asarray(images[1].convert("RGB")))
    with pytest.raises(ValueError, match=r"Record 2: answer 'C' is not among the 2 choices"):
        NormalizedRecords(records, tokenizer=processor.tokenizer)
    assert [r["answer"] for r in NormalizedRecords(records[:2])] == ["A", "B"]


def test_image_folder_rows_with_several_images_and_streaming_datasets(tmp_path):
    images = make_tiny_images(2)
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    row = {"file_names": ["0.png", "1.png"], "question": "q", "steps": ["s"], "answer": "1"}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row))
    (record,) = load_records(tmp_path)
    assert record["images"] == [str(tmp_path / "0.png"), str(tmp_path / "1.png")]
    assert len(normalize_record(record, 0)["images"]) == 2
    from datasets import Dataset

    streaming = Dataset.from_list([{"question": "q", "steps": ["s"], "answer": "1"}]).to_iterable_dataset()
    with pytest.raises(ValueError, match="load_records got a streaming IterableDataset, .* without streaming=True"):
        load_records(streaming)


def test_image_folder_without_metadata_names_the_fix(tmp_path):
    make_tiny_images(1)[0].save(tmp_path / "0.png")
    with pytest.raises(ValueError, match="has no metadata.jsonl or metadata.json; add one row per image"):
        load_records(tmp_path)


# ---- stage construction ------------------------------------------------------------------------------------------


def test_stage_zero_is_full_cot(processor, record):
    example = build_stage_example(record, 0, processor=processor)
    target = ids(processor, "Read 3.\nRead 4.\n3 + 4 = 7.\nAnswer: 7") + [token(processor, "<|im_end|>")]
    assert example["input_ids"][-len(target):] == target
    prompt_len = len(example["input_ids"]) - len(target)
    assert example["labels"] == [IGNORE_INDEX] * prompt_len + target
    assert example["num_latents"] == 0


@pytest.mark.parametrize("stage, pad, latents, rest", [
    (1, True, 1, "Read 4.\n3 + 4 = 7.\n"), (2, True, 2, "3 + 4 = 7.\n"), (3, True, 3, ""), (6, True, 4, ""),
    (6, False, 3, ""),
])
def test_stage_k_replaces_first_k_steps_with_latents(processor, record, stage, pad, latents, rest):
    example = build_stage_example(record, stage, processor=processor, max_latent_stage=4, pad_latent_to_max=pad)
    block = [token(processor, "<|start-latent|>")] + [token(processor, "<|latent|>")] * latents
    block += [token(processor, "<|end-latent|>")]
    target = ids(processor, rest + "Answer: 7") + [token(processor, "<|im_end|>")]
    assert example["input_ids"][-(len(block) + len(target)):] == block + target
    prompt_len = len(example["input_ids"]) - len(block) - len(target)
    assert example["labels"] == [IGNORE_INDEX] * (prompt_len + len(block)) + target
    assert example["num_latents"] == latents
    assert example["mm_token_type_ids"][prompt_len:] == [0] * (len(block) + len(target))


def test_baseline_modes(processor, record):
    cot = build_stage_example(record, 3, processor=processor, mode="cot")
    assert cot["input_ids"] == build_stage_example(record, 0, processor=processor)["input_ids"]
    no_cot = build_stage_example(record, 3, processor=processor, mode="no_cot")
    target = ids(processor, "Answer: 7") + [token(processor, "<|im_end|>")]
    assert no_cot["input_ids"][-len(target):] == target and no_cot["num_latents"] == 0
    with pytest.raises(ValueError, match="mode='x'"):
        build_stage_example(record, 1, processor=processor, mode="x")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stage=st.integers(0, 7), num_steps=st.integers(1, 5), max_stage=st.integers(0, 4), pad=st.booleans())
def test_stage_label_invariants(processor, stage, num_steps, max_stage, pad):
    record = {"images": [], "question": "q?", "steps": [f"s{i}." for i in range(num_steps)], "answer": "1"}
    example = build_stage_example(record, stage, processor=processor, max_latent_stage=max_stage, pad_latent_to_max=pad)
    replaced, latents = stage_plan(num_steps, stage, max_stage, pad)
    latent_id = token(processor, "<|latent|>")
    assert example["input_ids"].count(latent_id) == latents == example["num_latents"]
    supervised = [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
    assert supervised == list(range(supervised[0], len(example["input_ids"])))  # one contiguous tail
    assert all(example["input_ids"][i] == example["labels"][i] for i in supervised)
    assert latent_id not in [example["input_ids"][i] for i in supervised]
    tail = processor.tokenizer.decode([example["input_ids"][i] for i in supervised])
    assert [f"s{i}." in tail for i in range(num_steps)] == [i >= replaced for i in range(num_steps)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stage": -1}, r"stage=-1 must be an integer >= 0"),
        ({"stage": 1.5}, r"stage=1.5 must be an integer >= 0"),
        ({"stage": 1, "max_latent_stage": -1}, r"max_latent_stage=-1 must be an integer >= 0"),
        ({"stage": 1, "max_latent_stage": 2.0}, r"max_latent_stage=2.0 must be an integer >= 0"),
    ],
)
def test_bad_stage_is_an_error(processor, record, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_stage_example(record, processor=processor, **kwargs)
    assert build_stage_example(record, np.int64(1), processor=processor)["num_latents"] == 1  # numpy ints are fine


@pytest.mark.parametrize(
    "field, value, label, special",
    [
        ("question", "what does <|latent|> mean?", "question", "<|latent|>"),
        ("question", "<|start-latent|> q", "question", "<|start-latent|>"),
        ("steps", ["fine", "a <|end-latent|> b"], "steps[1]", "<|end-latent|>"),
        ("steps", ["a <|im_end|> b"], "steps[0]", "<|im_end|>"),
        ("answer", "<|im_start|>7", "answer", "<|im_start|>"),
        ("question", "x <|image_pad|>", "question", "<|image_pad|>"),
        ("answer", "<|vision_start|>", "answer", "<|vision_start|>"),
    ],
)
def test_special_token_text_in_a_record_is_an_error(processor, record, field, value, label, special):
    if special not in processor.tokenizer.get_vocab():
        pytest.skip(f"{special} is not a token of this backbone")
    with pytest.raises(ValueError) as error:
        build_stage_example({**record, field: value}, 1, processor=processor)
    assert f"field {label!r} contains the special token string {special!r}" in str(error.value)


def test_stage_renderer_names_the_record_with_special_token_text(processor, record, tmp_path):
    from vedas_hf.trainer import StageRenderer, VedasSFTConfig

    args = VedasSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    bad = {"images": [], "question": "q", "steps": ["a <|latent|> b"], "answer": "1"}
    assert StageRenderer([record], processor, args).example(0)["num_latents"] == 0
    # checked when the renderer is built (before training), with the record's index
    with pytest.raises(ValueError, match=r"^Record 1: field 'steps\[0\]' contains the special token string"):
        StageRenderer([record, bad], processor, args)


def test_max_length_truncates_the_target_on_the_right_only(processor, record):
    full = build_stage_example(record, 1, processor=processor)
    assert build_stage_example(record, 1, processor=processor, max_length=None)["input_ids"] == full["input_ids"]
    fixed = full["labels"].index(next(label for label in full["labels"] if label != IGNORE_INDEX))
    for max_length in (fixed + 1, len(full["input_ids"]) - 2):
        cut = build_stage_example(record, 1, processor=processor, max_length=max_length)
        assert len(cut["input_ids"]) == len(cut["labels"]) == len(cut["mm_token_type_ids"]) == max_length
        for key in ("input_ids", "labels", "mm_token_type_ids"):
            assert cut[key] == full[key][:max_length]
        assert torch.equal(cut["pixel_values"], full["pixel_values"])
    longer = build_stage_example(record, 1, processor=processor, max_length=len(full["input_ids"]) + 5)
    assert longer["input_ids"] == full["input_ids"]
    message = rf"{len(full['input_ids'])} tokens .* max_length={fixed}: .* Raise max_length \(or set it to None\)"
    with pytest.raises(ValueError, match=message):  # no room left for a single target token
        build_stage_example(record, 1, processor=processor, max_length=fixed)


# ---- collator ----------------------------------------------------------------------------------------------------


def _examples(processor, images, latents):
    questions = ["What is it?", "A much longer question about the digits in the picture?", "Text only?"]
    out = []
    for question, image, k in zip(questions, [images[0], images[2], None], latents):
        record = {"images": [image] if image else [], "question": question, "steps": ["a.", "b.", "c."], "answer": "5"}
        out.append(build_stage_example(record, k, processor=processor, pad_latent_to_max=False))
    return out


@pytest.mark.parametrize("latents", [(2, 1, 3), (0, 0, 0), (2, 2, 2)])
def test_collator_aligns_latent_block(processor, images, latents):
    examples = _examples(processor, images, latents)
    batch = VedasDataCollator(processor)(examples)
    latent_id = token(processor, "<|latent|>")
    is_latent = batch["input_ids"] == latent_id
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    if max(latents):
        columns = is_latent.any(0).nonzero().flatten().tolist()
        start = columns[0]
        assert columns == list(range(start, start + max(latents)))
        for row, k in enumerate(latents):
            assert is_latent[row, start : start + k].all() and not is_latent[row, start + k :].any()
            assert batch["attention_mask"][row, start + k : start + max(latents)].sum() == 0
            assert batch["input_ids"][row, start - 1] == token(processor, "<|start-latent|>")
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    for row, example in enumerate(examples):  # every row keeps its tokens, in order
        kept = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert kept == example["input_ids"]
    if "image_grid_thw" in batch:  # Qwen: patch rows; Chameleon: one (C, H, W) entry per image
        assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
        assert batch["image_grid_thw"].shape[0] == 2
    else:
        assert batch["pixel_values"].shape[0] == 2


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(latents=st.lists(st.integers(1, 4), min_size=1, max_size=3), lengths=st.lists(st.integers(1, 8), min_size=3, max_size=3))
def test_collator_alignment_property(processor, latents, lengths):
    examples = []
    for k, n in zip(latents, lengths):
        record = {"images": [], "question": "word " * n, "steps": ["a.", "b.", "c.", "d."], "answer": "1"}
        examples.append(build_stage_example(record, k, processor=processor, pad_latent_to_max=False))
    batch = VedasDataCollator(processor)(examples)
    first = (batch["input_ids"] == token(processor, "<|latent|>")).int().argmax(1)
    assert len(set(first.tolist())) == 1
    assert torch.equal(batch["attention_mask"].sum(1), torch.tensor([len(e["input_ids"]) for e in examples]))


@pytest.mark.parametrize("key", ["labels", "input_ids", "mm_token_type_ids"])
def test_collator_names_a_missing_key(processor, record, key):
    examples = [build_stage_example(record, 1, processor=processor) for _ in range(2)]
    del examples[1][key]
    with pytest.raises(ValueError, match=rf"Example 1 has no '{key}' .* render records with build_stage_example"):
        VedasDataCollator(processor)(examples)


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (1, 0, 3, 2)])
def test_collator_mixes_rows_with_and_without_images(processor, images, order):
    """Text-only rows carry no pixels (or `pixel_values=None`, as a `datasets` transform gives them); image rows
    keep theirs, in row order, whether the first row has an image or not."""
    examples = []
    for image in (None, images[0], None, images[2]):
        record = {"images": [image] if image else [], "question": "How many?", "steps": ["a.", "b."], "answer": "2"}
        examples.append(build_stage_example(record, 1, processor=processor))
    examples[0].update(pixel_values=None, image_grid_thw=None)  # row 2 has no such keys at all
    examples = [examples[i] for i in order]
    batch = VedasDataCollator(processor)(examples)
    with_images = [e for e in examples if e.get("pixel_values") is not None]
    assert len(with_images) == 2
    assert torch.equal(batch["pixel_values"], torch.cat([e["pixel_values"] for e in with_images]))
    if "image_grid_thw" in batch:
        assert torch.equal(batch["image_grid_thw"], torch.cat([e["image_grid_thw"] for e in with_images]))


# ---- images PIL opens but the model would see wrongly, or that are not local files -----------------------------


def test_images_over_the_pil_pixel_limit_name_the_record_and_the_fix(tmp_path, monkeypatch):
    """PIL refuses images over twice `MAX_IMAGE_PIXELS` and warns over it; both are a `ValueError` naming the record,
    the path, the pixel count, the limit and how to allow the file."""
    from PIL import Image

    _, records = _image_records(tmp_path, 2, side=16)  # 256 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = str(tmp_path / "1.png")
    with pytest.raises(ValueError, match=(
            rf"Record 1: image '{path}' has 256 pixels, over PIL's limit PIL.Image.MAX_IMAGE_PIXELS=100 \(a guard "
            r"against decompression bombs\). Downscale the image, or, if you trust the file, raise the limit before "
            r"loading the data: PIL.Image.MAX_IMAGE_PIXELS = 256.")):
        normalize_record(records[1], 1)
    with pytest.raises(ValueError, match=r"Record 0: image '.*0.png' has 256 pixels, over PIL's limit"):
        NormalizedRecords(records)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 256 is within twice the limit: PIL would only warn
    with pytest.raises(ValueError, match=r"Record 1: image '.*1.png' has 256 pixels, .*MAX_IMAGE_PIXELS=200 "):
        normalize_record(records[1], 1)
    raw = (tmp_path / "1.png").read_bytes()
    with pytest.raises(ValueError, match=r"Record 3: image '<image bytes>' has 256 pixels"):
        normalize_record({**records[1], "image": {"bytes": raw, "path": None}}, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 256)
    assert normalize_record(records[1], 1)["images"][0].size == (16, 16)


def test_url_image_paths_are_named_not_mangled_into_missing_files(tmp_path):
    """`https://` (any `scheme://`) image paths are kept as written by `load_records` (joining them to the file's
    folder gave `.../https:/...`) and are a `ValueError` naming the record and the URL: nothing is downloaded."""
    url, bucket = "https://example.com/images/cat.png", "s3://bucket/dog.png"
    rows = [{"image": url, "question": "q", "steps": ["s"], "answer": "1"},
            {"images": [{"bytes": None, "path": bucket}], "question": "q", "steps": ["s"], "answer": "2"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    records = load_records(tmp_path / "data.jsonl")
    assert records[0]["image"] == url and records[1]["images"] == [{"bytes": None, "path": bucket}]
    with pytest.raises(ValueError, match=(
            r"Record 0: image 'https://example.com/images/cat.png' is a URL; remote images are not downloaded "
            r"\(loading data never reaches the network\). Download the images and point the record to the local "
            r"files")):
        NormalizedRecords(records)
    with pytest.raises(ValueError, match=r"Record 1: image 's3://bucket/dog.png' is a URL; remote images are not"):
        normalize_record(records[1], 1)
    with pytest.raises(ValueError, match=r"Record 5: image 'http://host:8000/a.jpg' is a URL"):  # no data file
        normalize_record({**rows[0], "image": "http://host:8000/a.jpg"}, 5)


def test_float_and_deep_integer_images_are_scaled_to_8_bits(tmp_path):
    """Float images ("F") with values in 0..1 are scaled by 255 (a plain conversion makes them black), in 0..255
    kept; 16-bit ("I;16") by 65535; 32-bit ("I") by their max above 255. Negative or NaN values are a `ValueError`
    naming the record, the mode and the value range."""
    from PIL import Image

    def read(name, values, index=0):
        image = Image.fromarray(np.array([values], dtype=np.asarray(values).dtype))
        if name is None:
            return normalize_record({"image": image, "question": "q", "steps": ["a"], "answer": "1"}, index)
        image.save(tmp_path / name)
        (tmp_path / "data.jsonl").write_text(json.dumps({"image": name, "question": "q", "steps": ["a"],
                                                         "answer": "1"}))
        assert Image.open(tmp_path / name).mode == image.mode
        (record,) = load_records(tmp_path / "data.jsonl")
        return normalize_record(record, index)

    def grey(record):
        pixels = np.asarray(record["images"][0])
        assert pixels.dtype == np.uint8 and (pixels == pixels[..., :1]).all()  # grey RGB
        return pixels[0, :, 0].tolist()

    assert grey(read("gradient.tif", np.array([0.0, 0.2, 0.5, 1.0], np.float32))) == [0, 51, 128, 255]
    assert grey(read("levels.tif", np.array([0.0, 100.4, 254.6, 255.0], np.float32))) == [0, 100, 255, 255]
    assert grey(read("deep.png", np.array([0, 25700, 65535], np.uint16))) == [0, 100, 255]
    assert grey(read("dark.png", np.array([0, 255, 514], np.uint16))) == [0, 1, 2]  # by the type's max, not 255
    assert grey(read(None, np.array([0, 500, 1000], np.int32))) == [0, 128, 255]
    assert grey(read(None, np.array([0, 200], np.int32))) == [0, 200]
    with pytest.raises(ValueError, match=(
            r"Record 2: cannot read image '.*negative.tif' \(mode 'F' image has values from -0.5 to 1, outside the "
            r"ranges read as grey levels .*; rescale it to 8-bit \(0..255\)")):
        read("negative.tif", np.array([-0.5, 1.0], np.float32), index=2)
    with pytest.raises(ValueError, match=r"Record 0: .*mode 'F' image has values from 0 to 1 and NaN or infinite"):
        read("nan.tif", np.array([0.0, np.nan, 1.0], np.float32))
    with pytest.raises(ValueError, match=r"mode 'F' image has values from 0 to 300, outside the ranges"):
        read(None, np.array([0.0, 300.0], np.float32))
    with pytest.raises(ValueError, match=r"Record 4: cannot read image '<PIL image>' \(mode 'I' image has values from"
                                         r" -3 to 7"):
        read(None, np.array([-3, 7], np.int32), index=4)
