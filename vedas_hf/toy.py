"""Bundled tasks, built at run time from real images shipped inside registry packages (no download).

Primary, `make_digit_arithmetic`: arithmetic over real handwritten digits (scikit-learn's `load_digits`, 1797 8x8
scans). Each sample shows `num_digits` handwritten digits from left to right and asks for `(a + b) * c mod 10` (with three
digits); the reasoning steps read the digits and do the arithmetic, so a model that reads the image step by step can
answer while a direct answer needs all of it at once. Train and test draw digits from disjoint pools of source scans,
so test digits are unseen handwriting.

Layout: a grid of `rows x num_digits` square tiles of `digit_size` pixels; column i holds the i-th digit in a random
row (the other tiles are blank). With the tiny checkpoints of `vedas_hf.testing` (4x4
patches merged 2x2, i.e. 8 pixels per visual token) and the default `digit_size=8`, every tile is exactly one visual
token: the model has to find the digits among blank tokens, which is what visual replay selects.

Secondary, `make_shape_panels`: counting over easy-VQA images (package `easy-vqa`, real 64x64 renders of one coloured
shape each, with real questions). Shape and colour of each image are recovered from its own questions; panels of
several images side by side ask "How many panels show a circle?" (or a colour), with one step per panel.

`reading_records` turns either task into its reading version ("what is in the image, left to right") and
`pretrain_reader` teaches a tiny model that reading, as the stand-in for a pretrained VLM.
"""

import functools
import random

import numpy as np
import torch
from PIL import Image


ORDINALS = ("first", "second", "third", "fourth", "fifth")


def _digit_pools(seed: int, test_fraction: float, validation_fraction: float = 0.0):
    """Scans and labels, then disjoint pools of scan indices: train, validation (a share of the non-test scans;
    empty when `validation_fraction` is 0) and test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = list(range(len(digits.target)))
    random.Random(seed).shuffle(order)
    cut = int(len(order) * (1 - test_fraction))
    held = int(cut * validation_fraction)
    return digits.images, digits.target, order[: cut - held], order[cut - held : cut], order[cut:]


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


def _question_and_steps(values: list[int], operation: str) -> tuple[str, list[str], str]:
    names = "abcde"[: len(values)]
    reads = [f"The {ORDINALS[i]} digit is {v}." for i, v in enumerate(values)]
    if operation == "mixed" and len(values) == 3:
        a, b, c = values
        question = "Let a, b, c be the digits from left to right. What is (a + b) * c mod 10?"
        total = a + b
        steps = reads + [f"{a} + {b} = {total}.", f"{total} * {c} = {total * c}, mod 10 is {total * c % 10}."]
        return question, steps, str(total * c % 10)
    question = f"Let {', '.join(names)} be the digits from left to right. What is their sum mod 10?"
    if operation == "mixed":  # two digits: the whole sum in one step
        total = sum(values)
        return question, reads + [f"{' + '.join(map(str, values))} = {total}, mod 10 is {total % 10}."], str(total % 10)
    # "sum": a running total, one addition of two numbers per step
    total, adds = values[0], []
    for value in values[1:]:
        adds.append(f"{total} + {value} = {total + value}")
        total += value
    adds[-1] += f", mod 10 is {total % 10}"
    return question, reads + [f"{add}." for add in adds], str(total % 10)


def _samples(n, pool, images, labels, rng, num_digits, digit_size, rows, operation):
    out = []
    for _ in range(n):
        sources = [pool[rng.randrange(len(pool))] for _ in range(num_digits)]
        values = [int(labels[s]) for s in sources]
        question, steps, answer = _question_and_steps(values, operation)
        out.append({
            "image": _render([images[s] for s in sources], digit_size, rows, rng),
            "question": question,
            "steps": steps,
            "answer": answer,
            "label_digits": values,
            "source_ids": sources,
            "reading_question": "Read the digits from left to right.",
            "reading": " ".join(map(str, values)),
        })
    return out


def make_digit_arithmetic(
    n_train: int,
    n_test: int,
    *,
    seed: int = 0,
    num_digits: int = 3,
    digit_size: int = 16,
    rows: int = 2,
    test_fraction: float = 0.2,
    operation: str = "mixed",
) -> tuple[list[dict], list[dict]]:
    """Generate the train and test splits (canonical records plus `label_digits` and `source_ids`).

    Args:
        num_digits: digits per image (3: `(a + b) * c mod 10`; otherwise the sum mod 10), at most 5.
        digit_size: side of each tile in pixels (8 keeps the 8x8 scans as they are; larger sizes upscale them). The
            default 16 makes each digit 2 x 2 merged visual tokens with the tiny checkpoints of `vedas_hf.testing`.
        rows: tile rows; each digit sits in a random one (1: digits side by side on one row).
        test_fraction: share of source scans reserved for the test split.
        operation: `"mixed"` asks `(a + b) * c mod 10` of three digits, `"sum"` the sum of the digits mod 10 (two or
            more digits always ask the sum).
    """
    splits = _digit_splits({"train": n_train, "test": n_test}, seed=seed, num_digits=num_digits,
                           digit_size=digit_size, rows=rows, test_fraction=test_fraction, operation=operation)
    return splits["train"], splits["test"]


def _digit_splits(sizes: dict, *, seed, num_digits=3, digit_size=16, rows=2, test_fraction=0.2,
                  validation_fraction=0.0, operation="mixed") -> dict:
    """`{split: records}` for `sizes` `{split: n}` over "train", "validation", "test"; each split draws its digits
    from its own pool of source scans."""
    if not 2 <= num_digits <= len(ORDINALS):
        raise ValueError(f"num_digits={num_digits} must be between 2 and {len(ORDINALS)}.")
    if digit_size < 8:
        raise ValueError(f"digit_size={digit_size} must be >= 8 (the scans are 8x8).")
    if rows < 1:
        raise ValueError(f"rows={rows} must be >= 1.")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1).")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1).")
    if operation not in ("mixed", "sum"):
        raise ValueError(f"operation={operation!r} is not supported; use 'mixed' or 'sum'.")
    images, labels, *pools = _digit_pools(seed, test_fraction, validation_fraction)
    pools = dict(zip(("train", "validation", "test"), pools))
    rng = random.Random(seed + 1)
    return {split: _samples(n, pools[split], images, labels, rng, num_digits, digit_size, rows, operation)
            for split, n in sizes.items()}


SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
NEGATIONS = {"not", "no"}


def _easy_vqa_labels(split: str) -> dict[int, tuple[str, str]]:
    """`{image_id: (shape, colour)}` for the easy-VQA images of `split` whose questions pin both down.

    Every easy-VQA image holds one shape; its questions either name the answer ("what shape is in the image?" ->
    "circle"), name the attribute in the question ("what color is the triangle?" -> "blue"), or are yes/no with or
    without a negation. Words of true statements are collected; images left ambiguous (about 11%) are skipped.
    """
    import easy_vqa

    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    found = {}
    for question, answer, image_id in zip(questions, answers, image_ids):
        words = question.rstrip("?").split()
        if answer in ("yes", "no") and (answer == "yes") == bool(NEGATIONS & set(words)):
            continue  # a false statement ("is there a red shape?" -> "no") says nothing about what is there
        shapes, colors = found.setdefault(image_id, (set(), set()))
        shapes.update(w for w in words + [answer] if w in SHAPES)
        colors.update(w for w in words + [answer] if w in COLORS)
    return {i: (s.pop(), c.pop()) for i, (s, c) in found.items() if len(s) == 1 and len(c) == 1}


@functools.lru_cache(maxsize=4)
def _shape_pool(split: str, panel_size: int) -> tuple[list[Image.Image], list[tuple[str, str]]]:
    import easy_vqa

    labels = _easy_vqa_labels(split)
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    ids = sorted(i for i in labels if i in paths)
    images = []
    for i in ids:
        with Image.open(paths[i]) as image:
            images.append(image.convert("RGB").resize((panel_size, panel_size), Image.BOX))
    return images, [labels[i] for i in ids]


def _shape_samples(n, images, labels, rng, num_panels, panel_size):
    # index of the pool by (attribute, value): attribute 0 is the shape, 1 the colour
    keys = [(a, v) for a, values in ((0, SHAPES), (1, COLORS)) for v in values]
    having = {(a, v): [i for i, label in enumerate(labels) if label[a] == v] for a, v in keys}
    lacking = {(a, v): [i for i, label in enumerate(labels) if label[a] != v] for a, v in keys}
    out = []
    for _ in range(n):
        attribute = rng.randrange(2)
        target = rng.choice(COLORS if attribute else SHAPES)
        count = rng.randrange(num_panels + 1)  # uniform answers: no count is a safe guess
        chosen = set(rng.sample(range(num_panels), count))
        pools = [having[attribute, target] if p in chosen else lacking[attribute, target] for p in range(num_panels)]
        sources = [rng.choice(pool) for pool in pools]
        panels = [labels[s] for s in sources]
        noun = f"a {target} shape" if attribute else f"a {target}"
        canvas = Image.new("RGB", (panel_size * num_panels, panel_size))
        for column, source in enumerate(sources):
            canvas.paste(images[source], (column * panel_size, 0))
        steps = [f"Panel {i + 1} shows a {color} {shape}." for i, (shape, color) in enumerate(panels)]
        steps.append(f"{count} panel{'' if count == 1 else 's'} show{'s' if count == 1 else ''} {noun}.")
        out.append({
            "image": canvas,
            "question": f"How many panels show {noun}?",
            "steps": steps,
            "answer": str(count),
            "panel_labels": panels,
            "source_ids": sources,
            "reading_question": "Name the shapes from left to right.",
            "reading": ", ".join(f"{color} {shape}" for shape, color in panels),
        })
    return out


def make_shape_panels(
    n_train: int, n_test: int, *, seed: int = 0, num_panels: int = 3, panel_size: int = 16
) -> tuple[list[dict], list[dict]]:
    """Generate the train and test splits of the easy-VQA counting task (canonical records plus `panel_labels`, a
    `(shape, colour)` per panel, and `source_ids`, indices into the split's labelled images).

    Train panels come from easy-VQA's train images and test panels from its test images, so test shapes are unseen
    renders. Half of the questions count a shape, half a colour; the answer is uniform over `0..num_panels`, so
    always giving one count scores `1 / (num_panels + 1)`.

    Args:
        num_panels: images side by side, between 2 and 9.
        panel_size: side of each panel in pixels (the 64x64 renders are box-downsampled); 16 gives 2x2 visual
            tokens per panel with the tiny checkpoints of `vedas_hf.testing`.
    """
    splits = _shape_splits({"train": n_train, "test": n_test}, seed=seed, num_panels=num_panels,
                           panel_size=panel_size)
    return splits["train"], splits["test"]


def _shape_splits(sizes: dict, *, seed, num_panels=3, panel_size=16, validation_fraction=0.0) -> dict:
    """`{split: records}` for `sizes` `{split: n}` over "train", "validation", "test": the validation panels are a
    share of easy-VQA's train renders (held out of the train split), the test panels its test renders."""
    if not 2 <= num_panels <= 9:
        raise ValueError(f"num_panels={num_panels} must be between 2 and 9.")
    if not 8 <= panel_size <= 64:
        raise ValueError(f"panel_size={panel_size} must be between 8 and 64 (the easy-VQA renders are 64x64).")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1).")
    rng = random.Random(seed)
    out = {}
    for split, n in sizes.items():
        source = "test" if split == "test" else "train"
        images, labels = _shape_pool(source, panel_size) if n else ([], [])  # decoding PNGs takes seconds
        if source == "train" and validation_fraction and n:
            order = list(range(len(labels)))
            random.Random(seed).shuffle(order)
            held = int(len(order) * validation_fraction)
            keep = sorted(order[:held]) if split == "validation" else sorted(order[held:])
            images, labels = [images[i] for i in keep], [labels[i] for i in keep]
        out[split] = _shape_samples(n, images, labels, rng, num_panels, panel_size)
    return out


TASKS = {"digits": make_digit_arithmetic, "shapes": make_shape_panels}
_TASK_SPLITS = {"digits": _digit_splits, "shapes": _shape_splits}
# Reader pretraining epochs per task: the shapes reader learns slower (it names 36% of the test panels' colour and
# shape words after 8 epochs and 57% after 16, still rising), so it gets more.
READER_EPOCHS = {"digits": 8, "shapes": 32}
# The share of the training source images (digit scans, shape renders) held out for the validation split.
VALIDATION_FRACTION = 0.15


def make_task(task: str, n_train: int, n_test: int, *, seed: int = 0, **task_kwargs) -> tuple[list[dict], list[dict]]:
    """`make_digit_arithmetic` (`task="digits"`) or `make_shape_panels` (`task="shapes"`)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not a bundled task; choose one of {sorted(TASKS)}.")
    return TASKS[task](n_train, n_test, seed=seed, **task_kwargs)


def make_task_splits(task: str, n_train: int, n_validation: int, n_test: int, *, seed: int = 0,
                     validation_fraction: float = VALIDATION_FRACTION, **task_kwargs) -> dict:
    """Train, validation and test splits of a bundled task: `{"train", "validation", "test"}` -> records.

    The validation split is carved from the training data: its digits (or shape renders) come from a share
    `validation_fraction` of the training source images, held out of the train split, so hyperparameters can be
    chosen on unseen images without touching the test split.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not a bundled task; choose one of {sorted(TASKS)}.")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction={validation_fraction} must be in (0, 1).")
    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    return _TASK_SPLITS[task](sizes, seed=seed, validation_fraction=validation_fraction, **task_kwargs)


def reading_records(records: list[dict]) -> list[dict]:
    """The reading version of task `records` (either task): same images, the record's `reading_question` ("Read the
    digits from left to right." / "Name the shapes from left to right.") and its `reading` as the answer (e.g.
    `"3 5 8"` / `"blue circle, red triangle, gray circle"`). Used to pretrain the tiny base model."""
    out = []
    for record in records:
        out.append({**record, "question": record["reading_question"], "steps": [f"It reads: {record['reading']}."],
                    "answer": record["reading"]})
    return out


def toy_sft_config(output_dir: str, **fields):
    """`VedasSFTConfig` for training on a bundled task: lr 2e-3 cosine with 20 warmup steps, batch 32, no
    checkpoints or reports, float32 (TRL's `SFTConfig` defaults to bf16, which on the CPU means bf16 autocast at
    about 5x the step time), activation checkpointing off (TRL's default is on; a tiny model does not need the
    memory and the recompute costs time), on the CPU unless a GPU is present. `fields` override any of these."""
    from .trainer import CHECKPOINTING_FIELD, VedasSFTConfig

    defaults = dict(
        learning_rate=2e-3, per_device_train_batch_size=32, lr_scheduler_type="cosine", warmup_steps=20,
        logging_steps=50, save_strategy="no", report_to="none", bf16=False, use_cpu=not torch.cuda.is_available(),
    )
    if not {"activation_checkpointing", "gradient_checkpointing"} & set(fields):
        defaults[CHECKPOINTING_FIELD] = False
    return VedasSFTConfig(output_dir=output_dir, **{**defaults, **fields})


def pretrain_reader(
    output_dir: str,
    *,
    task: str = "digits",
    num_samples: int = 4000,
    task_kwargs: dict | None = None,
    epochs: int | None = None,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    seed: int = 0,
    stock_overrides: dict | None = None,
    validation_fraction: float = 0.0,
    **vedas_overrides,
) -> str:
    """Build a tiny Vedas checkpoint and teach it to read the images of a bundled task (answer-only training on
    `reading_records` of the train split), as a stand-in for the pretrained VLM every method of the paper starts from:
    the comparisons that follow then measure reasoning rather than learning to see from scratch. Test-split scans
    are never shown. About 2 minutes (digits) or 9 minutes (shapes) on 2 CPU cores with the defaults.

    Args:
        output_dir: the initial checkpoint goes to `<output_dir>/init`, the reader to `<output_dir>/final`.
        task: `"digits"` or `"shapes"` (see `make_task`); `task_kwargs` go to its generator (e.g. `num_digits=2`).
        epochs: training epochs; `None` takes the task's entry in `READER_EPOCHS` (8 for digits, 32 for shapes).
        validation_fraction: the share of the training source images held out for a validation split (as in
            `make_task_splits`): the reader never sees them either, so validation scores are on unseen images.
        vedas_overrides: Vedas config fields of the checkpoint (e.g. `num_latent_steps=3, replay_top_k=1`).
    Returns:
        The reader checkpoint folder.
    """
    import os

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .testing import make_tiny_checkpoint
    from .trainer import VedasSFTTrainer

    if validation_fraction:
        train = make_task_splits(task, num_samples, 0, 0, seed=seed, validation_fraction=validation_fraction,
                                 **(task_kwargs or {}))["train"]
    else:
        train, _ = make_task(task, num_samples, 0, seed=seed, **(task_kwargs or {}))
    epochs = READER_EPOCHS[task] if epochs is None else epochs
    init = make_tiny_checkpoint(os.path.join(output_dir, "init"), seed=seed, stock_overrides=stock_overrides,
                                **vedas_overrides)
    model = AutoModelForImageTextToText.from_pretrained(init)
    processor = AutoProcessor.from_pretrained(init)
    args = toy_sft_config(output_dir, no_cot_baseline=True, num_train_epochs=epochs,
                          per_device_train_batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    trainer = VedasSFTTrainer(model=model, args=args, train_dataset=reading_records(train), processing_class=processor)
    trainer.train()
    final = os.path.join(output_dir, "final")
    trainer.save_model(final)
    processor.save_pretrained(final)
    return final


__all__ = [
    "make_digit_arithmetic", "make_shape_panels", "make_task", "make_task_splits", "pretrain_reader", "reading_records", "toy_sft_config",
]
