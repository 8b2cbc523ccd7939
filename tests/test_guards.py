"""Reliability, round 2: checks that fail fast before training (unconverted checkpoints, a second run in one output
folder, records longer than the model's positions), `generate` against the position limit, numpy step counts and
config fields set after loading, the command-line scripts' argument errors, and the friction of convert and the
trainer's warnings. Each test fails without its fix."""

import logging
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import make_batch
from vedas_hf.convert import check_checkpoint_argument, convert_checkpoint
from vedas_hf.data import build_stage_example, example_length, normalize_record
from vedas_hf.testing import build_tiny_processor, make_tiny_checkpoint, make_tiny_images
from vedas_hf.toy import make_digit_arithmetic, toy_sft_config
from vedas_hf.trainer import CHECKPOINTING_FIELD, CurriculumCallback, VedasSFTConfig, VedasSFTTrainer


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_args(output_dir, **overrides):
    defaults = dict(output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=2e-3, num_train_epochs=1,
                    epochs_per_stage=1, max_latent_stage=1, report_to="none", seed=0, use_cpu=True, bf16=False,
                    save_strategy="no", dataloader_num_workers=0, **{CHECKPOINTING_FIELD: False})
    return VedasSFTConfig(**{**defaults, **overrides})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, backbone):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("guards"), backbone=backbone, seed=0, replay_top_k=3,
                                router_top_k=2, num_latent_steps=2)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_dir).eval(), AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def records():
    return make_digit_arithmetic(8, 0, seed=0, digit_size=24, rows=1)[0]


def prompt(processor):
    return dict(make_batch(processor, ["What is it?"], [make_tiny_images(1, sizes=((48, 32),), seed=1)]))


# ---- the trainer refuses what would fail late ------------------------------------------------------------------------


def test_trainer_refuses_a_stock_model_naming_convert(stock_dir, processor, records, tmp_path, stock_class):
    stock = stock_class.from_pretrained(stock_dir)
    with pytest.raises(ValueError, match=r"not a Vedas one.*python -m vedas_hf.convert"):
        VedasSFTTrainer(model=stock, args=cpu_args(tmp_path), train_dataset=records, processing_class=processor)


def test_trainer_refuses_a_tokenizer_without_the_latent_tokens(tiny_dir, backbone, records, tmp_path):
    """A stock processor (no `<|latent|>`) with a converted model: caught when the trainer is built, not when the
    first latent stage starts."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    stock_processor = build_tiny_processor(backbone=backbone, add_latent_tokens=False)
    with pytest.raises(ValueError, match=r"maps '<\|latent\|>' to None .* load the processor from the converted"):
        VedasSFTTrainer(model=model, args=cpu_args(tmp_path), train_dataset=records, processing_class=stock_processor)


HOLD_LOCK = """
import sys, time
from vedas_hf.trainer import OutputDirLock
lock = OutputDirLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_in_the_same_output_dir_fails_at_once_naming_the_first(tiny_dir, records, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
        trainer = VedasSFTTrainer(model=model, args=cpu_args(tmp_path), train_dataset=records,
                                  processing_class=AutoProcessor.from_pretrained(tiny_dir))
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match=rf"in use by another training run \(process {holder.pid} on "):
            trainer.train()
        assert trainer.state.global_step == 0
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # nothing trained
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its process: the folder is free again, and a finished run releases it too
    trainer.train()
    assert trainer.state.global_step > 0
    trainer.train()  # the same folder again, after the first run ended


def test_finished_output_folder_keeps_no_staging_folder(tiny_dir, records, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    trainer = VedasSFTTrainer(model=model, args=cpu_args(tmp_path, save_strategy="steps", save_steps=1),
                              train_dataset=records, processing_class=AutoProcessor.from_pretrained(tiny_dir))
    trainer.train()
    names = set(os.listdir(tmp_path))
    assert {"checkpoint-1", "checkpoint-2"} <= names and ".staging" not in names


# ---- records longer than the model's positions --------------------------------------------------------------------


def test_example_length_counts_what_rendering_gives(processor):
    images = make_tiny_images(2, sizes=((48, 32), (32, 64)), seed=0)
    cases = [
        {"question": "two images?", "steps": ["a b c", "d e"], "answer": "x", "images": images},
        {"question": "text only", "steps": ["one", "two", "three"], "answer": "42"},
        {"question": "one image", "steps": ["s"], "answer": "yes", "image": images[1]},
    ]
    for index, raw in enumerate(cases):
        record = normalize_record(raw, index, max_steps=4)
        for stage in range(4):
            for mode in ("latent", "cot", "no_cot"):
                for markers in (True, False):
                    kwargs = dict(processor=processor, max_latent_stage=2, mode=mode, use_latent_markers=markers)
                    expected = len(build_stage_example(record, stage, **kwargs)["input_ids"])
                    assert example_length(record, stage, **kwargs) == expected, (index, stage, mode, markers)


def test_a_record_longer_than_the_positions_fails_when_the_trainer_is_built(tiny_dir, records, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    limit = model.config.get_text_config().max_position_embeddings
    long = {**records[0], "question": "word " * (limit + 10)}
    with pytest.raises(ValueError, match=rf"Record 2: .*max_position_embeddings={limit}.*set max_length"):
        VedasSFTTrainer(model=model, args=cpu_args(tmp_path), train_dataset=[records[0], records[1], long],
                        processing_class=processor)
    # with truncation configured it trains (the reasoning and answer are cut, the record is kept)
    trainer = VedasSFTTrainer(model=model, args=cpu_args(tmp_path, max_length=limit + 64),
                              train_dataset=[records[0], {**records[1], "steps": ["word " * limit]}],
                              processing_class=processor)
    assert len(trainer.train_dataset[1]["input_ids"]) == limit + 64


def test_max_length_above_the_positions_warns(tiny_dir, records, tmp_path, caplog):
    from transformers.utils import logging as transformers_logging

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    limit = model.config.get_text_config().max_position_embeddings
    transformers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            VedasSFTTrainer(model=model, args=cpu_args(tmp_path, max_length=limit + 1), train_dataset=records,
                            processing_class=AutoProcessor.from_pretrained(tiny_dir))
    finally:
        transformers_logging.disable_propagation()
    assert f"max_length={limit + 1} is above the model's max_position_embeddings={limit}" in caplog.text


# ---- generate ----------------------------------------------------------------------------------------------------


def test_generate_refuses_latent_steps_past_the_position_limit(tiny):
    model, processor = tiny
    limit = model.config.get_text_config().max_position_embeddings
    per_step = model.config.replay_top_k + 1
    with pytest.raises(ValueError, match=rf"num_latent_steps=1000 needs up to \d+ positions.*={limit}"):
        model.generate(**prompt(processor), num_latent_steps=1000, max_new_tokens=2)
    steps = (limit - prompt(processor)["input_ids"].shape[1] - 2 - 2) // per_step  # the most that fit
    out = model.generate(**prompt(processor), num_latent_steps=steps, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == prompt(processor)["input_ids"].shape[1] + 2
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(**prompt(processor), num_latent_steps=steps + 1, max_new_tokens=2)


@pytest.mark.parametrize("steps", [np.int64(2), np.int32(2), torch.tensor(2)])
def test_generate_takes_numpy_and_tensor_step_counts(tiny, steps):
    model, processor = tiny
    expected = model.generate(**prompt(processor), num_latent_steps=2, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(
        model.generate(**prompt(processor), num_latent_steps=steps, max_new_tokens=3, do_sample=False), expected
    )


def test_config_fields_set_after_loading_are_validated(tiny_dir, processor):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    model.config.replay_top_k = 0  # bypasses the config's __init__
    with pytest.raises(ValueError, match="replay_top_k=0 must be an integer >= 1"):
        model.generate(**prompt(processor), num_latent_steps=1, max_new_tokens=2)
    config = model.config
    batch = prompt(processor)
    suffix = torch.tensor([[config.start_latent_token_id, config.latent_token_id, config.end_latent_token_id, 5]])
    with pytest.raises(ValueError, match="replay_top_k=0"):
        model(input_ids=torch.cat([batch["input_ids"], suffix], dim=1), pixel_values=batch["pixel_values"],
              image_grid_thw=batch.get("image_grid_thw"))


# ---- scripts and configuration ------------------------------------------------------------------------------------


def _sft(argv):
    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        import sft
    finally:
        sys.path.pop(0)
    return sft.main(argv)


def test_sft_with_a_dataset_but_no_model_is_refused(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "q", "steps": ["a"], "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"--dataset_path .* needs --model_name_or_path"):
        _sft(["--dataset_path", str(data), "--output_dir", str(tmp_path / "out"), "--bf16", "False"])
    assert not (tmp_path / "out").exists()


def test_a_mistyped_checkpoint_folder_is_named(tmp_path, tiny_dir):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "vedas-tiny").mkdir()
    (tmp_path / "runs" / "vedas-tiny" / "final").mkdir()
    typo = str(tmp_path / "runs" / "vedas-tinny")
    with pytest.raises(ValueError, match=r"no such folder \(folders in .*\['vedas-tiny'\]\)"):
        check_checkpoint_argument(typo, "--model_name_or_path")
    with pytest.raises(ValueError, match=r"has no config.json \(did you mean its final/ folder\?\)"):
        check_checkpoint_argument(str(tmp_path / "runs" / "vedas-tiny"), "checkpoint")
    check_checkpoint_argument(tiny_dir, "checkpoint")
    check_checkpoint_argument("your-name/vedas-qwen2-vl-2b", "checkpoint")  # a Hub id is left to the Hub
    with pytest.raises(ValueError, match="no such folder"):
        _sft(["--model_name_or_path", typo, "--output_dir", str(tmp_path / "out")])
    eval_script = os.path.join(REPO, "examples", "eval.py")
    result = subprocess.run([sys.executable, eval_script, typo], capture_output=True, text=True)
    assert result.returncode != 0 and "no such folder" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default bf16 is valid with a GPU")
def test_bf16_default_on_a_cpu_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"pass --bf16 False"):
        VedasSFTConfig(output_dir=str(tmp_path), report_to="none")


def test_default_config_keeps_trls_checkpointing_without_a_deprecation_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = VedasSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
        toy = toy_sft_config(str(tmp_path))
    assert not [w for w in caught if "checkpointing" in str(w.message)]
    assert getattr(args, CHECKPOINTING_FIELD) is True  # TRL's default
    assert getattr(toy, CHECKPOINTING_FIELD) is False
    assert VedasSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                          **{CHECKPOINTING_FIELD: False}).gradient_checkpointing is False


def test_short_schedule_warning_says_what_was_asked(tmp_path, caplog):
    from types import SimpleNamespace

    from transformers.utils import logging as transformers_logging

    args = cpu_args(tmp_path, max_latent_stage=2, max_steps=3)
    callback = CurriculumCallback([], args)
    transformers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            callback.on_train_begin(args, SimpleNamespace(num_train_epochs=1), None)
    finally:
        transformers_logging.disable_propagation()
    assert "(max_steps=3, within epoch 1) ends at curriculum stage 0" in caplog.text
    assert "(1 epochs)" not in caplog.text


def test_convert_reports_the_new_vedas_parameters_as_expected(stock_dir, tmp_path, caplog, capfd):
    with caplog.at_level(logging.INFO, logger="vedas_hf.convert"):
        convert_checkpoint(stock_dir, tmp_path / "vedas")
    assert "Vedas parameters that a stock checkpoint does not have" in caplog.text and "expected" in caplog.text
    captured = capfd.readouterr()
    assert "MISSING" not in captured.out + captured.err and "newly initialized" not in captured.err
