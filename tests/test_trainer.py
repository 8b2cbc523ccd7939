"""VedasSFTTrainer: loss decreases, trainable parameters change (frozen ones do not), the curriculum advances on
schedule and survives resume, saved checkpoints reload in a fresh process, two-process accelerate launch."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

from vedas_hf.data import IGNORE_INDEX, VedasDataCollator
from vedas_hf.toy import make_digit_arithmetic
from vedas_hf.trainer import VedasSFTConfig, VedasSFTTrainer, vedas_lora_config
from vedas_hf.testing import make_tiny_checkpoint


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("trainer_init"), seed=0, replay_top_k=4, router_top_k=6,
                                num_latent_steps=2)


@pytest.fixture(scope="module")
def records():
    train, _ = make_digit_arithmetic(24, 0, seed=0, digit_size=24, rows=1)
    return train


def make_args(output_dir, **overrides):
    defaults = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, learning_rate=2e-3, num_train_epochs=3,
        epochs_per_stage=1, max_latent_stage=2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to="none", seed=0, bf16=False, use_cpu=True, dataloader_num_workers=0, gradient_checkpointing=False,
    )
    return VedasSFTConfig(**{**defaults, **overrides})


class StageRecorder(TrainerCallback):
    def __init__(self, trainer_ref):
        self.trainer_ref, self.stages = trainer_ref, []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.stages.append(self.trainer_ref[0].curriculum_callback.stage)


def load(path):
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
    return model, AutoProcessor.from_pretrained(path)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="exclusive"):
        make_args(tmp_path, cot_baseline=True, no_cot_baseline=True)
    with pytest.raises(ValueError, match="epochs_per_stage=0"):
        make_args(tmp_path, epochs_per_stage=0)
    args = make_args(tmp_path, epochs_per_stage=2, max_latent_stage=3)
    assert [args.stage_for_epoch(e) for e in range(9)] == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert make_args(tmp_path, curriculum=False).stage_for_epoch(0) == 2
    assert make_args(tmp_path, cot_baseline=True).stage_for_epoch(7) == 0
    assert args.remove_unused_columns is False
    assert VedasSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True).gradient_checkpointing  # TRL default
    with pytest.raises(ValueError, match="recon_crop_size=0"):
        make_args(tmp_path, recon_crop_size=0)


@pytest.mark.parametrize("overrides, message", [
    ({"packing": True}, "packing=True is not supported: the latent curriculum renders"),
    ({"padding_free": True}, "padding_free=True is not supported: .* Set padding_free=False"),
    ({"dataloader_num_workers": 1, "dataloader_persistent_workers": True},
     "dataloader_persistent_workers=True: persistent workers keep the curriculum stage .* Set "
     "dataloader_persistent_workers=False"),
], ids=["packing", "padding_free", "persistent_workers"])
def test_config_rejects_what_the_curriculum_cannot_honour(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_dataloader_workers_render_the_current_stage(tiny_dir, records, tmp_path):
    """Workers re-created every epoch render the stage the main process set; persistent workers are accepted where
    the stage never changes (`curriculum=False`: the last stage from the first batch on)."""
    for persistent, curriculum, expected in ((False, True, [0, 0, 1, 1]), (True, False, [2, 2, 2, 2])):
        model, processor = load(tiny_dir)
        args = make_args(tmp_path / str(persistent), num_train_epochs=2, per_device_train_batch_size=4,
                         dataloader_num_workers=1, dataloader_persistent_workers=persistent, curriculum=curriculum)
        trainer = VedasSFTTrainer(model=model, args=args, train_dataset=records[:8], processing_class=processor)
        latents, compute_loss = [], trainer.compute_loss

        def recording(model, inputs, *args, **kwargs):
            latents.append(int((inputs["input_ids"] == model.config.latent_token_id).sum(1).max()))
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = recording
        trainer.train()
        assert latents == expected
        assert [log["stage"] for log in trainer.state.log_history if "stage" in log] == expected


def test_records_a_later_stage_would_refuse_fail_before_training(tiny_dir, records, tmp_path):
    """An image the image processor refuses, and a `max_length` that fits stage 0 but not the last stage of the
    schedule, are errors when the trainer is built (they used to stop training when that record or stage came)."""
    from PIL import Image

    from vedas_hf.data import build_stage_example, normalize_record
    from vedas_hf.trainer import curriculum_dataset

    processor = AutoProcessor.from_pretrained(tiny_dir)
    thin = [*records[:3], {**records[3], "image": Image.new("RGB", (3000, 5))}]
    with pytest.raises(ValueError, match=r"Record 3: image 0 \(3000 x 5 px\) is refused by the image processor \("
                                         r"absolute aspect ratio must be smaller than 200.*\); crop or pad it"):
        VedasSFTTrainer(model=AutoModelForImageTextToText.from_pretrained(tiny_dir, trust_remote_code=True),
                        args=make_args(tmp_path), train_dataset=thin, processing_class=processor)

    def untrained_prefix(stage):  # prompt, images and latent block: the tokens before the first label
        example = build_stage_example(normalize_record(records[0], 0), stage, processor=processor, max_latent_stage=2)
        return next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)

    limit = untrained_prefix(2)  # no room for a target token at the last stage (2), room at stage 0
    assert untrained_prefix(0) < limit
    build_stage_example(normalize_record(records[0], 0), 0, processor=processor, max_latent_stage=2, max_length=limit)
    with pytest.raises(ValueError, match=rf"Record 0: at curriculum stage 2: .*max_length={limit}"):
        curriculum_dataset(records[:2], processor, make_args(tmp_path, max_length=limit))
    curriculum_dataset(records[:2], processor, make_args(tmp_path, max_length=limit, max_latent_stage=1))
    # a schedule that ends before the last stage is checked at the stage it ends at (here 1 epoch: stage 0)
    assert make_args(tmp_path, num_train_epochs=1).last_stage == 0 and make_args(tmp_path).last_stage == 2
    curriculum_dataset(records[:2], processor, make_args(tmp_path, max_length=limit, num_train_epochs=1))


def test_mixed_image_and_text_batches_use_the_images(tiny_dir, tmp_path):
    """A batch of records with and without images, text-only first, fetched from the curriculum dataset as the
    DataLoader does: the image rows get their pixels and every row's loss equals its loss in a batch of its own."""
    from vedas_hf.trainer import curriculum_dataset

    train, _ = make_digit_arithmetic(4, 0, seed=0, digit_size=24, rows=1)
    mixed = [{**record, "image": None} if i % 2 == 0 else record for i, record in enumerate(train)]
    model, processor = load(tiny_dir)
    dataset, _ = curriculum_dataset(mixed, processor, make_args(tmp_path), stage=2)
    collator = VedasDataCollator(processor)
    model.eval()

    def run(indices):
        batch = collator(dataset.__getitems__(indices))
        with torch.no_grad():
            return batch, model(**batch).loss.item(), int((batch["labels"] != IGNORE_INDEX).sum())

    batch, loss, _ = run([0, 1, 2, 3])
    assert batch["image_grid_thw"].tolist() == [dataset[1]["image_grid_thw"][0].tolist(),
                                                dataset[3]["image_grid_thw"][0].tolist()]
    assert torch.equal(batch["pixel_values"], torch.cat([dataset[1]["pixel_values"], dataset[3]["pixel_values"]]))
    singles = [run([i])[1:] for i in range(4)]  # the model's loss is a mean over the labelled tokens
    assert loss == pytest.approx(sum(l * n for l, n in singles) / sum(n for _, n in singles), rel=1e-5)


def test_saved_config_runs_the_latent_steps_training_taught(tiny_dir, records, tmp_path):
    """`num_latent_steps` of the saved config (what plain `generate()` and `examples/eval.py` run) is
    `max_latent_stage`, 0 for the baselines; the tiny checkpoint starts at 2."""
    for overrides, steps in (({"max_latent_stage": 1}, 1), ({"cot_baseline": True}, 0), ({"no_cot_baseline": True}, 0),
                             ({"max_latent_stage": 3}, 3)):
        model, processor = load(tiny_dir)
        assert model.config.num_latent_steps == 2
        trainer = VedasSFTTrainer(model=model, args=make_args(tmp_path, **overrides), train_dataset=records[:4],
                                  processing_class=processor)
        trainer.save_model(tmp_path / "final")
        assert json.loads((tmp_path / "final" / "config.json").read_text())["num_latent_steps"] == steps, overrides


def test_max_length_truncates_rendered_examples(tiny_dir, records, tmp_path):
    from vedas_hf.trainer import StageRenderer

    _, processor = load(tiny_dir)
    full = StageRenderer(records[:1], processor, make_args(tmp_path, max_length=None)).example(0)
    cut = StageRenderer(records[:1], processor, make_args(tmp_path, max_length=len(full["input_ids"]) - 3)).example(0)
    assert cut["input_ids"] == full["input_ids"][:-3] and cut["labels"] == full["labels"][:-3]
    prompt = full["labels"].index(next(label for label in full["labels"] if label != IGNORE_INDEX))
    # no room for a target token: an error when the renderer is built (checked at the schedule's last stage, 2)
    with pytest.raises(ValueError, match=r"Record 0: at curriculum stage 2: An example of \d+ tokens .* "
                                         f"max_length={prompt - 1}"):
        StageRenderer(records[:1], processor, make_args(tmp_path, max_length=prompt - 1))


def test_eval_dataset_dict_is_evaluated_by_name(tiny_dir, records, tmp_path):
    _, test = make_digit_arithmetic(0, 4, seed=5, digit_size=24, rows=1)
    model, processor = load(tiny_dir)
    args = make_args(tmp_path, per_device_eval_batch_size=4)
    metrics = VedasSFTTrainer(model=model, args=args, train_dataset=records[:4],
                              eval_dataset={"all": test, "half": test[:2]}, processing_class=processor).evaluate()
    for name, subset in (("all", test), ("half", test[:2])):
        alone = VedasSFTTrainer(model=model, args=args, train_dataset=records[:4], eval_dataset=subset,
                                processing_class=processor).evaluate()
        assert metrics[f"eval_{name}_loss"] == pytest.approx(alone["eval_loss"], rel=1e-6)
    assert metrics["eval_all_loss"] != metrics["eval_half_loss"]


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_load_best_model_at_end_restores_the_best_checkpoint(tiny_dir, records, tmp_path, peft):
    """With `greater_is_better=True` on a falling eval loss the best checkpoint is the first, not the last: after
    training the parameters equal that checkpoint's exactly."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    _, test = make_digit_arithmetic(0, 4, seed=5, digit_size=24, rows=1)
    model, processor = load(tiny_dir)
    args = make_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                     load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = VedasSFTTrainer(model=model, args=args, train_dataset=records[:16], eval_dataset=test,
                              processing_class=processor, peft_config=vedas_lora_config(r=4, lora_alpha=8) if peft else None)
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    if peft:
        weights = {step: load_file(tmp_path / f"checkpoint-{step}" / "adapter_model.safetensors") for step in (2, 4)}
        current = get_peft_model_state_dict(trainer.model)
    else:
        weights = {step: load(tmp_path / f"checkpoint-{step}")[0].state_dict() for step in (2, 4)}
        current = trainer.model.state_dict()
    assert weights[2].keys() <= current.keys()
    assert all(torch.equal(current[key], value) for key, value in weights[2].items())
    assert not all(torch.equal(current[key], value) for key, value in weights[4].items())
    assert trainer.evaluate()["eval_loss"] == pytest.approx(trainer.state.best_metric, rel=1e-6)


def test_recon_crop_size_argument_sets_the_model_config(tiny_dir, records, tmp_path):
    model, processor = load(tiny_dir)
    cell = model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size
    with pytest.raises(ValueError, match=f"recon_crop_size={cell + 1} .* = {cell} pixels"):
        VedasSFTTrainer(model=model, args=make_args(tmp_path, recon_crop_size=cell + 1), train_dataset=records,
                        processing_class=processor)
    assert model.config.recon_crop_size is None  # left as it was
    trainer = VedasSFTTrainer(model=model, args=make_args(tmp_path, recon_crop_size=2 * cell, max_steps=2,
                                                                 curriculum=False),
                              train_dataset=records[:8], processing_class=processor,
                              peft_config=vedas_lora_config(r=4, lora_alpha=8))
    assert trainer.model.get_base_model().config.recon_crop_size == 2 * cell
    trainer.train()
    assert trainer.state.global_step == 2
    recon = [log["recon_loss"] for log in trainer.state.log_history if "recon_loss" in log]
    assert len(recon) == 2 and all(value > 0 for value in recon)


def test_default_schedule_is_the_whole_curriculum(tmp_path):
    base = dict(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True)
    assert VedasSFTConfig(**base).num_train_epochs == (4 + 1) * 4
    assert VedasSFTConfig(**base, epochs_per_stage=2, max_latent_stage=3).num_train_epochs == 8
    assert VedasSFTConfig(**base, curriculum=False).num_train_epochs == 3.0  # the transformers default
    assert VedasSFTConfig(**base, cot_baseline=True).num_train_epochs == 3.0
    assert VedasSFTConfig(**base, num_train_epochs=5).num_train_epochs == 5


def test_short_schedule_runs_the_stage_it_reached_and_adapters_keep_it(tiny_dir, records, tmp_path):
    """2 epochs of a 3-stage curriculum end at stage 1: a warning, every checkpoint's config says the stage it was
    trained at, evaluation renders stage 1, and the adapter folder (loaded onto the base, whose config says 2)
    runs 1 latent step."""
    from transformers.testing_utils import CaptureLogger

    from vedas_hf import trainer as trainer_module
    from vedas_hf.push import check_folder

    model, processor = load(tiny_dir)
    assert model.config.num_latent_steps == 2
    args = make_args(tmp_path / "run", num_train_epochs=2, epochs_per_stage=1, max_latent_stage=2,
                     save_strategy="epoch", eval_strategy="epoch", per_device_eval_batch_size=4)
    trainer = VedasSFTTrainer(model=model, args=args, train_dataset=records[:8], eval_dataset=records[8:12],
                              processing_class=processor, peft_config=vedas_lora_config(r=4, lora_alpha=8))
    with CaptureLogger(trainer_module.logger) as captured:
        trainer.train()
    assert "ends at curriculum stage 1, before max_latent_stage=2" in captured.out
    assert trainer.eval_stage == 1
    assert [log["eval_stage"] for log in trainer.state.log_history if "eval_stage" in log] == [1.0, 1.0]
    saved = [json.loads((tmp_path / "run" / f"checkpoint-{step}" / "generation_config.json").read_text())
             ["num_latent_steps"] for step in (1, 2)]
    assert saved == [0, 1]
    trainer.save_model(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "adapter", trust_remote_code=True)
    assert reloaded.config.num_latent_steps == 1
    with pytest.raises(ValueError, match="PEFT adapter; merge it first"):
        check_folder(tmp_path / "adapter")


def test_lora_training_loss_decreases_and_trainable_parameters_change(tiny_dir, records, tmp_path):
    model, processor = load(tiny_dir)
    args = make_args(tmp_path, num_train_epochs=12, epochs_per_stage=4, learning_rate=1e-2)
    trainer_ref = []
    recorder = StageRecorder(trainer_ref)
    trainer = VedasSFTTrainer(model=model, args=args, train_dataset=records, processing_class=processor,
                              peft_config=vedas_lora_config(r=8, lora_alpha=16), callbacks=[recorder])
    trainer_ref.append(trainer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    assert recorder.stages == [0] * 4 + [1] * 4 + [2] * 4
    losses = [log["ce_loss"] for log in trainer.state.log_history if "ce_loss" in log]
    stages = [log["stage"] for log in trainer.state.log_history if "stage" in log]
    stage2 = [loss for loss, stage in zip(losses, stages) if stage == 2]
    assert stage2[-1] < stage2[0]  # learning continues after the last latent is introduced
    # LoRA on a random-init tiny backbone (frozen embeddings and head) learns slowly but steadily:
    # measured 5.99 -> 5.38 (mean of the first / last three steps); full fine-tuning is checked below.
    assert sum(losses[-3:]) / 3 < 0.92 * sum(losses[:3]) / 3
    assert any("recon_loss" in log for log in trainer.state.log_history)

    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and trainable <= changed
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert any("router" in n and "gate" in n for n in trainable)
    assert any("router" in n and "score" in n for n in trainable)
    assert any("token_sr" in n for n in trainable)
    assert not any(".visual." in n for n in trainable | changed)
    assert not any("lora" in n and ".visual." in n for n in before)

    # save_model (adapter) and merge_and_unload both give folders that load with trust_remote_code
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    trainer.save_model(adapter_dir)
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(merged_dir)
    processor.save_pretrained(merged_dir)
    check_fresh_process_generate(merged_dir, tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(adapter_dir, trust_remote_code=True)
    reference = AutoModelForImageTextToText.from_pretrained(merged_dir, trust_remote_code=True)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4)


def test_activation_checkpointing_trains_exactly_like_plain_training(tiny_dir, records, tmp_path):
    """TRL's default `gradient_checkpointing=True` with LoRA (dropout 0.05) at the last stage (2 latents,
    reconstruction on): the same losses and the same trained parameters as without checkpointing. (Dropout is what
    caught a replay drawing different random numbers than the first run.)"""

    def run(checkpointing):
        model, processor = load(tiny_dir)
        args = make_args(tmp_path / str(checkpointing), max_steps=3, curriculum=False,
                         gradient_checkpointing=checkpointing)
        trainer = VedasSFTTrainer(model=model, args=args, train_dataset=records[:24], processing_class=processor,
                                  peft_config=vedas_lora_config(r=4, lora_alpha=8))
        trainer.train()
        layer = trainer.model.get_base_model().model.language_model.layers[0]
        logs = [value for log in trainer.state.log_history if "ce_loss" in log for value in (log["ce_loss"], log["recon_loss"])]
        trained = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
        return layer.gradient_checkpointing, logs, trained

    enabled, logs, trained = run(True)
    disabled, reference_logs, reference = run(False)
    assert enabled and not disabled
    assert len(logs) == 2 * 3 and logs == pytest.approx(reference_logs, rel=1e-5)
    assert trained.keys() == reference.keys()
    # Adam turns any gradient difference on the zero-initialised gates into a step-sized one (lr = 2e-3 per step)
    assert all(value.abs().max() > 1e-3 for name, value in trained.items() if name.endswith("gate"))
    for name, value in trained.items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_checkpoint_wrapped_layers_train_latent_free_batches(tiny_dir, records, tmp_path):
    """FSDP-style checkpoint wrappers leave the layers' `gradient_checkpointing` flag off, so nothing in the model
    knows a stock (stage 0, latent-free) batch is replayed; `compute_loss` passes `use_cache=False` as TRL does, so
    no cache is written twice and the losses equal unwrapped training."""
    from test_latent import CheckpointWrapper

    def run(wrapped):
        model, processor = load(tiny_dir)
        layers = model.model.language_model.layers
        for i in range(len(layers) if wrapped else 0):
            layers[i] = CheckpointWrapper(layers[i])
        args = make_args(tmp_path / str(wrapped), max_steps=2, epochs_per_stage=100)  # stage 0 throughout
        trainer = VedasSFTTrainer(model=model, args=args, train_dataset=records, processing_class=processor)
        trainer.train()
        logs = [log for log in trainer.state.log_history if "loss" in log]
        return [log["stage"] for log in logs], [log["loss"] for log in logs]

    stages, losses = run(True)
    assert stages == [0, 0]
    assert losses == pytest.approx(run(False)[1], rel=1e-6)


def test_evaluate_reports_the_final_stage_loss(tiny_dir, tmp_path):
    """`eval_dataset` is rendered at the last curriculum stage: `evaluate()` gives the model's own loss on that batch
    (eval mode, so CE only), whatever stage training is at."""
    from vedas_hf.data import VedasDataCollator
    from vedas_hf.trainer import StageRenderer

    train, test = make_digit_arithmetic(8, 5, seed=3, digit_size=24, rows=1)
    model, processor = load(tiny_dir)
    args = make_args(tmp_path, per_device_eval_batch_size=len(test))
    trainer = VedasSFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                              processing_class=processor)
    metrics = trainer.evaluate()
    renderer = StageRenderer(test, processor, args, stage=args.max_latent_stage)
    batch = VedasDataCollator(processor)([renderer.example(i) for i in range(len(test))])
    model.eval()
    with torch.no_grad():
        expected = model(**batch)
    assert (batch["input_ids"] == model.config.latent_token_id).sum(1).tolist() == [args.max_latent_stage] * len(test)
    assert expected.recon_loss is None
    assert metrics["eval_stage"] == args.max_latent_stage and trainer.curriculum_callback.stage in (None, 0)
    assert metrics["eval_loss"] == pytest.approx(expected.loss.item(), rel=1e-5)
    assert metrics["eval_ce_loss"] == pytest.approx(expected.loss.item(), rel=1e-5)


def check_fresh_process_generate(path, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["vedas_hf"] = None
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from PIL import Image
        model = AutoModelForImageTextToText.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(path)!r})
        messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What?"}}]}}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[Image.new("RGB", (72, 24))], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, num_latent_steps=2)
        print("GEN", out.shape[1] - inputs["input_ids"].shape[1])
        """
    )
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GEN 4" in result.stdout


def test_full_finetune_changes_every_parameter_group(tiny_dir, records, tmp_path):
    model, processor = load(tiny_dir)
    args = make_args(tmp_path, num_train_epochs=6, curriculum=False)
    trainer = VedasSFTTrainer(model=model, args=args, train_dataset=records[:16], processing_class=processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    losses = [log["ce_loss"] for log in trainer.state.log_history if "ce_loss" in log]
    print("FULL", [round(x, 3) for x in losses])
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2  # at the final stage (2 latents) throughout
    for name in ("router.gate", "router.score.weight", "token_sr.net.weight", "visual.blocks.0.attn.qkv.weight",
                 "language_model.layers.0.self_attn.q_proj.weight"):
        assert any(name in n and not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()), name


def test_resume_mid_stage_continues_identically(tiny_dir, records, tmp_path):
    def run(output_dir, resume=None, max_steps=-1):
        model, processor = load(tiny_dir)
        args = make_args(output_dir, num_train_epochs=4, epochs_per_stage=2, save_strategy="steps", save_steps=5,
                         max_steps=max_steps)
        trainer = VedasSFTTrainer(model=model, args=args, train_dataset=records, processing_class=processor)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    run(tmp_path / "interrupted", max_steps=5)  # stops mid stage 1 (3 steps per epoch, epoch 1 of stage 0..)
    checkpoint = tmp_path / "interrupted" / "checkpoint-5"
    assert (checkpoint / "model.safetensors").is_file()
    resumed = run(tmp_path / "interrupted", resume=str(checkpoint))
    assert resumed.curriculum_callback.stage == full.curriculum_callback.stage == 1
    full_losses = [log["loss"] for log in full.state.log_history if "loss" in log]
    resumed_losses = [log["loss"] for log in resumed.state.log_history if "loss" in log]
    assert resumed_losses == pytest.approx(full_losses[-len(resumed_losses):], rel=1e-4)
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", os.path.join(REPO, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sft_script_evaluates_and_resumes_from_the_last_checkpoint(tiny_dir, tmp_path):
    """`--eval_strategy steps` evaluates the eval split during training; `--resume_from_checkpoint True` continues
    from the last checkpoint in output_dir (checkpoint-2 is not re-trained, so not re-written); the final config runs
    the trained number of latent steps."""
    argv = ["--model_name_or_path", str(tiny_dir), "--output_dir", str(tmp_path), "--num_train_samples", "8",
            "--num_eval_samples", "2", "--toy_digit_size", "24", "--toy_rows", "1", "--per_device_train_batch_size", "4",
            "--max_latent_stage", "1", "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "steps",
            "--eval_steps", "2", "--logging_steps", "1", "--eval_max_new_tokens", "2", "--use_cpu"]
    sft = load_script("sft")
    first = sft.main([*argv, "--max_steps", "2"])
    assert [log["step"] for log in first.state.log_history if "eval_loss" in log] == [2]
    (tmp_path / "checkpoint-2" / "marker").write_text("first run")
    resumed = sft.main([*argv, "--max_steps", "4", "--resume_from_checkpoint", "True"])
    assert (tmp_path / "checkpoint-2" / "marker").is_file()
    assert resumed.state.global_step == 4
    assert [log["step"] for log in resumed.state.log_history if "eval_loss" in log] == [2, 4]
    assert json.loads((tmp_path / "final" / "config.json").read_text())["num_latent_steps"] == 1


def test_two_process_accelerate_launch(tiny_dir, tmp_path):
    config = os.path.join(REPO, "examples", "accelerate_configs", "cpu_two_processes.yaml")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
        os.path.join(REPO, "examples", "sft.py"), "--model_name_or_path", str(tiny_dir),
        "--output_dir", str(tmp_path / "ddp"), "--num_train_samples", "16", "--num_eval_samples", "0",
        "--per_device_train_batch_size", "4", "--num_train_epochs", "2", "--epochs_per_stage", "1",
        "--max_latent_stage", "1", "--save_strategy", "no", "--use_cpu", "--toy_digit_size", "24", "--toy_rows", "1",
        "--gradient_checkpointing",  # DDP with non-reentrant checkpointing through the latent passes
    ]
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "ddp" / "final" / "model.safetensors").is_file()


def test_qwen2_5_vl_backbone_trains_through_the_curriculum(records, tmp_path):
    path = make_tiny_checkpoint(tmp_path / "init", backbone="qwen2_5_vl", seed=0, replay_top_k=4, router_top_k=6,
                                num_latent_steps=2)
    model, processor = load(path)
    assert type(model).__name__ == "VedasQwen2_5_VLForConditionalGeneration"
    args = make_args(tmp_path / "out", num_train_epochs=4, epochs_per_stage=1)
    trainer = VedasSFTTrainer(model=model, args=args, train_dataset=records[:16], processing_class=processor)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "ce_loss" in log]
    assert [log["stage"] for log in logs] == [0.0] * 2 + [1.0] * 2 + [2.0] * 4
    assert all(log["recon_loss"] > 0 for log in logs if log["stage"] > 0)
    # within one stage (the same 16 records, two batches per epoch): the last epoch's loss is below the one before
    third, fourth = logs[4:6], logs[6:8]
    assert sum(log["ce_loss"] for log in fourth) < sum(log["ce_loss"] for log in third)


@pytest.mark.parametrize("stage", [0, 2], ids=["stock_batches", "latent_with_recon"])
def test_gradient_accumulation_equals_one_large_batch(tiny_dir, records, tmp_path, stage):
    """Two micro-batches of 4 with gradient accumulation give the loss and the SGD step of one batch of 8, although
    the micro-batches hold different numbers of label tokens (token-sum cross-entropy over the Trainer's count,
    reconstruction mean divided by the number of micro-batches)."""
    rows = [{**r, "steps": r["steps"][: 1 + (i % 2) * 4]} for i, r in enumerate(records[:8])]
    rows = sorted(rows, key=lambda r: len(r["steps"]))  # short targets in the first micro-batch, long in the second

    def one_step(batch_size, accumulation):
        model, processor = load(tiny_dir)
        args = make_args(tmp_path / f"ga{accumulation}", per_device_train_batch_size=batch_size,
                         gradient_accumulation_steps=accumulation, max_steps=1, curriculum=False,
                         max_latent_stage=stage, learning_rate=1e-2, optim="sgd", max_grad_norm=0)
        trainer = VedasSFTTrainer(model=model, args=args, train_dataset=rows, processing_class=processor)
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
        trainer.train()
        return trainer.state.log_history[0], {n: p.detach().clone() for n, p in model.named_parameters()}

    (large_log, large), (accumulated_log, accumulated) = one_step(8, 1), one_step(4, 2)
    assert accumulated_log["loss"] == pytest.approx(large_log["loss"], rel=1e-5)
    if stage:
        assert accumulated_log["recon_loss"] == pytest.approx(large_log["recon_loss"], rel=1e-5)
    moved = max((large[n] - p).abs().max().item() for n, p in load(tiny_dir)[0].named_parameters())
    assert moved > 1e-4  # the step did something
    assert max((large[n] - accumulated[n]).abs().max().item() for n in large) < 1e-6
