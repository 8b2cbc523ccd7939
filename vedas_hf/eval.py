"""Evaluation harness (paper table 1 protocol): accuracy, autoregressive steps and wall time per sample.

`evaluate(model, processor, records, num_latent_steps=T)` generates an answer for every canonical record in
batches (left padding), parses the text after the answer prefix and compares it with the record's answer
([`answers_match`]: the option letter when the gold answer is one, else the normalised answer). AR steps are the
latent steps plus the generated tokens up to and including the end of turn.
"""

import re
import time

import torch
from tqdm.auto import tqdm

from .data import NormalizedRecords, chat_prompt, check_image_sizes, prompt_messages


_TRAILING = ".。!?, "
_OPTION = re.compile(r"\(?([A-Za-z])\)?\.?")  # a whole answer that is an option letter: "B", "(B)", "B.", "b"
# an answer that starts with one: "(B) cat", "(b) cat", "C, as" (a bare lower-case letter is a word: "a dog")
_LEADING_OPTION = re.compile(r"(?:\(([A-Za-z])\)|\(?([A-Z])\)?)(?:[.):,\s]|$)")


def extract_answer(text: str, answer_prefix: str = "Answer:") -> str:
    """The answer in a generated `text`: what follows the last `answer_prefix` (the whole text without one),
    first line only, stripped of surrounding spaces and trailing punctuation (`. 。 ! ? ,`)."""
    if answer_prefix and answer_prefix in text:
        text = text.rsplit(answer_prefix, 1)[1]
    text = text.strip().split("\n", 1)[0].strip()
    return text.rstrip(_TRAILING).strip()


def normalize_answer(text) -> str:
    """The form answers are compared in: case-folded, runs of whitespace as one space, no surrounding spaces and no
    trailing `. 。 ! ? ,` (`" New  York. "` -> `"new york"`, `"5."` -> `"5"`)."""
    return " ".join(str(text).split()).rstrip(_TRAILING).strip().casefold()


def option_letter(answer) -> str | None:
    """The upper-case option letter of a gold answer that is one (`"B"`, `"(B)"`, `"B."`, `"b"`), else `None`."""
    match = _OPTION.fullmatch(str(answer).strip())
    return match.group(1).upper() if match else None


def predicted_option_letter(prediction) -> str | None:
    """The option letter a prediction picks: the whole prediction as in [`option_letter`], or a letter that starts
    it, alone or before `.`, `)`, `:`, `,` or a space: upper case (`"(B) cat"`, `"C, because"`, `"A dog"`) or in
    parentheses (`"(b) cat"`)."""
    text = str(prediction).strip()
    whole = option_letter(text)
    if whole is not None:
        return whole
    match = _LEADING_OPTION.match(text)
    return (match.group(1) or match.group(2)).upper() if match else None


def answers_match(prediction: str, answer: str) -> bool:
    """Whether a parsed prediction is the gold `answer`.

    When the gold answer is an option letter (`"B"`, `"(B)"`, `"B."`, see [`option_letter`]), the prediction matches
    if it picks that letter ([`predicted_option_letter`]: `"(B) cat"`, `"B."`, `"b"`). Otherwise both are compared
    whole after [`normalize_answer`] (case, whitespace and trailing punctuation only): `"A dog"` must equal the gold
    `"A dog"`. Numbers are compared as text; records' JSON numbers are written as a model writes them (`3.0` ->
    `"3"`, `vedas_hf.data.answer_text`).
    """
    gold_letter = option_letter(answer)
    if gold_letter is not None:
        return predicted_option_letter(prediction) == gold_letter
    return normalize_answer(prediction) == normalize_answer(answer)


def _evaluation_records(records, processor) -> NormalizedRecords:
    """Evaluation records, normalised as they are read (reasoning steps optional, images decoded per batch);
    `ValueError` for an empty set, and naming the record for a question holding a special token string or an image
    the processor refuses."""
    records = NormalizedRecords(records, require_steps=False, tokenizer=processor.tokenizer, text_fields=("question",),
                                check=lambda record: check_image_sizes(record, processor))
    if len(records) == 0:
        raise ValueError("No records to evaluate: pass at least one record (image, question, answer).")
    return records


def _batches(items, size):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def evaluate(
    model,
    processor,
    records,
    *,
    num_latent_steps: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    answer_prefix: str = "Answer:",
    progress: bool = True,
    **generate_kwargs,
) -> dict:
    """Accuracy, mean AR steps and mean seconds per sample of greedy generation on `records`.

    Args:
        records: canonical records (dicts with `image`/`images`, `question`, `answer`; `steps` / `rationale` are
            not needed), at least one.
        num_latent_steps: latent steps before decoding (0 for the CoT and No-CoT baselines).
        generate_kwargs: more keyword arguments of the model's `generate` (e.g. `latent_inputs="zeros"`).
    Returns:
        `{"accuracy", "ar_steps", "seconds_per_sample", "num_samples", "predictions"}`; `predictions` holds, per
        sample, the generated text, the parsed answer and whether it matched ([`answers_match`]).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    records = _evaluation_records(records, processor)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    eos_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    device = next(model.parameters()).device
    predictions, ar_steps, elapsed = [], [], 0.0
    model.eval()
    batches = _batches(records, batch_size)  # read (images decoded) one batch at a time
    for batch in tqdm(batches, total=-(-len(records) // batch_size), desc="evaluate", disable=not progress):
        prompts = [chat_prompt(processor, prompt_messages(r)) for r in batch]
        images = [image for r in batch for image in r["images"]] or None
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True).to(device)
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             num_latent_steps=num_latent_steps, **generate_kwargs)
        elapsed += time.perf_counter() - start
        new_tokens = out[:, inputs["input_ids"].shape[1] :].tolist()
        for record, tokens in zip(batch, new_tokens):
            length = next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
            text = tokenizer.decode(tokens[:length], skip_special_tokens=True)
            parsed = extract_answer(text, answer_prefix)
            predictions.append({"text": text, "prediction": parsed, "answer": record["answer"],
                                "correct": answers_match(parsed, record["answer"])})
            ar_steps.append(num_latent_steps + length)
    count = len(predictions)
    return {
        "accuracy": sum(p["correct"] for p in predictions) / count,
        "ar_steps": sum(ar_steps) / count,
        "seconds_per_sample": elapsed / count,
        "num_samples": count,
        "predictions": predictions,
    }


def draw_replay_windows(image, trace_rows, path, colours=("red", "orange", "yellow", "lime", "cyan", "magenta")):
    """Save `image` (PIL) with the replay window of every latent step drawn on it (paper fig. 6).

    Args:
        trace_rows: per latent step, the sample's entry of `generate(..., return_dict_in_generate=True).latent_trace`
            (`{"box": (x0, y0, x1, y1), ...}` in the processor's resized pixels), optionally with `scale=(sx, sy)`
            mapping those pixels to `image`'s.
        path: PNG path.
    """
    from PIL import ImageDraw

    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    for step, row in enumerate(trace_rows):
        if row.get("box") is None:
            continue
        sx, sy = row.get("scale", (1.0, 1.0))
        x0, y0, x1, y1 = row["box"]
        draw.rectangle([x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1], outline=colours[step % len(colours)])
    canvas.save(path)
    return path


def window_images(model, processor, records, out_dir, num_latent_steps: int, max_new_tokens: int = 8) -> list:
    """Write one PNG per record (first image) with the replay windows of its latent steps; returns the paths."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    records = NormalizedRecords(records, require_steps=False)
    paths = []
    for index, record in enumerate(records):
        if not record["images"]:
            continue
        prompt = chat_prompt(processor, prompt_messages(record))
        inputs = processor(text=[prompt], images=record["images"], return_tensors="pt")
        out = model.generate(**inputs.to(next(model.parameters()).device), max_new_tokens=max_new_tokens,
                             do_sample=False, num_latent_steps=num_latent_steps, return_dict_in_generate=True)
        image = record["images"][0]
        if "image_grid_thw" in inputs:  # Qwen2-VL: the resized image is the patch grid
            patch = model.config.vision_config.patch_size
            _, h, w = inputs["image_grid_thw"][0].tolist()
            width, height = w * patch, h * patch
        else:  # Chameleon: the processed image itself
            height, width = inputs["pixel_values"].shape[-2:]
        scale = (image.width / width, image.height / height)
        rows = [dict(step[0], scale=scale) for step in out.latent_trace if step[0].get("image") in (0, None)]
        paths.append(draw_replay_windows(image, rows, os.path.join(out_dir, f"sample_{index:04d}.png")))
    return paths


def markdown_table(rows: dict) -> str:
    """`{name: evaluate() result}` -> a Markdown table (accuracy %, AR steps, ms per sample)."""
    lines = ["| method | accuracy (%) | # AR steps | time / sample (ms) |", "|---|---:|---:|---:|"]
    for name, result in rows.items():
        lines.append(
            f"| {name} | {100 * result['accuracy']:.1f} | {result['ar_steps']:.1f} | "
            f"{1000 * result['seconds_per_sample']:.1f} |"
        )
    return "\n".join(lines)


__all__ = [
    "answers_match",
    "draw_replay_windows",
    "evaluate",
    "extract_answer",
    "markdown_table",
    "normalize_answer",
    "option_letter",
    "predicted_option_letter",
    "window_images",
]
