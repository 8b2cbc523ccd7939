"""Bundled task: arithmetic over real handwritten digits (scikit-learn's `load_digits`, 1797 8x8 scans shipped
inside the package, no download).

Each sample shows `num_digits` handwritten digits side by side and asks for `(a + b) * c mod 10` (with three digits);
the reasoning steps read the digits and do the arithmetic, so a model that reads the image step by step can answer
while a direct answer needs all of it at once. Train and test draw digits from disjoint pools of source scans, so
test digits are unseen handwriting.
"""

import random

import numpy as np
from PIL import Image


ORDINALS = ("first", "second", "third", "fourth", "fifth")


def _digit_pools(seed: int, test_fraction: float):
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = list(range(len(digits.target)))
    random.Random(seed).shuffle(order)
    cut = int(len(order) * (1 - test_fraction))
    return digits.images, digits.target, order[:cut], order[cut:]


def _render(scans, digit_size: int, rng: random.Random) -> Image.Image:
    """Digits side by side on a dark canvas: `(digit_size, digit_size * n)` RGB, light strokes."""
    tiles = []
    for scan in scans:
        tile = Image.fromarray((scan * (255.0 / 16.0)).astype(np.uint8)).resize((digit_size, digit_size), Image.BILINEAR)
        shift = rng.randint(-1, 1), rng.randint(-1, 1)
        canvas = Image.new("L", (digit_size, digit_size))
        canvas.paste(tile, shift)
        tiles.append(canvas)
    image = Image.new("L", (digit_size * len(tiles), digit_size))
    for i, tile in enumerate(tiles):
        image.paste(tile, (i * digit_size, 0))
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


def _samples(n, pool, images, labels, rng, num_digits, digit_size):
    out = []
    for _ in range(n):
        sources = [pool[rng.randrange(len(pool))] for _ in range(num_digits)]
        values = [int(labels[s]) for s in sources]
        question, steps, answer = _question_and_steps(values)
        out.append({
            "image": _render([images[s] for s in sources], digit_size, rng),
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
    digit_size: int = 24,
    test_fraction: float = 0.2,
) -> tuple[list[dict], list[dict]]:
    """Generate the train and test splits (canonical records plus `label_digits` and `source_ids`).

    Args:
        num_digits: digits per image (3: `(a + b) * c mod 10`; otherwise the sum mod 10), at most 5.
        digit_size: side of each digit tile in pixels (the 8x8 scans are upscaled).
        test_fraction: share of source scans reserved for the test split.
    """
    if not 2 <= num_digits <= len(ORDINALS):
        raise ValueError(f"num_digits={num_digits} must be between 2 and {len(ORDINALS)}.")
    if digit_size < 8:
        raise ValueError(f"digit_size={digit_size} must be >= 8 (the scans are 8x8).")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1).")
    images, labels, train_pool, test_pool = _digit_pools(seed, test_fraction)
    rng = random.Random(seed + 1)
    train = _samples(n_train, train_pool, images, labels, rng, num_digits, digit_size)
    test = _samples(n_test, test_pool, images, labels, rng, num_digits, digit_size)
    return train, test


__all__ = ["make_digit_arithmetic"]
