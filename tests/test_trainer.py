"""VedasSFTTrainer: loss decreases, trainable parameters change (frozen ones do not), the curriculum advances on
schedule and survives resume, saved checkpoints reload in a fresh process, two-process accelerate launch."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

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
    assert logs[-1]["ce_loss"] < logs[0]["ce_loss"]
