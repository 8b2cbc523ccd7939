"""Evaluation harness: exact counts on a tiny checkpoint, accuracy on known predictions, answer parsing and scoring
on adversarial outputs, replay-window PNGs, the examples/eval.py command and the data / final evaluation of
examples/sft.py."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vedas_hf.data import NormalizedRecords, chat_prompt, prompt_messages
from vedas_hf.eval import (
    answers_match,
    evaluate,
    extract_answer,
    markdown_table,
    normalize_answer,
    option_letter,
    window_images,
)
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
        ("(B) cat", "(B) cat"),  # the whole answer: reading an option letter is the scorer's job (gold-dependent)
        ("Answer: B.", "B"),
        ("Answer: A dog", "A dog"),
        ("Answer: E. coli", "E. coli"),
        ("Answer: I don't know!", "I don't know"),
        ("", ""),
    ],
)
def test_extract_answer_on_adversarial_outputs(text, parsed):
    assert extract_answer(text) == parsed


@pytest.mark.parametrize(
    "prediction, gold, correct",
    [
        # the gold answer is normalised like the prediction
        ("(B)", "(B)", True), ("B", "(B)", True), ("5", "5.", True), ("New  York", "new york.", True),
        # option-letter golds: the letter the prediction picks
        ("(B) cat", "B", True), ("B.", "B", True), ("B) the dog", "B", True), ("C, because", "C", True),
        ("b", "B", True), ("(c)", "C", True), ("A cat", "B", False), ("Because it is red", "B", False),
        ("B", "A", False), ("(b) green", "B", True), ("a dog", "A", False),
        # other golds: the whole answer, even when it starts with a one-letter word
        ("A dog", "A dog", True), ("A", "A dog", False), ("I don't know", "I don't know", True),
        ("I", "I don't know", False), ("E. coli", "E. coli", True), ("E", "E. coli", False),
        ("A is larger", "A is larger", True), ("U.S", "U.S.", True), ("7", "17", False), ("3.5", "3.5", True),
    ],
)
def test_answers_match_normalises_gold_and_prediction_alike(prediction, gold, correct):
    assert answers_match(prediction, gold) is correct


def test_normalize_answer_and_option_letter():
    assert normalize_answer(" New  York. ") == "new york" and normalize_answer("5.") == "5"
    assert [option_letter(a) for a in ("B", "(B)", "B.", "b", "A dog", "AB", "5")] == ["B", "B", "B", "B", None,
                                                                                      None, None]


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
        prompt = chat_prompt(
            processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]}]
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


def _scripted_generate(processor, texts):
    """A `generate` that emits `texts` in order, each followed by <|im_end|> (what a perfect model writes)."""

    def fake_generate(self, input_ids=None, **kwargs):
        rows = [processor.tokenizer(texts.pop(0) + "<|im_end|>")["input_ids"] for _ in range(input_ids.shape[0])]
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [processor.tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)

    return fake_generate


def test_perfect_answers_score_full_accuracy_on_answer_only_records(tiny, records, monkeypatch):
    """Each prediction is the training target of its record ("Answer: " + answer): accuracy 1.0 whatever the answer
    looks like, on records with no reasoning steps (test sets have none) and a JSON number answer 3.0."""
    _, model, processor = tiny
    image = records[0]["image"]
    answers = ["6", "(B)", "5.", "A dog", "E. coli", "I don't know", 3.0]
    test = [{"image": image, "question": "q?", "answer": answer} for answer in answers]
    scripted = ["Answer: " + (a if isinstance(a, str) else "3") for a in answers]
    monkeypatch.setattr(type(model), "generate", _scripted_generate(processor, scripted))
    result = evaluate(model, processor, test, batch_size=4, progress=False)
    assert [p["correct"] for p in result["predictions"]] == [True] * len(answers)
    assert result["accuracy"] == 1.0 and result["predictions"][-1]["answer"] == "3"


def test_wrong_one_letter_answers_are_not_cut_to_a_letter(tiny, records, monkeypatch):
    _, model, processor = tiny
    test = [{"image": records[0]["image"], "question": "q?", "answer": a} for a in ("A", "A dog", "I don't know")]
    scripted = ["Answer: A dog", "Answer: A", "Answer: I do"]
    monkeypatch.setattr(type(model), "generate", _scripted_generate(processor, scripted))
    result = evaluate(model, processor, test, batch_size=3, progress=False)
    assert [p["correct"] for p in result["predictions"]] == [True, False, False]
    assert [p["prediction"] for p in result["predictions"]] == ["A dog", "A", "I do"]


def test_evaluate_rejects_empty_and_special_token_records(tiny, records):
    _, model, processor = tiny
    with pytest.raises(ValueError, match="No records to evaluate"):
        evaluate(model, processor, [], progress=False)
    bad = [records[0], {"image": records[0]["image"], "question": "what is <|latent|>?", "answer": "1"}]
    with pytest.raises(ValueError, match=r"Record 1: field 'question' contains the special token string '<\|latent\|>'"):
        evaluate(model, processor, bad, progress=False)
    thin = [records[0], records[1], {**records[2], "image": Image.new("RGB", (5, 3000))}]
    with pytest.raises(ValueError, match=r"Record 2: image 0 \(5 x 3000 px\) is refused by the image processor"):
        evaluate(model, processor, thin, batch_size=2, progress=False)  # before the first batch is generated


def test_window_images_draw_the_replay_boxes(tiny, records, tmp_path):
    _, model, processor = tiny
    paths = window_images(model, processor, records[:2], tmp_path, num_latent_steps=2, max_new_tokens=2)
    assert len(paths) == 2
    original = records[0]["image"].convert("RGB")
    drawn = Image.open(paths[0]).convert("RGB")
    assert drawn.size == original.size
    # the first step's outline is where the trace says: its corners changed colour, pixels off every outline did not
    record = NormalizedRecords(records[:1], require_steps=False)[0]
    prompt = chat_prompt(processor, prompt_messages(record))
    inputs = processor(text=[prompt], images=record["images"], return_tensors="pt")
    trace = model.generate(**inputs, num_latent_steps=2, max_new_tokens=2, do_sample=False,
                           return_dict_in_generate=True).latent_trace
    _, h, w = inputs["image_grid_thw"][0].tolist()
    sx, sy = original.width / (w * model.config.vision_config.patch_size), original.height / (
        h * model.config.vision_config.patch_size)
    x0, y0, x1, y1 = trace[0][0]["box"]
    corners = [(int(x0 * sx), int(y0 * sy)), (int(x1 * sx) - 1, int(y1 * sy) - 1)]
    assert all(drawn.getpixel(c) == (255, 0, 0) for c in corners)  # step 0 is drawn in red
    boxes = [step[0]["box"] for step in trace]
    on_outline = lambda x, y: any(  # noqa: E731
        (x in (int(a * sx), int(c * sx) - 1) and int(b * sy) <= y < int(d * sy))
        or (y in (int(b * sy), int(d * sy) - 1) and int(a * sx) <= x < int(c * sx)) for a, b, c, d in boxes)
    off = [(x, y) for x in range(original.width) for y in range(original.height) if not on_outline(x, y)]
    assert off and all(drawn.getpixel(p) == original.getpixel(p) for p in off)


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


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", os.path.join(REPO, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num_samples", "0"], r"--num_samples 0: pass at least 1"),  # a bundled task has no "all"
        (["--num_samples", "-2"], r"--num_samples -2: pass at least 1"),
        (["--num_samples", "-1", "--dataset_path", "data.jsonl"], r"--num_samples -1: pass 0 \(all records\) or more"),
    ],
)
def test_eval_command_rejects_sample_counts_that_give_no_records(argv, message, tmp_path):
    # checked before the checkpoint is read: the checkpoint does not even exist
    with pytest.raises(ValueError, match=message):
        load_script("eval").main([str(tmp_path / "no-checkpoint"), *argv])


def test_eval_command_zero_samples_reads_the_whole_file(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(3)]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    script = load_script("eval")
    args = type("Args", (), {"dataset_path": str(tmp_path / "test.jsonl"), "dataset_format": "canonical",
                             "num_samples": None})()
    assert [r["answer"] for r in script.load_test_records(args)] == ["0", "1", "2"]  # the default: every record
    args.num_samples = 0
    assert [r["answer"] for r in script.load_test_records(args)] == ["0", "1", "2"]
    args.num_samples = 2
    assert len(script.load_test_records(args)) == 2


@pytest.fixture
def sft_without_model(monkeypatch):
    """examples/sft.py whose `load_model` fails the test: data errors must come before any model is loaded."""
    sft = load_script("sft")

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(sft, "load_model", load_model)
    return sft


def test_sft_script_checks_the_data_before_loading_the_model(sft_without_model, tmp_path):
    base = ["--output_dir", str(tmp_path / "out"), "--bf16", "False"]  # on a CPU, as with any TRL script
    with pytest.raises(ValueError, match="does not exist"):
        sft_without_model.main([*base, "--dataset_path", str(tmp_path / "missing.jsonl")])
    rows = [{"question": "q", "steps": ["a"], "answer": "1"}, {"question": "q", "steps": ["a"]}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=r"--dataset_path .*train.jsonl: Record 1: field 'answer'"):
        sft_without_model.main([*base, "--dataset_path", str(tmp_path / "train.jsonl")])
    (tmp_path / "ok.jsonl").write_text(json.dumps(rows[0]))
    with pytest.raises(ValueError, match="--eval_strategy steps needs evaluation records"):
        sft_without_model.main([*base, "--dataset_path", str(tmp_path / "ok.jsonl"), "--eval_strategy", "steps"])
    (tmp_path / "eval.jsonl").write_text(json.dumps({"question": "q", "answer": "1", "image": "nope.png"}))
    with pytest.raises(ValueError, match=r"--eval_dataset_path .*eval.jsonl: Record 0: cannot read image"):
        sft_without_model.main([*base, "--dataset_path", str(tmp_path / "ok.jsonl"), "--eval_dataset_path",
                                str(tmp_path / "eval.jsonl")])


def test_sft_script_uses_the_demo_settings_only_for_the_bundled_task(monkeypatch, tmp_path):
    """On the user's data (flag or --config file) every default is VedasSFTConfig's, not the tiny demo's."""
    from vedas_hf.trainer import VedasSFTConfig

    sft, parsed = load_script("sft"), []

    class Parsed(Exception):
        pass

    def load_model(script_args, training_args):
        parsed.append(training_args)
        raise Parsed

    monkeypatch.setattr(sft, "load_model", load_model)
    (tmp_path / "ok.jsonl").write_text(json.dumps({"question": "q", "steps": ["a"], "answer": "1"}))
    (tmp_path / "run.yaml").write_text(f"dataset_path: {tmp_path / 'ok.jsonl'}\nbf16: false\n")
    on_cpu = ["--bf16", "False"]
    user_data = (["--dataset_path", str(tmp_path / "ok.jsonl"), *on_cpu], ["--config", str(tmp_path / "run.yaml")])
    for argv in (*user_data, ["--num_train_samples", "4", "--num_eval_samples", "0"]):
        with pytest.raises(Parsed):
            sft.main(["--output_dir", str(tmp_path / "out"), *argv])
    fields = ("max_latent_stage", "epochs_per_stage", "num_train_epochs", "learning_rate", "gradient_checkpointing")
    trainer_defaults = VedasSFTConfig(output_dir=str(tmp_path), bf16=False)
    expected = tuple(getattr(trainer_defaults, name) for name in fields)
    assert expected == (4, 4, 20, 2e-5, True)  # TRL's learning rate
    demo = (2, 1, 6, 2e-3, False)
    assert [tuple(getattr(args, name) for name in fields) for args in parsed] == [expected, expected, demo]


def test_sft_script_evaluates_with_the_latent_steps_the_trainer_set(tiny, tmp_path, monkeypatch):
    """A schedule that ends before max_latent_stage (1 step: stage 0 of 2) is evaluated with the steps the trainer
    wrote into the model config (0), not with max_latent_stage."""
    path, _, _ = tiny
    sft = load_script("sft")
    seen = {}

    def fake_evaluate(model, processor, records, num_latent_steps, **kwargs):
        seen["steps"], seen["config"] = num_latent_steps, model.config.num_latent_steps
        return {"accuracy": 0.5, "ar_steps": 1.0, "seconds_per_sample": 0.1, "num_samples": len(records),
                "predictions": []}

    monkeypatch.setattr(sft, "evaluate", fake_evaluate)
    sft.main(["--model_name_or_path", str(path), "--output_dir", str(tmp_path), "--num_train_samples", "4",
              "--num_eval_samples", "2", "--toy_digit_size", "24", "--toy_rows", "1", "--per_device_train_batch_size",
              "4", "--max_latent_stage", "2", "--epochs_per_stage", "1", "--max_steps", "1", "--save_strategy", "no",
              "--use_cpu"])
    assert seen == {"steps": 0, "config": 0}
    assert json.loads((tmp_path / "final" / "config.json").read_text())["num_latent_steps"] == 0


def test_table1_command_runs_paired_seeds_with_intervals_and_resumes_from_its_cache(tmp_path):
    from collections import Counter

    from vedas_hf.stats import mean_ci, paired_sample_ci
    from vedas_hf.toy import make_task_splits

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")

    def run(*seeds):
        result = subprocess.run(
            [sys.executable, os.path.join(REPO, "examples", "table1.py"), "--task", "shapes", "--output_dir",
             str(tmp_path), "--variants", "no-cot", "vedas", "no-rds", "--seeds", *map(str, seeds),
             "--num_train_samples", "32", "--num_test_samples", "4", "--num_reader_samples", "32", "--reader_epochs",
             "1", "--num_train_epochs", "2", "--max_latent_stage", "1", "--batch_size", "16", "--max_new_tokens", "6"],
            capture_output=True, text=True, env=env, timeout=900,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads((tmp_path / "table1.json").read_text())

    report = run(0)
    cached = (tmp_path / "seed0" / "vedas.json").stat().st_mtime_ns
    report = run(0, 1)  # seed 0 comes from the cache, seed 1 is trained
    assert (tmp_path / "seed0" / "vedas.json").stat().st_mtime_ns == cached
    assert list(report["rows"]) == ["no-cot", "vedas", "no-rds"]
    seeds = {s: {v: json.loads((tmp_path / f"seed{s}" / f"{v}.json").read_text()) for v in report["rows"]}
             for s in (0, 1)}
    for variant, row in report["rows"].items():
        accuracies = [seeds[s][variant]["accuracy"] for s in (0, 1)]
        assert row["accuracy_per_seed"] == accuracies
        assert row["accuracy_seeds_ci"] == mean_ci(accuracies)
        if variant != "vedas":  # the paired difference: full method minus this row, on the same test samples
            diff = row["full_minus_this"]
            assert diff["per_seed"] == [seeds[s]["vedas"]["accuracy"] - seeds[s][variant]["accuracy"] for s in (0, 1)]
            pooled = lambda v: [c for s in (0, 1) for c in seeds[s][v]["correct"]]  # noqa: E731
            assert diff["samples_ci"] == paired_sample_ci(pooled("vedas"), pooled(variant))
    assert 1 <= report["rows"]["no-cot"]["ar_steps"] <= 6  # plain decoding: generated tokens only
    assert 1 + 1 <= report["rows"]["vedas"]["ar_steps"] <= 1 + 6  # one latent step + generated tokens
    vedas = seeds[0]["vedas"]
    assert sorted(vedas["steps_curve"], key=int) == ["0", "1", "2", "3"]  # 0 .. T_r + 2
    assert vedas["router_diagnostics"]["refined_share"]["mean"] > 0 and "zero_latents" in vedas
    for seed in (0, 1):
        test = make_task_splits("shapes", 32, 0, 4, seed=seed)["test"]
        majority = Counter(r["answer"] for r in test).most_common(1)[0][1] / 4
        assert report["majority_answer_accuracy"][str(seed)] == majority
        assert (tmp_path / f"seed{seed}" / "reader" / "final" / "model.safetensors").is_file()
    table = (tmp_path / "table1.md").read_text()
    assert "| Vedas w/o RDS |" in table and "latent steps at inference" in table and "Router diagnostics" in table
    # the folder's cached readers and variants belong to one protocol: other settings are refused, not reused
    base = [sys.executable, os.path.join(REPO, "examples", "table1.py"), "--task", "shapes", "--output_dir",
            str(tmp_path), "--variants", "no-cot", "--seeds", "0", "--num_train_samples", "32", "--num_test_samples",
            "4", "--num_reader_samples", "32", "--reader_epochs", "1", "--max_latent_stage", "1", "--batch_size", "16"]
    other = subprocess.run([*base, "--num_train_epochs", "3", "--max_new_tokens", "6"], capture_output=True,
                           text=True, env=env, timeout=300)
    assert other.returncode != 0 and "num_train_epochs: 2 there, 3 now" in other.stderr
    longer = subprocess.run([*base, "--num_train_epochs", "2", "--max_new_tokens", "8"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert longer.returncode != 0 and "no-cot.json was computed with max_new_tokens=6" in longer.stderr
    validation = subprocess.run([*base, "--num_train_epochs", "2", "--max_new_tokens", "6", "--eval_split",
                                 "validation", "--num_validation_samples", "4"], capture_output=True, text=True,
                                env=env, timeout=300)
    assert validation.returncode != 0 and "reading.json was computed with eval_split='test'" in validation.stderr


def test_inspect_script_draws_each_steps_tokens_window_and_probe(tiny, tmp_path):
    path, model, processor = tiny
    image = Image.new("RGB", (32, 32), "black")
    image.paste(Image.new("RGB", (16, 16), "white"), (16, 0))  # one bright 2 x 2-token square, top right
    image.save(tmp_path / "square.png")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "inspect_latents.py"), str(path), "--image",
         str(tmp_path / "square.png"), "--question", "Where is the square?", "--num_latent_steps", "2",
         "--max_new_tokens", "3", "--scale", "10", "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "square:" in result.stdout
    picture = Image.open(tmp_path / "out" / "square.png").convert("RGB")
    assert picture.size == (320 + 420, 320)  # the enlarged image, then the text panel
    # the cells the first step replayed are tinted in its colour; a cell no step replayed keeps the image's pixels
    record = NormalizedRecords([{"image": str(tmp_path / "square.png"), "question": "Where is the square?",
                                 "answer": "?"}], require_steps=False)[0]
    prompt = chat_prompt(processor, prompt_messages(record))
    inputs = processor(text=[prompt], images=record["images"], return_tensors="pt")
    trace = model.generate(**inputs, num_latent_steps=2, max_new_tokens=1, return_dict_in_generate=True).latent_trace
    replayed = {i for step in trace for i in step[0]["visual_indices"]}
    first = trace[0][0]["visual_indices"][0]
    top, left = divmod(first, 4)  # 4 x 4 merged grid, 80 px per cell at scale 10
    assert picture.getpixel((left * 80 + 40, top * 80 + 60)) != image.getpixel((left * 8 + 4, top * 8 + 6))
    untouched = next(i for i in range(16) if i not in replayed)
    top, left = divmod(untouched, 4)
    assert picture.getpixel((left * 80 + 40, top * 80 + 60)) == image.getpixel((left * 8 + 4, top * 8 + 6))
