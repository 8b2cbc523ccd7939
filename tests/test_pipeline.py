"""The whole pipeline at CI size (about 6 minutes on 2 CPU cores): pretrain a tiny reader on the bundled
handwritten-digit task, train it through the latent curriculum, and evaluate it with latent `generate` on unseen
handwriting. The latent model must beat chance (10%) by a wide margin."""

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from vedas_hf.eval import evaluate
from vedas_hf.toy import make_digit_arithmetic, pretrain_reader
from vedas_hf.trainer import VedasSFTConfig, VedasSFTTrainer


def test_latent_model_beats_chance_on_the_bundled_task(tmp_path):
    torch.manual_seed(0)
    latent_steps = 2  # two digits: both reading steps become latents at the last stage
    reader = pretrain_reader(
        str(tmp_path / "reader"), num_samples=2000, task_kwargs={"num_digits": 2, "digit_size": 8}, epochs=8, seed=0,
        num_latent_steps=latent_steps, replay_top_k=1, router_top_k=4, recon_window=1,
    )
    train, test = make_digit_arithmetic(2000, 100, seed=0, num_digits=2, digit_size=8)  # one token per digit: fast
    model = AutoModelForImageTextToText.from_pretrained(reader)
    processor = AutoProcessor.from_pretrained(reader)
    args = VedasSFTConfig(
        output_dir=str(tmp_path / "vedas"), max_latent_stage=latent_steps, epochs_per_stage=1,
        num_train_epochs=6, per_device_train_batch_size=32, learning_rate=2e-3,
        lr_scheduler_type="cosine", warmup_steps=20, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, gradient_checkpointing=False, seed=0, disable_tqdm=True,
    )
    trainer = VedasSFTTrainer(model=model, args=args, train_dataset=train, processing_class=processor)
    trainer.train()
    assert trainer.state.log_history[-1]["stage"] == latent_steps

    result = evaluate(trainer.model, processor, test, num_latent_steps=latent_steps, max_new_tokens=48,
                      progress=False)
    # Chance is 10%; P(>= 25 of 100 correct | p = 0.1) < 1e-4.
    assert result["accuracy"] >= 0.25, result["predictions"][:5]
    # The latent model no longer writes the digits it read: the first generated line is the sum.
    assert not any("digit is" in p["text"] for p in result["predictions"])
    assert result["ar_steps"] < 30
