"""See what a Vedas model's latent steps did: one PNG per sample with the image, the visual tokens each step replayed
and its reconstruction window (paper fig. 6), the tokens the LM head reads from each latent (a logit lens), and the
answer.

    python examples/inspect_latents.py runs/vedas-tiny-digits/final --index 0 1 2          # bundled digits test samples
    python examples/inspect_latents.py CKPT --task shapes --index 0
    python examples/inspect_latents.py CKPT --image photo.png --question "How many red cars are there?"

Writes `<output_dir>/sample_<i>.png` (default output_dir: `<checkpoint>/inspect`) and prints each answer. (Not
`inspect.py`: a script of that name would shadow the standard library's `inspect` module, which transformers imports.)
"""

import argparse
import os

from PIL import Image, ImageDraw, ImageFont
from transformers import AutoModelForImageTextToText, AutoProcessor

import vedas_hf  # noqa: F401  (registers the Auto classes)
from vedas_hf.data import NormalizedRecords, chat_prompt, prompt_messages


COLOURS = ("#e6194b", "#f58231", "#ffe119", "#3cb44b", "#42d4f4", "#4363d8", "#911eb4", "#f032e6")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="Vedas checkpoint folder or Hub id (pin --revision for Hub ids)")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--image", default=None, help="an image file (with --question)")
    parser.add_argument("--question", default=None)
    parser.add_argument("--task", default="digits", help="bundled task for --index: digits | shapes")
    parser.add_argument("--num_digits", type=int, default=2, help="digits task: digits per image")
    parser.add_argument("--index", type=int, nargs="+", default=[0], help="test-split samples of the bundled task")
    parser.add_argument("--num_latent_steps", type=int, default=None, help="default: the checkpoint's config")
    parser.add_argument("--probe_top_k", type=int, default=3, help="tokens read from each latent")
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--scale", type=int, default=None, help="pixels per image pixel (default: fit ~320 px)")
    parser.add_argument("--output_dir", default=None)
    args = parser.parse_args(argv)
    if (args.image is None) != (args.question is None):
        parser.error("--image and --question go together")
    return args


def load_samples(args) -> list:
    """`(name, record)` pairs: the given image and question, or the bundled task's test samples at `--index`."""
    if args.image is not None:
        # records carry an answer (evaluation's format); inspection never reads it
        record = {"image": args.image, "question": args.question, "answer": "?"}
        return [(os.path.splitext(os.path.basename(args.image))[0], record)]
    from vedas_hf.toy import make_task

    kwargs = {"num_digits": args.num_digits} if args.task == "digits" else {}
    test = make_task(args.task, 0, max(args.index) + 1, seed=0, **kwargs)[1]
    return [(f"sample_{i}", test[i]) for i in args.index]


def run(model, processor, record, args):
    """Generate with the latent trace and the probe; returns (answer text, trace rows of the sample, merged grid h, w)."""
    prompt = chat_prompt(processor, prompt_messages(record))
    inputs = processor(text=[prompt], images=record["images"], return_tensors="pt").to(model.device)
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True,
                         num_latent_steps=args.num_latent_steps, latent_probe_top_k=args.probe_top_k)
    answer = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    merge = model.config.vision_config.spatial_merge_size
    _, h, w = (inputs["image_grid_thw"][0] // inputs["image_grid_thw"].new_tensor([1, merge, merge])).tolist()
    return answer.strip(), [step[0] for step in out.latent_trace], (h, w)


def _wrap(text: str, width: int) -> list:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def draw(record, answer, rows, grid, cell, tokenizer, scale, path):
    """The picture: the image (nearest-neighbour enlarged) with the merged-token grid, each step's replayed tokens
    filled in its colour and its window outlined, and a text panel with the question, each step's probe and the
    answer. `grid` is the merged grid `(h, w)` and `cell` the pixels per merged cell in the processor's resized image
    (the unit of the trace's boxes)."""
    image = record["images"][0].convert("RGB")
    h, w = grid
    scale = scale or max(1, 320 // max(image.width, image.height))
    big = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    cell_w, cell_h = big.width / w, big.height / h
    overlay = Image.new("RGBA", big.size, (0, 0, 0, 0))
    pen = ImageDraw.Draw(overlay)
    for i in range(1, w):
        pen.line([(i * cell_w, 0), (i * cell_w, big.height)], fill=(128, 128, 128, 110))
    for i in range(1, h):
        pen.line([(0, i * cell_h), (big.width, i * cell_h)], fill=(128, 128, 128, 110))
    for step, row in enumerate(rows):
        colour = COLOURS[step % len(COLOURS)]
        rgb = tuple(int(colour[k : k + 2], 16) for k in (1, 3, 5))
        for index in row["visual_indices"]:
            top, left = divmod(index, w)
            if top < h:  # tokens of the first image
                box = [left * cell_w, top * cell_h, (left + 1) * cell_w, (top + 1) * cell_h]
                pen.rectangle(box, fill=rgb + (70,))
                pen.text((box[0] + 2, box[1] + 1), str(step + 1), fill=rgb + (255,))
        if row.get("box") is not None and row.get("image") in (0, None):
            x0, y0, x1, y1 = row["box"]
            sx, sy = big.width / (w * cell), big.height / (h * cell)
            pen.rectangle([x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1], outline=rgb + (255,), width=3)
    big = Image.alpha_composite(big.convert("RGBA"), overlay).convert("RGB")

    font = ImageFont.load_default()
    lines = [(line, "black") for line in _wrap(f"Q: {record['question']}", 60)]
    for step, row in enumerate(rows):
        colour = COLOURS[step % len(COLOURS)]
        lines.append((f"latent {step + 1}: replayed {len(row['visual_indices'])} visual tokens", colour))
        probe = " | ".join(f"{tokenizer.decode([t])!r} {p:.2f}" for t, p in row.get("probe", []))
        lines += [(f"    reads {line}", colour) for line in _wrap(probe, 54)]
    lines += [(line, "black") for line in _wrap(f"A: {answer}", 60)]
    line_h = 14
    panel = Image.new("RGB", (420, max(big.height, line_h * len(lines) + 16)), "white")
    text = ImageDraw.Draw(panel)
    for i, (line, colour) in enumerate(lines):
        text.text((8, 8 + i * line_h), line, fill=colour, font=font)
    canvas = Image.new("RGB", (big.width + panel.width, max(big.height, panel.height)), "white")
    canvas.paste(big, (0, 0))
    canvas.paste(panel, (big.width, 0))
    canvas.save(path)
    return path


def main(argv=None):
    args = parse_args(argv)
    model = AutoModelForImageTextToText.from_pretrained(args.checkpoint, revision=args.revision,
                                                        trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.checkpoint, revision=args.revision, trust_remote_code=True)
    cell = model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size
    output_dir = args.output_dir or os.path.join(args.checkpoint, "inspect")
    os.makedirs(output_dir, exist_ok=True)
    samples = load_samples(args)
    records = NormalizedRecords([record for _, record in samples], require_steps=False)
    for (name, _), record in zip(samples, records):
        answer, rows, grid = run(model, processor, record, args)
        path = draw(record, answer, rows, grid, cell, processor.tokenizer, args.scale,
                    os.path.join(output_dir, f"{name}.png"))
        print(f"{name}: {answer!r} -> {path}")


if __name__ == "__main__":
    main()
