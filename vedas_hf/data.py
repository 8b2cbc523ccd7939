"""Chain-of-thought records, dataset adapters, curriculum stages and the batch collator.

Canonical record (a dict): `image` (PIL image, path, or None) or `images` (list), `question`, `steps` (list of str) or
`rationale` (str, split on blank lines into at most `max_steps` steps, paper fig. 3), `answer`.

Stage k of the curriculum replaces the first k steps with k `<|latent|>` tokens between `<|start-latent|>` and
`<|end-latent|>`; labels cover the remaining steps, the answer and the end of turn only.
"""

import io
import json
import math
import numbers
import operator
import struct
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps


START_LATENT, LATENT, END_LATENT = "<|start-latent|>", "<|latent|>", "<|end-latent|>"
END_OF_TURN = "<|im_end|>"
IGNORE_INDEX = -100
DATA_MODES = ("latent", "cot", "no_cot")


# ---- records -------------------------------------------------------------------------------------------------


def _check_max_steps(max_steps) -> None:
    if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) or max_steps < 1:
        raise ValueError(
            f"max_steps={max_steps!r} must be an integer >= 1 (the most reasoning steps a rationale is split into; "
            "`max_reasoning_steps` in VedasSFTConfig)."
        )


_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def split_rationale(text: str, max_steps: int) -> list[str]:
    """Split on blank lines (also with Windows CR LF line ends, and lines holding only spaces or tabs); when there are
    more than `max_steps` pieces, merge neighbours into `max_steps` steps of roughly equal length (in characters).
    `max_steps` below 1 is a `ValueError`."""
    _check_max_steps(max_steps)
    pieces = [p.strip() for p in _BLANK_LINE.split(text.replace("\r\n", "\n")) if p.strip()]
    if len(pieces) <= max_steps:
        return pieces
    total = sum(len(p) for p in pieces)
    steps, current, consumed = [], [], 0
    for i, piece in enumerate(pieces):
        current.append(piece)
        consumed += len(piece)
        remaining_pieces, remaining_steps = len(pieces) - i - 1, max_steps - len(steps) - 1
        boundary = consumed >= total * (len(steps) + 1) / max_steps
        if remaining_steps > 0 and (boundary or remaining_pieces == remaining_steps):
            steps.append("\n".join(current))
            current = []
    steps.append("\n".join(current))
    return steps


def _deep_grey_to_8_bit(image: Image.Image) -> Image.Image:
    """Mode "F" (float), "I" (32-bit) or "I;16*" (16-bit) greyscale as 8-bit "L" (a plain conversion clips: floats in
    0..1 become black, 16-bit values white). "F": values within 0..1 are scaled by 255, within 0..255 kept; "I;16*":
    scaled by 65535 (the type's max); "I": kept up to 255, else scaled by the image's max. Negative, NaN or infinite
    values (and floats above 255) are a `ValueError` naming the mode and the value range."""
    values = np.asarray(image, dtype=np.float32)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (math.nan, math.nan)
    if finite.size < values.size or low < 0 or (image.mode == "F" and high > 255):
        invalid = " and NaN or infinite values" if finite.size < values.size else ""
        raise ValueError(
            f"mode {image.mode!r} image has values from {low:g} to {high:g}{invalid}, outside the ranges read as "
            "grey levels (floats within 0..1 or 0..255, non-negative integers); rescale it to 8-bit (0..255) and "
            "save it as PNG or JPEG"
        )
    if image.mode.startswith("I;16"):
        scale = 255 / 65535
    elif image.mode == "F" and high <= 1:
        scale = 255.0
    else:  # "F" within 0..255, or "I"
        scale = 255 / high if high > 255 else 1.0
    return Image.fromarray((values * scale).round().clip(0, 255).astype(np.uint8))


def _to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of `image` as the model should see it: EXIF orientation applied (as `datasets` decodes images;
    unreadable EXIF is ignored), float and 16/32-bit greyscale scaled to 8 bits (see [`_deep_grey_to_8_bit`]),
    transparency composited onto white (as transformers' image processors do; dropping the alpha channel would leave
    what is under it, often black)."""
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, struct.error):  # unreadable EXIF: the pixels are still fine
        pass
    if image.mode == "F" or image.mode.startswith("I"):
        image = _deep_grey_to_8_bit(image)
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _over_pixel_limit(index: int, name: str, error: Exception) -> str:
    """The message for PIL's decompression bomb guard refusing image `name` of record `index`."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = found.group(1) if found else "more"
    return (
        f"Record {index}: image {name!r} has {pixels} pixels, over PIL's limit PIL.Image.MAX_IMAGE_PIXELS="
        f"{Image.MAX_IMAGE_PIXELS} (a guard against decompression bombs). Downscale the image, or, if you trust the "
        f"file, raise the limit before loading the data: PIL.Image.MAX_IMAGE_PIXELS = {pixels if found else 'None'}."
    )


def _open_image(source, name: str, index: int) -> Image.Image:
    """`source` (a path, a file object or a PIL image) decoded to RGB (see [`_to_rgb`]); a `ValueError` naming the
    record and `name` for an unreadable image and for one over PIL's pixel limit (`PIL.Image.MAX_IMAGE_PIXELS`; PIL
    itself only warns up to twice the limit)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                return _to_rgb(source)
            with Image.open(source) as opened:
                return _to_rgb(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(_over_pixel_limit(index, name, error)) from None
    except (OSError, ValueError) as error:
        raise ValueError(f"Record {index}: cannot read image {name!r} ({error}).") from error


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def _check_not_url(image, index: int) -> None:
    """A `ValueError` naming the record for an image path that is a URL (`https://`, `s3://`, any `scheme://`): path
    joining would mangle it (`https:/...`) into a missing file."""
    if isinstance(image, str) and _URL.match(image):
        raise ValueError(
            f"Record {index}: image {image!r} is a URL; remote images are not downloaded (loading data never reaches "
            "the network). Download the images and point the record to the local files (paths relative to the data "
            "file's folder, or absolute; for a file:// URL, its path)."
        )


def _load_image(image, index: int, base_dir: Path | None):
    """A record's image (a PIL image, a path, or a `datasets` `Image(decode=False)` value `{"bytes", "path"}`) as
    RGB (see [`_to_rgb`]); a URL is a `ValueError` (see [`_check_not_url`])."""
    lazy = isinstance(image, ImageFile.ImageFile) and getattr(image, "fp", None) is not None
    if lazy and image.filename and image.tell() == 0:
        image = image.filename  # opened lazily: read from its file, so the caller's object is not loaded (and kept)
    if isinstance(image, Image.Image):
        return _open_image(image, getattr(image, "filename", "") or "<PIL image>", index)
    if isinstance(image, dict) and image and set(image) <= {"bytes", "path"}:
        if isinstance(image.get("bytes"), (bytes, bytearray, memoryview)):
            return _open_image(io.BytesIO(image["bytes"]), image.get("path") or "<image bytes>", index)
        if image.get("bytes") is not None or image.get("path") is None:
            raise ValueError(
                f"Record {index}: an image value {{'bytes', 'path'}} needs bytes or a path, got bytes of type "
                f"{type(image.get('bytes')).__name__} and path {image.get('path')!r}."
            )
        image = image["path"]
    if isinstance(image, (str, Path)):
        _check_not_url(image, index)
        path = Path(image)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return _open_image(path, str(path), index)
    raise ValueError(
        f"Record {index}: field 'image' must be a PIL image, a path or a `datasets` image value ({{'bytes', 'path'}}), "
        f"got {type(image).__name__}."
    )


MESSAGES_HINT = (
    " This looks like a TRL conversational record (`messages`); Vedas needs the reasoning as separate fields: map "
    "each record to {'image' or 'images', 'question': the user text, 'steps' (list) or 'rationale': the reasoning, "
    "'answer'}."
)


def _text_field(record: dict, name: str, index: int) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        hint = MESSAGES_HINT if "messages" in record else ""
        raise ValueError(f"Record {index}: field {name!r} must be a non-empty string, got {value!r}.{hint}")
    return value.strip()


def answer_text(answer):
    """A JSON number answer as text: an integral float is written as an integer (`3.0` -> `"3"`, what a model
    writes), other numbers with `str` (`2.5` -> `"2.5"`); anything else is returned unchanged."""
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        return answer
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    return str(answer)


def _reasoning_steps(record: dict, index: int, max_steps: int, required: bool) -> list[str]:
    """The record's `steps`, or its `rationale` split into at most `max_steps` steps. When not `required`, a record
    with neither (or only empty ones) has no steps."""
    steps, rationale = record.get("steps"), record.get("rationale")
    if not required and not steps and not (isinstance(rationale, str) and rationale.strip()):
        return []
    if steps is None:
        if not isinstance(rationale, str) or not rationale.strip():
            raise ValueError(f"Record {index}: needs 'steps' (list) or a non-empty 'rationale', got {rationale!r}.")
        steps = split_rationale(rationale, max_steps)
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
        raise ValueError(f"Record {index}: field 'steps' must be a non-empty list of non-empty strings, got {steps!r}.")
    return [s.strip() for s in steps]


def normalize_record(
    record: dict, index: int, max_steps: int = 4, base_dir: Path | None = None, *, require_steps: bool = True
) -> dict:
    """Validate a canonical record; returns `{"images": [RGB PIL], "question", "steps", "answer"}`.

    A number answer becomes text (`3.0` -> `"3"`, see [`answer_text`]). With `require_steps=False` (evaluation,
    which only needs the image, question and answer) a record without `steps` / `rationale` gets `steps=[]`.

    Raises `ValueError` naming the record index and the field for missing/empty fields and unreadable images, and
    for `max_steps` below 1.
    """
    _check_max_steps(max_steps)
    if not isinstance(record, dict):
        raise ValueError(f"Record {index} must be a dict, got {type(record).__name__}.")
    question = _text_field(record, "question", index)
    if isinstance(record.get("answer"), float) and not math.isfinite(record["answer"]):
        raise ValueError(
            f"Record {index}: field 'answer' is {record['answer']!r} (a missing value in the data?); every record "
            "needs an answer."
        )
    answer = _text_field({"answer": answer_text(record.get("answer"))}, "answer", index)
    if "\n" in answer:
        raise ValueError(
            f"Record {index}: field 'answer' spans several lines ({answer!r}); evaluation reads the first line after "
            "'Answer:', so it could never match. Write the answer on one line."
        )
    steps = _reasoning_steps(record, index, max_steps, required=require_steps)
    raw_images = record.get("images")
    if raw_images is not None and record.get("image") is not None:
        raise ValueError(
            f"Record {index} has both 'image' and 'images' (images={raw_images!r:.80}); keep one field: 'image' for "
            "one image, 'images' for a list."
        )
    if raw_images is None:
        raw_images = [] if record.get("image") is None else [record["image"]]
    if not isinstance(raw_images, (list, tuple)):
        raise ValueError(f"Record {index}: field 'images' must be a list, got {type(raw_images).__name__}.")
    images = [_load_image(image, index, base_dir) for image in raw_images]
    return {"images": images, "question": question, "steps": steps, "answer": answer}


class _RecordSequence(Sequence):
    """A read-only sequence whose item `index` is computed from `self.source[index]` when read (`_read`)."""

    source = ()

    def _read(self, index: int):
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = operator.index(index)
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records")
        return self._read(position)

    def __iter__(self):
        return (self[index] for index in range(len(self)))


class NormalizedRecords(_RecordSequence):
    """The records of `source` (a list of dicts, a `datasets.Dataset`, any sequence), normalised one at a time.

    Building it checks every record once ([`normalize_record`]: fields, reasoning steps, readable images, each image
    decoded then dropped; with a `tokenizer`, also no special token string in `text_fields`, see
    [`check_record_text`]; with `check`, `check(record)` on each normalised record, its `ValueError` prefixed with
    the record index). Each access normalises `source[index]` again and decodes its images, as a `datasets` image
    column does: memory stays that of the source (image paths, a memory-mapped table), not a decoded copy of every
    image, and a dataloader worker is sent the source, not the pixels.
    """

    def __init__(self, source, *, max_steps: int = 4, require_steps: bool = True, tokenizer=None,
                 text_fields=("question", "steps", "answer"), check=None):
        _check_max_steps(max_steps)
        if isinstance(source, dict):
            raise ValueError(
                f"Expected a sequence of records, got a dict with keys {list(source)[:5]} (a dict of splits?); pass "
                "one split's records, e.g. dataset['train']."
            )
        if hasattr(source, "to_dict") and hasattr(source, "columns"):
            raise ValueError("Got a pandas DataFrame; pass its records: df.to_dict('records').")
        if isinstance(source, list) or not (isinstance(source, Sequence) or _is_datasets(source)):
            source = list(source)  # a copy of a list (the caller may change theirs), or any other iterable read once
        self.source, self.max_steps, self.require_steps = source, max_steps, require_steps
        tokens = record_special_tokens(tokenizer) if tokenizer is not None else []
        for index, record in enumerate(self):  # normalises (so checks) every record once
            error = _special_token_error(record, tokens, text_fields)
            if error is None and check is not None:
                try:
                    check(record)
                except ValueError as failed:
                    error = str(failed)
            if error is not None:
                raise ValueError(f"Record {index}: {error}")

    def _read(self, index: int) -> dict:
        return normalize_record(self.source[index], index, self.max_steps, require_steps=self.require_steps)


class AdaptedRecords(_RecordSequence):
    """`adapter(row, index)` for each row of `source` (a `datasets.Dataset`), computed when the row is read, so the
    rows and their images stay in the dataset's table until used (what [`load_records`] returns for a dataset)."""

    def __init__(self, source, adapter=None):
        self.source, self.adapter = source, adapter

    def _read(self, index: int) -> dict:
        row = dict(self.source[index])
        return self.adapter(row, index) if self.adapter is not None else row


def _context_prefix(record: dict, name: str, index: int) -> str:
    """`"Context: <text>\n"` for a non-empty context field `name` (M3CoT `context`, ScienceQA `hint`), else `""`."""
    context = record.get(name)
    if context is None:
        return ""
    if not isinstance(context, str):
        raise ValueError(f"Record {index}: field {name!r} must be a string (or absent), got {type(context).__name__}.")
    return f"Context: {context.strip()}\n" if context.strip() else ""


def _lettered(record: dict, index: int, answer, context: str = "") -> tuple[str, str]:
    choices = record.get("choices")
    if not isinstance(choices, (list, tuple)) or not choices:
        raise ValueError(f"Record {index}: field 'choices' must be a non-empty list, got {choices!r}.")
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    options = " ".join(f"({letter}) {choice}" for letter, choice in zip(letters, choices))
    question = f"{context}{_text_field(record, 'question', index)}\nOptions: {options}"
    if isinstance(answer, float) and answer.is_integer():  # an integer column read as floats (pandas, NaN rows)
        answer = int(answer)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return question, letters[answer]
    if isinstance(answer, str) and answer.strip().strip("()").upper() in letters:
        return question, answer.strip().strip("()").upper()
    if isinstance(answer, str) and answer in choices:
        return question, letters[list(choices).index(answer)]
    raise ValueError(f"Record {index}: answer {answer!r} is not among the {len(choices)} choices {letters}.")


def from_m3cot(record: dict, index: int) -> dict:
    """M3CoT schema (`question`, `choices`, `answer` letter, `rationale`, `image`, optional `context`) -> canonical
    record. A non-empty `context` comes first in the question text, as `"Context: ...\n"`."""
    question, answer = _lettered(record, index, record.get("answer"), _context_prefix(record, "context", index))
    return {"image": record.get("image"), "question": question, "rationale": record.get("rationale"), "answer": answer}


def from_scienceqa(record: dict, index: int) -> dict:
    """ScienceQA schema (`question`, `choices`, `answer` index, `solution`/`lecture`, `image`, optional `hint`) ->
    canonical. A non-empty `hint` comes first in the question text, as `"Context: ...\n"`."""
    question, answer = _lettered(record, index, record.get("answer"), _context_prefix(record, "hint", index))
    rationale = record.get("solution") or record.get("lecture")
    return {"image": record.get("image"), "question": question, "rationale": rationale, "answer": answer}


DATASET_FORMATS = {"canonical": None, "m3cot": from_m3cot, "scienceqa": from_scienceqa}


def dataset_adapter(dataset_format: str):
    """The `load_records` adapter of a `--dataset_format` name (`None` for `canonical`, records already in the
    canonical schema); `ValueError` naming the choices for an unknown name."""
    if dataset_format not in DATASET_FORMATS:
        raise ValueError(f"dataset_format={dataset_format!r}; use one of {', '.join(DATASET_FORMATS)}.")
    return DATASET_FORMATS[dataset_format]


JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
RECORD_FILE_SUFFIXES = (".json", *JSON_LINES_SUFFIXES)


def _read_json_records(path: Path) -> list:
    """Records of a `.json` (a list) or `.jsonl` / `.ndjson` (one object per line) file, in any letter case;
    `ValueError` naming the file and the line for text that is not UTF-8 or not JSON, and naming the supported
    formats for any other extension."""
    suffix = path.suffix.lower()
    if suffix not in RECORD_FILE_SUFFIXES:
        raise ValueError(
            f"{path}: unsupported file extension {path.suffix!r}; records are read from "
            f"{', '.join(RECORD_FILE_SUFFIXES)} files or an image folder with a metadata.jsonl. Convert the file (e.g. "
            "`datasets.load_dataset('csv', data_files=...)['train'].to_json('data.jsonl')`)."
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text (byte {error.start}); re-encode the file.") from None
    if suffix not in JSON_LINES_SUFFIXES:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: invalid JSON at line {error.lineno} ({error.msg}).") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}.")
        return records
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg}).") from None
    return records


FOLDER_METADATA = ("metadata.jsonl", "metadata.json")


def _read_image_folder(folder: Path) -> list:
    """Records of an image folder in the `datasets` imagefolder layout: images next to a `metadata.jsonl` (or
    `metadata.json`) whose rows name their image in `file_name` (or their images in a `file_names` list), which
    becomes the record's `image` (`images`)."""
    found = [folder / name for name in FOLDER_METADATA if (folder / name).is_file()]
    if not found:
        raise ValueError(
            f"Image folder {str(folder)!r} has no {' or '.join(FOLDER_METADATA)}; add one row per image with "
            "`file_name`, `question`, `steps` or `rationale` and `answer` (the `datasets` imagefolder layout)."
        )
    records = _read_json_records(found[0])
    for record in records:
        if isinstance(record, dict) and "file_name" in record:
            record.setdefault("image", record.pop("file_name"))
        if isinstance(record, dict) and "file_names" in record:  # several images per row
            record.setdefault("images", record.pop("file_names"))
    return records


def _resolved(image, base_dir: Path):
    """A relative image path (a string, or the `path` of a `{"bytes", "path"}` value) made relative to `base_dir`;
    URLs are kept as they are (joining would mangle them; [`normalize_record`] names the record holding one)."""
    def relative(path):
        return isinstance(path, str) and not _URL.match(path) and not Path(path).is_absolute()

    if relative(image):
        return str(base_dir / image)
    if isinstance(image, dict) and relative(image.get("path")):
        return {**image, "path": str(base_dir / image["path"])}
    return image


def _is_datasets(source, class_name: str = "Dataset") -> bool:
    """Whether `source` is a `datasets.<class_name>` (without importing `datasets`: an instance means it is)."""
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(source, getattr(datasets, class_name))


def load_records(source, adapter=None) -> Sequence[dict]:
    """Records from a `.json` / `.jsonl` / `.ndjson` path, an image folder with a `metadata.jsonl` (the `datasets`
    imagefolder layout, `file_name` naming each row's image), a list of dicts or a `datasets.Dataset`;
    `adapter(record, index)` maps each to the canonical schema. Relative image paths are resolved against the file's
    folder. A list for files and lists; for a `datasets.Dataset`, [`AdaptedRecords`] (each row adapted, and its
    images decoded, when read). A dict of splits (a `datasets.DatasetDict`) is a `ValueError`: pass one split."""
    if isinstance(source, dict):
        raise ValueError(
            f"load_records got a {type(source).__name__} with keys {list(source)}, not a sequence of records; pass one "
            "split, e.g. dataset['train']."
        )
    if _is_datasets(source):
        return AdaptedRecords(source, adapter)
    if _is_datasets(source, "IterableDataset"):
        raise ValueError(
            f"load_records got a streaming {type(source).__name__}, which would be read whole into memory with every "
            "image decoded; load the split without streaming=True (a Dataset is read one row at a time)."
        )
    base_dir = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            base_dir, source = path, _read_image_folder(path)
        elif path.is_file():
            base_dir, source = path.parent, _read_json_records(path)
        else:
            raise ValueError(f"Dataset file {str(path)!r} does not exist.")
    for index, record in enumerate(source):
        if not isinstance(record, dict):
            raise ValueError(f"Record {index}: expected a dict (JSON object), got {type(record).__name__}.")
    records = [adapter(dict(r), i) if adapter else dict(r) for i, r in enumerate(source)]
    if base_dir is not None:
        for record in records:
            if "image" in record:
                record["image"] = _resolved(record["image"], base_dir)
            if isinstance(record.get("images"), list):
                record["images"] = [_resolved(image, base_dir) for image in record["images"]]
    return records


# ---- curriculum stages ---------------------------------------------------------------------------------------


def prompt_messages(record: dict) -> list[dict]:
    """The user turn of a normalised record: one image entry per image, then the question."""
    content = [{"type": "image"} for _ in record["images"]] + [{"type": "text", "text": record["question"]}]
    return [{"role": "user", "content": content}]


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"The tokenizer has no {token!r} token; run `python -m vedas_hf.convert` to add it.")
    return token_id


def _check_stage(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}={value!r} must be an integer >= 0 (a curriculum stage: the number of latent steps).")


def record_special_tokens(tokenizer) -> list[str]:
    """The strings a tokenizer reads as one special or added token wherever they occur in text (`<|im_end|>`,
    `<|image_pad|>`, `<|latent|>`, ...), which record text must not contain."""
    tokens = set(tokenizer.all_special_tokens)
    tokens.update(str(token) for token in getattr(tokenizer, "added_tokens_decoder", {}).values())
    return sorted(token for token in tokens if token.strip())


def _special_token_error(record: dict, tokens: list[str], fields) -> str | None:
    """The message for the first text field of `record` holding one of `tokens`, or `None`."""
    for name in fields:
        values = record.get(name)
        texts = [(f"{name}[{i}]", v) for i, v in enumerate(values)] if isinstance(values, list) else [(name, values)]
        for label, text in texts:
            found = next((token for token in tokens if isinstance(text, str) and token in text), None)
            if found is not None:
                return (
                    f"field {label!r} contains the special token string {found!r}, which the tokenizer would read as "
                    f"that token instead of text; remove it or write it differently in the data (e.g. "
                    f"{found[0] + ' ' + found[1:]!r})."
                )
    return None


def check_record_text(record: dict, tokenizer, fields=("question", "steps", "answer")) -> None:
    """`ValueError` naming the field and the token when a text field of a normalised record contains a special or
    added token string: the tokenizer would read it as that token (a latent, an end of turn, an image placeholder)
    instead of text."""
    error = _special_token_error(record, record_special_tokens(tokenizer), fields)
    if error is not None:
        raise ValueError(error)


def check_image_sizes(record: dict, processor) -> None:
    """`ValueError` for an image of a normalised record that the processor's image processor would refuse (Qwen2-VL:
    an aspect ratio of 200 or more), found from the image size alone."""
    image_patches = getattr(getattr(processor, "image_processor", None), "get_number_of_image_patches", None)
    for number, image in enumerate(record["images"] if image_patches is not None else []):
        try:
            image_patches(image.height, image.width, {})
        except ValueError as error:
            raise ValueError(
                f"image {number} ({image.width} x {image.height} px) is refused by the image processor ({error}); crop "
                "or pad it, or leave the record out."
            ) from None


def example_length(record: dict, stage: int, *, processor, max_latent_stage: int = 4, pad_latent_to_max: bool = True,
                   use_latent_markers: bool = True, answer_prefix: str = "Answer: ", mode: str = "latent") -> int:
    """The number of tokens [`build_stage_example`] gives `record` at `stage` (before any `max_length`), counted
    from the text and the image sizes alone (no pixels are processed): the prompt's text tokens plus, per image,
    its merged-patch tokens in place of the one placeholder the chat template writes."""
    tokenizer = processor.tokenizer
    prompt, latents, target = _stage_text(record, stage, processor, max_latent_stage, pad_latent_to_max,
                                          answer_prefix, mode)
    length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    for image in record["images"]:
        length += _image_tokens(processor, image) - 1  # in place of the placeholder the chat template writes
    if _appends_separator(processor):
        length += 1
    length += len(tokenizer(target, add_special_tokens=False)["input_ids"]) + 1  # + end of turn
    return length + latents + (2 if latents and use_latent_markers else 0)


def chat_prompt(processor, messages: list) -> str:
    """The generation prompt of chat `messages` (`apply_chat_template(..., add_generation_prompt=True)`), from the
    processor's chat template or, where the processor lost it on reload (`ChameleonProcessor` takes no
    `chat_template`; its tokenizer keeps it), from the tokenizer's."""
    if getattr(processor, "chat_template", None) is None and getattr(processor, "tokenizer", None) is not None:
        return processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _image_tokens(processor, image) -> int:
    """Tokens the processor gives one image: Qwen2-VL, one per merged patch; Chameleon, `image_seq_length` codes
    between its begin- and end-of-image tokens."""
    image_processor = processor.image_processor
    if hasattr(image_processor, "get_number_of_image_patches"):
        merge = getattr(image_processor, "merge_size", 1) ** 2
        return image_processor.get_number_of_image_patches(image.height, image.width, {}) // merge
    return processor.image_seq_length + 2


def _appends_separator(processor) -> bool:
    """Whether the processor appends the tokenizer's sep token to every prompt (`ChameleonProcessor`, chat mode)."""
    return hasattr(processor, "image_seq_length") and getattr(processor.tokenizer, "sep_token", None) is not None


def _stage_text(record: dict, stage: int, processor, max_latent_stage: int, pad_latent_to_max: bool,
                answer_prefix: str, mode: str) -> tuple[str, int, str]:
    """What a record is at `stage`: the chat-templated prompt (one placeholder per image), the number of latents
    and the target text (the steps not replaced, then the answer)."""
    steps = record["steps"] if mode != "no_cot" else []
    replaced, latents = stage_plan(len(steps), stage if mode == "latent" else 0, max_latent_stage, pad_latent_to_max)
    prompt = chat_prompt(processor, prompt_messages(record))
    remaining = steps[replaced:]
    target = "\n".join(remaining) + ("\n" if remaining else "") + answer_prefix + record["answer"]
    return prompt, latents, target


def stage_plan(num_steps: int, stage: int, max_latent_stage: int, pad_latent_to_max: bool) -> tuple[int, int]:
    """`(steps replaced, latents)` at `stage` for a record with `num_steps` steps."""
    stage = min(stage, max_latent_stage)
    replaced = min(stage, num_steps)
    return replaced, (stage if pad_latent_to_max else replaced)


def build_stage_example(
    record: dict,
    stage: int,
    *,
    processor,
    max_latent_stage: int = 4,
    pad_latent_to_max: bool = True,
    use_latent_markers: bool = True,
    answer_prefix: str = "Answer: ",
    mode: str = "latent",
    max_length: int | None = None,
) -> dict:
    """Tokenise a normalised record at a curriculum stage.

    Returns `input_ids`, `labels`, `mm_token_type_ids` (lists), `pixel_values` `(patches, dim)` and `image_grid_thw`
    `(images, 3)` tensors (absent without images), and `num_latents`.

    `max_length` (TRL's meaning; `None`: no limit) truncates the example on the right, inside the trained text only:
    an example whose prompt (images included) and latent block leave no room for one target token is a
    `ValueError`. So is a negative or non-integer `stage` / `max_latent_stage`, and a question, step or answer that
    contains a special token string such as `<|latent|>` or `<|im_end|>` (see [`check_record_text`]).
    """
    if mode not in DATA_MODES:
        raise ValueError(f"mode={mode!r}; use one of {DATA_MODES}.")
    _check_stage("stage", stage)
    _check_stage("max_latent_stage", max_latent_stage)
    tokenizer = processor.tokenizer
    check_record_text(record, tokenizer)
    prompt, latents, target = _stage_text(record, stage, processor, max_latent_stage, pad_latent_to_max,
                                          answer_prefix, mode)
    encoded = processor(text=[prompt], images=record["images"] or None, return_tensors="pt")
    prompt_ids = encoded["input_ids"][0].tolist()

    latent_ids = []
    if latents:
        latent_ids = [_token_id(tokenizer, LATENT)] * latents
        if use_latent_markers:
            latent_ids = [_token_id(tokenizer, START_LATENT), *latent_ids, _token_id(tokenizer, END_LATENT)]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [_token_id(tokenizer, END_OF_TURN)]

    fixed = len(prompt_ids) + len(latent_ids)
    if max_length is not None and fixed + len(target_ids) > max_length:
        if fixed >= max_length:
            raise ValueError(
                f"An example of {fixed + len(target_ids)} tokens ({len(prompt_ids)} of prompt and images, "
                f"{len(latent_ids)} of latent block) does not fit max_length={max_length}: truncation may only cut the "
                "reasoning and answer. Raise max_length (or set it to None), or use smaller images (the processor's "
                "max_pixels)."
            )
        target_ids = target_ids[: max_length - fixed]
    input_ids = prompt_ids + latent_ids + target_ids
    example = {
        "input_ids": input_ids,
        "labels": [IGNORE_INDEX] * (len(prompt_ids) + len(latent_ids)) + target_ids,
        "mm_token_type_ids": _modality_types(encoded, processor) + [0] * (len(latent_ids) + len(target_ids)),
        "num_latents": latents,
    }
    if "pixel_values" in encoded:
        example["pixel_values"] = encoded["pixel_values"]
        if "image_grid_thw" in encoded:  # Qwen2-VL; Chameleon's images are whole (images, C, H, W) tensors
            example["image_grid_thw"] = encoded["image_grid_thw"]
    return example


def _modality_types(encoded, processor) -> list:
    """The prompt's `mm_token_type_ids` (1 at image tokens), from the processor or, where it returns none
    (Chameleon), from its image token."""
    if "mm_token_type_ids" in encoded:
        return encoded["mm_token_type_ids"][0].tolist()
    return [int(token == processor.image_token_id) for token in encoded["input_ids"][0].tolist()]


# ---- collator ------------------------------------------------------------------------------------------------


class VedasDataCollator:
    """Batch stage examples so the latent block shares columns across rows.

    Rows are left-padded so every prompt (up to and including `<|start-latent|>`) ends at the same column; rows with
    fewer latents than the batch maximum get padding right after their latents; then rows are right-padded to the
    same length. Padding has attention 0, label -100, modality type 0. Batches may mix records with and without
    images: `pixel_values` / `image_grid_thw` concatenate those of the image rows, in row order.
    """

    def __init__(self, processor):
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.pad_id = self.tokenizer.pad_token_id
        self.latent_id = self.tokenizer.convert_tokens_to_ids(LATENT)

    def _split(self, example):
        """`(prompt, latents, rest)` column counts of an example."""
        ids = example["input_ids"]
        if example.get("num_latents", 0) == 0:
            prompt = next((i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX), len(ids))
            return prompt, 0, len(ids) - prompt
        first = ids.index(self.latent_id)
        count = example["num_latents"]
        return first, count, len(ids) - first - count

    REQUIRED_KEYS = ("input_ids", "labels", "mm_token_type_ids")

    def __call__(self, examples: list[dict]) -> dict:
        if not examples:
            raise ValueError("Cannot collate an empty list of examples.")
        for index, example in enumerate(examples):
            missing = [key for key in self.REQUIRED_KEYS if key not in example]
            if missing:
                raise ValueError(
                    f"Example {index} has no {', '.join(map(repr, missing))} (keys: {sorted(example)}); "
                    "VedasDataCollator batches the output of build_stage_example (input_ids, labels, "
                    "mm_token_type_ids, num_latents): render records with build_stage_example or VedasSFTTrainer."
                )
        parts = [self._split(e) for e in examples]
        max_prompt = max(p for p, _, _ in parts)
        max_latents = max(k for _, k, _ in parts)
        rows = []
        for example, (prompt, latents, rest) in zip(examples, parts):
            left, gap = max_prompt - prompt, max_latents - latents
            cut = prompt + latents
            row = {}
            for key, pad in (("input_ids", self.pad_id), ("labels", IGNORE_INDEX), ("mm_token_type_ids", 0)):
                values = example[key]
                row[key] = [pad] * left + values[:cut] + [pad] * gap + values[cut:]
            row["attention_mask"] = [0] * left + [1] * cut + [0] * gap + [1] * rest
            rows.append(row)
        length = max(len(r["input_ids"]) for r in rows)
        batch = {}
        for key, pad in (("input_ids", self.pad_id), ("labels", IGNORE_INDEX), ("mm_token_type_ids", 0),
                         ("attention_mask", 0)):
            batch[key] = torch.tensor([r[key] + [pad] * (length - len(r[key])) for r in rows])
        with_images = [e for e in examples if e.get("pixel_values") is not None]  # text-only rows have None or none
        if with_images:
            batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])
            if with_images[0].get("image_grid_thw") is not None:
                batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images])
        return batch


__all__ = [
    "AdaptedRecords",
    "chat_prompt",
    "VedasDataCollator",
    "DATASET_FORMATS",
    "NormalizedRecords",
    "answer_text",
    "build_stage_example",
    "check_image_sizes",
    "check_record_text",
    "dataset_adapter",
    "from_m3cot",
    "from_scienceqa",
    "load_records",
    "normalize_record",
    "prompt_messages",
    "split_rationale",
    "stage_plan",
]
