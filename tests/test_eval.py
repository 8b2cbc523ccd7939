"""Evaluation harness: exact counts on a tiny checkpoint, accuracy on known predictions, answer parsing on
adversarial outputs, replay-window PNGs and the examples/eval.py command."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vedas_hf.eval import answers_match, evaluate, extract_answer, markdown_table, window_images
from vedas_hf.testing import make_tiny_checkpoint
from vedas_hf.toy import make_digit_arithmetic


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("eval"), seed=0, replay_top_k=4, router_top_k=4,
                                num_latent_steps=2)
    return path, AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def records():
    return make_digit_arithmetic(0, 5, seed=0)[1]


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("the first digit is 3\nAnswer: 7", "7"),
        ("Answer: 7.", "7"),
        ("Answer: 1 Answer: 4", "4"),  # the last answer counts
        ("Answer:  12 \nmore text", "12"),
        ("(B) cat", "B"),
        ("Answer: (c)", "(c)"),  # lower-case letters are not option letters
        ("Answer: B.", "B"),
        ("B) the dog", "B"),
        ("Answer: C, because", "C"),
        ("Because it is red", "Because it is red"),  # a word starting with a capital is not a letter
        ("Answer: A cat", "A"),  # a capital letter then a space reads as an option letter (choice answers are letters)
        ("", ""),
    ],
)
def test_extract_answer_on_adversarial_outputs(text, parsed):
    assert extract_answer(text) == parsed


def test_answers_match_normalises_case_and_spaces_only():
    assert answers_match(" b ", "B") and answers_match("New  York", "new york")
    assert not answers_match("7", "17") and not answers_match("B", "A")


def test_counts_are_exact_on_a_tiny_checkpoint(tiny, records):
    _, model, processor = tiny
    max_new = 6
    result = evaluate(model, processor, records, num_latent_steps=2, batch_size=2, max_new_tokens=max_new,
                      progress=False)
    assert result["num_samples"] == len(records) == len(result["predictions"])
    # recompute the AR steps of every sample one by one: 2 latent steps + tokens up to and including <|im_end|>
    eos = {processor.tokenizer.eos_token_id, processor.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    expected = []
    for record in records:
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]}],
            add_generation_prompt=True,
        )
        inputs = processor(text=[prompt], images=[record["image"]], return_tensors="pt")
        new = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, num_latent_steps=2)
        tokens = new[0, inputs["input_ids"].shape[1] :].tolist()
        expected.append(2 + next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens)))
    assert result["ar_steps"] == pytest.approx(sum(expected) / len(expected))
    assert result["seconds_per_sample"] > 0


def test_accuracy_on_known_predictions(tiny, records, monkeypatch):
    _, model, processor = tiny
    answers = [record["answer"] for record in records]
    scripted = [f"Answer: {a}" for a in answers[:3]] + ["Answer: x", "no answer"]

    def fake_generate(self, input_ids=None, **kwargs):
        rows = [processor.tokenizer(scripted.pop(0) + "<|im_end|>")["input_ids"] for _ in range(input_ids.shape[0])]
        width = max(len(r) for r in rows)
        pad = processor.tokenizer.pad_token_id
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)

    monkeypatch.setattr(type(model), "generate", fake_generate)
    result = evaluate(model, processor, records, num_latent_steps=0, batch_size=2, progress=False)
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert [p["correct"] for p in result["predictions"]] == [True, True, True, False, False]
    assert "| vedas | 60.0 |" in markdown_table({"vedas": result})


def test_window_images_draw_the_replay_boxes(tiny, records, tmp_path):
    _, model, processor = tiny
    paths = window_images(model, processor, records[:2], tmp_path, num_latent_steps=2, max_new_tokens=2)
    assert len(paths) == 2
    original = records[0]["image"].convert("RGB")
    drawn = Image.open(paths[0]).convert("RGB")
    assert drawn.size == original.size
    assert drawn.tobytes() != original.tobytes()  # at least one window outline was drawn


def test_eval_command_writes_json_and_markdown(tiny, tmp_path):
    path, _, _ = tiny
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "eval.py"), str(path), "--num_samples", "3",
         "--max_new_tokens", "4", "--output_dir", str(tmp_path / "out"), "--window_images", "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert summary["num_samples"] == 3 and summary["num_latent_steps"] == 2
    assert 2 + 1 <= summary["ar_steps"] <= 2 + 4
    assert (tmp_path / "out" / "eval.md").read_text().startswith("| method |")
    assert len(os.listdir(tmp_path / "out" / "windows")) == 1


def test_table1_command_trains_and_evaluates_each_variant_from_one_reader(tmp_path):
    from collections import Counter

    from vedas_hf.toy import make_task

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "table1.py"), "--task", "shapes", "--output_dir",
         str(tmp_path), "--variants", "no-cot", "vedas", "--num_train_samples", "32", "--num_test_samples", "4",
         "--num_reader_samples", "32", "--reader_epochs", "1", "--num_train_epochs", "2", "--max_latent_stage", "1",
         "--batch_size", "16", "--max_new_tokens", "6"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "table1.json").read_text())
    assert list(report["rows"]) == ["No-CoT", "Vedas"]
    assert [row["num_samples"] for row in report["rows"].values()] == [4, 4]
    assert 1 <= report["rows"]["No-CoT"]["ar_steps"] <= 6  # plain decoding: generated tokens only
    assert 1 + 1 <= report["rows"]["Vedas"]["ar_steps"] <= 1 + 6  # one latent step + generated tokens
    _, test = make_task("shapes", 32, 4, seed=0)
    majority = Counter(r["answer"] for r in test).most_common(1)[0][1] / 4
    assert report["majority_answer_accuracy"] == majority
    assert (tmp_path / "reader" / "final" / "model.safetensors").is_file()
    assert len((tmp_path / "table1.md").read_text().strip().splitlines()) == 2 + 2  # header, rule, two rows
