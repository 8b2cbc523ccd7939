"""Bundled task: arithmetic over real handwritten digits (scikit-learn's `load_digits`, 1797 8x8 scans shipped
inside the package, no download).

Each sample shows `num_digits` handwritten digits from left to right and asks for `(a + b) * c mod 10` (with three
digits); the reasoning steps read the digits and do the arithmetic, so a model that reads the image step by step can
answer while a direct answer needs all of it at once. Train and test draw digits from disjoint pools of source scans,
so test digits are unseen handwriting.

Layout: a grid of `rows x num_digits` square tiles of `digit_size` pixels; column i holds the i-th digit in a random
row (the other tiles are blank). With the tiny checkpoints of `vedas_hf.testing` (4x4
patches merged 2x2, i.e. 8 pixels per visual token) and the default `digit_size=8`, every tile is exactly one visual
token: the model has to find the digits among blank tokens, which is what visual replay selects.
"""

import random

import numpy as np
import torch
from PIL import Image


ORDINALS = ("first", "second", "third", "fourth", "fifth")


def _digit_pools(seed: int, test_fraction: float):
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = list(range(len(digits.target)))
    random.Random(seed).shuffle(order)
    cut = int(len(order) * (1 - test_fraction))
    return digits.images, digits.target, order[:cut], order[cut:]


def _render(scans, digit_size: int, rows: int, rng: random.Random) -> Image.Image:
    """Digits left to right, each in a random row, on a dark canvas: `(digit_size * rows, digit_size * n)` RGB with
    light strokes."""
    image = Image.new("L", (digit_size * len(scans), digit_size * rows))
    for column, scan in enumerate(scans):
        tile = Image.fromarray((scan * (255.0 / 16.0)).astype(np.uint8))
        if digit_size != tile.width:
            tile = tile.resize((digit_size, digit_size), Image.BILINEAR)
        image.paste(tile, (column * digit_size, rng.randrange(rows) * digit_size))
    return image.convert("RGB")


def _question_and_steps(values: list[int]) -> tuple[str, list[str], str]:
    names = "abcde"[: len(values)]
    reads = [f"The {ORDINALS[i]} digit is {v}." for i, v in enumerate(values)]
    if len(values) == 3:
        a, b, c = values
        question = "Let a, b, c be the digits from left to right. What is (a + b) * c mod 10?"
        total = a + b
        steps = reads + [f"{a} + {b} = {total}.", f"{total} * {c} = {total * c}, mod 10 is {total * c % 10}."]
        return question, steps, str(total * c % 10)
    question = f"Let {', '.join(names)} be the digits from left to right. What is their sum mod 10?"
    total = sum(values)
    steps = reads + [f"{' + '.join(map(str, values))} = {total}, mod 10 is {total % 10}."]
    return question, steps, str(total % 10)


def _samples(n, pool, images, labels, rng, num_digits, digit_size, rows):
    out = []
    for _ in range(n):
        sources = [pool[rng.randrange(len(pool))] for _ in range(num_digits)]
        values = [int(labels[s]) for s in sources]
        question, steps, answer = _question_and_steps(values)
        out.append({
            "image": _render([images[s] for s in sources], digit_size, rows, rng),
            "question": question,
            "steps": steps,
            "answer": answer,
            "label_digits": values,
            "source_ids": sources,
        })
    return out


def make_digit_arithmetic(
    n_train: int,
    n_test: int,
    *,
    seed: int = 0,
    num_digits: int = 3,
    digit_size: int = 8,
    rows: int = 2,
    test_fraction: float = 0.2,
) -> tuple[list[dict], list[dict]]:
    """Generate the train and test splits (canonical records plus `label_digits` and `source_ids`).

    Args:
        num_digits: digits per image (3: `(a + b) * c mod 10`; otherwise the sum mod 10), at most 5.
        digit_size: side of each tile in pixels (8 keeps the 8x8 scans as they are; larger sizes upscale them).
        rows: tile rows; each digit sits in a random one (1: digits side by side on one row).
        test_fraction: share of source scans reserved for the test split.
    """
    if not 2 <= num_digits <= len(ORDINALS):
        raise ValueError(f"num_digits={num_digits} must be between 2 and {len(ORDINALS)}.")
    if digit_size < 8:
        raise ValueError(f"digit_size={digit_size} must be >= 8 (the scans are 8x8).")
    if rows < 1:
        raise ValueError(f"rows={rows} must be >= 1.")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1).")
    images, labels, train_pool, test_pool = _digit_pools(seed, test_fraction)
    rng = random.Random(seed + 1)
    train = _samples(n_train, train_pool, images, labels, rng, num_digits, digit_size, rows)
    test = _samples(n_test, test_pool, images, labels, rng, num_digits, digit_size, rows)
    return train, test


def reading_records(records: list[dict]) -> list[dict]:
    """The digit-reading version of task `records`: same images, question "Read the digits from left to right.",
    answer the digits separated by spaces (e.g. `"3 5 8"`). Used to pretrain the tiny base model."""
    out = []
    for record in records:
        digits = " ".join(map(str, record["label_digits"]))
        out.append({
            "image": record["image"],
            "question": "Read the digits from left to right.",
            "steps": [f"The digits are {digits}."],
            "answer": digits,
            "label_digits": record["label_digits"],
            "source_ids": record["source_ids"],
        })
    return out


def pretrain_digit_reader(
    output_dir: str,
    *,
    num_samples: int = 4000,
    num_digits: int = 3,
    epochs: int = 8,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    seed: int = 0,
    stock_overrides: dict | None = None,
    **vedas_overrides,
) -> str:
    """Build a tiny Vedas checkpoint and teach it to read the digits of the bundled task (answer-only training on
    `reading_records` of the train split), as a stand-in for the pretrained VLM every method of the paper starts from:
    the comparisons that follow then measure reasoning rather than learning to see from scratch. Test-split scans
    are never shown. About 2 minutes on 2 CPU cores with the defaults.

    Args:
        output_dir: the initial checkpoint goes to `<output_dir>/init`, the reader to `<output_dir>/final`.
        vedas_overrides: Vedas config fields of the checkpoint (e.g. `num_latent_steps=3, replay_top_k=1`).
    Returns:
        The reader checkpoint folder.
    """
    import os

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .testing import make_tiny_checkpoint
    from .trainer import VedasSFTConfig, VedasSFTTrainer

    train, _ = make_digit_arithmetic(num_samples, 0, seed=seed, num_digits=num_digits)
    init = make_tiny_checkpoint(os.path.join(output_dir, "init"), seed=seed, stock_overrides=stock_overrides,
                                **vedas_overrides)
    model = AutoModelForImageTextToText.from_pretrained(init)
    processor = AutoProcessor.from_pretrained(init)
    args = VedasSFTConfig(
        output_dir=output_dir, no_cot_baseline=True, num_train_epochs=epochs, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=20, logging_steps=50,
        save_strategy="no", report_to="none", seed=seed, bf16=False, use_cpu=not torch.cuda.is_available(),
    )
    trainer = VedasSFTTrainer(model=model, args=args, train_dataset=reading_records(train), processing_class=processor)
    trainer.train()
    final = os.path.join(output_dir, "final")
    trainer.save_model(final)
    processor.save_pretrained(final)
    return final


__all__ = ["make_digit_arithmetic", "pretrain_digit_reader", "reading_records"]
