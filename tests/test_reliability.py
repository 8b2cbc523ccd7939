"""Reliability: malformed inputs across the public surface give clear errors, property-based checks of the
geometry and batching helpers, faults during training lose nothing, low-precision paths stay finite, and the
remote code stays importable and inert."""

import ast
import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
from transformers.cache_utils import DynamicCache

from conftest import make_batch
from vedas_hf.convert import convert_checkpoint
from vedas_hf.data import build_stage_example, load_records, normalize_record
from vedas_hf.modeling.configuration_vedas import VedasQwen2VLConfig
from vedas_hf.modeling.modeling_vedas import CACHE_KWARG, densest_window, patchify, unpatchify
from vedas_hf.testing import make_tiny_checkpoint, make_tiny_images
from vedas_hf.toy import make_digit_arithmetic
from vedas_hf.trainer import VedasSFTConfig, VedasSFTTrainer


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("reliability"), seed=0, replay_top_k=3, router_top_k=4,
                                num_latent_steps=2)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return SimpleNamespace(path=path, model=model, processor=AutoProcessor.from_pretrained(path))


def cpu_args(output_dir, **overrides):
    return VedasSFTConfig(output_dir=str(output_dir), report_to="none", use_cpu=True, bf16=False, **overrides)


def prompt_batch(tiny, question="What is it?", image_size=(48, 32)):
    image = make_tiny_images(1, sizes=(image_size,), seed=1)[0]
    return dict(make_batch(tiny.processor, [question], [[image]]))


def with_latents(tiny, batch, tail=(40, 41)):
    config = tiny.model.config
    suffix = torch.tensor([[config.start_latent_token_id, config.latent_token_id, config.latent_token_id,
                            config.end_latent_token_id, *tail]])
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], suffix], dim=1)
    out["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(suffix)], dim=1)
    out["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(suffix)], dim=1)
    return out


def generate(tiny, batch, **kwargs):
    return tiny.model.generate(**batch, **{"max_new_tokens": 2, "do_sample": False, **kwargs})


def drop(batch, key):
    return {k: v for k, v in batch.items() if k != key}


# ---- malformed inputs: (name, call(tiny, tmp_path), message regex) -------------------------------------------------

def _latent_inside_prompt(tiny):
    batch = with_latents(tiny, prompt_batch(tiny))
    ids = batch["input_ids"].clone()
    ids[0, 1] = tiny.model.config.latent_token_id
    return tiny.model(**{**batch, "input_ids": ids})


def _latents_after_a_filled_cache(tiny):
    prefill = tiny.model(**prompt_batch(tiny), use_cache=True)
    config = tiny.model.config
    ids = torch.tensor([[config.start_latent_token_id, config.latent_token_id]])
    return tiny.model(input_ids=ids, **{CACHE_KWARG: prefill.past_key_values})


def _continue_a_latent_generate_cache(tiny, **settings):
    """A follow-up turn on the cache a latent generate returned (it holds latent-step columns the ids lack)."""
    batch = prompt_batch(tiny)
    first = generate(tiny, batch, return_dict_in_generate=True, **settings)
    cache = first.get("cache", first.get("past_key_values"))
    ids = torch.cat([first.sequences[:1], torch.tensor([[5, 6, 7]])], dim=1)
    return generate(tiny, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, num_latent_steps=0,
                    **{CACHE_KWARG: cache})


def _corrupt_image(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    return str(path)


def _bad_utf8(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"question": "ok", "steps": ["a"], "answer": "1"}\n{"question": "caf\xe9", "answer": "2"}\n')
    return str(path)


def _bad_json(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"question": "ok", "steps": ["a"], "answer": "1"}\n{"question": \n')
    return str(path)


MALFORMED = [
    # processor outputs given to generate / forward
    ("pixel_values without image_grid_thw", lambda t, p: generate(t, drop(prompt_batch(t), "image_grid_thw")),
     "without image_grid_thw"),
    ("image tokens without pixel_values", lambda t, p: generate(t, drop(prompt_batch(t), "pixel_values")),
     "image tokens .* pixel_values is None"),
    ("latent forward without pixel_values", lambda t, p: t.model(**drop(with_latents(t, prompt_batch(t)), "pixel_values")),
     "pixel_values is None"),
    ("float input_ids", lambda t, p: generate(t, {**prompt_batch(t), "input_ids": prompt_batch(t)["input_ids"].float()}),
     "integer tensor of shape"),
    ("1-D input_ids", lambda t, p: generate(t, {**prompt_batch(t), "input_ids": prompt_batch(t)["input_ids"][0]}),
     r"got \(\d+,\)"),
    ("attention_mask of another shape",
     lambda t, p: generate(t, {**prompt_batch(t), "attention_mask": prompt_batch(t)["attention_mask"][:, 1:]}),
     "attention_mask has shape"),
    ("mm_token_type_ids of another shape",
     lambda t, p: t.model(**{**with_latents(t, prompt_batch(t)), "mm_token_type_ids": prompt_batch(t)["mm_token_type_ids"]}),
     "mm_token_type_ids has shape"),
    ("labels of another shape",
     lambda t, p: t.model(**with_latents(t, prompt_batch(t)), labels=torch.zeros(1, 3, dtype=torch.long)),
     r"labels has shape \(1, 3\)"),
    ("empty prompt", lambda t, p: generate(t, {"input_ids": torch.zeros(1, 0, dtype=torch.long)}),
     r"shape \(1, 0\)"),
    ("token id outside the vocabulary",
     lambda t, p: generate(t, {"input_ids": torch.tensor([[5, 10_000]])}), "id 10000, outside the vocabulary"),
    ("NaN pixel values",
     lambda t, p: generate(t, {**prompt_batch(t), "pixel_values": prompt_batch(t)["pixel_values"] * float("nan")}),
     "finite"),
    ("pixel rows of the wrong width",
     lambda t, p: generate(t, {**prompt_batch(t), "pixel_values": prompt_batch(t)["pixel_values"][:, :-1]}),
     r"pixel_values has shape \(\d+, 95\)"),
    ("image_grid_thw with two columns",
     lambda t, p: generate(t, {**prompt_batch(t), "image_grid_thw": prompt_batch(t)["image_grid_thw"][:, :2]}),
     r"shape \(num_images, 3\), got \(1, 2\)"),
    ("image smaller than one merged patch",
     lambda t, p: generate(t, {**prompt_batch(t), "image_grid_thw": torch.tensor([[1, 1, 64]])}),
     r"image_grid_thw\[0\]=\[1, 1, 64\]"),
    ("more images than image tokens",
     lambda t, p: generate(t, {**prompt_batch(t), "pixel_values": torch.cat([prompt_batch(t)["pixel_values"]] * 2),
                               "image_grid_thw": torch.cat([prompt_batch(t)["image_grid_thw"]] * 2)}),
     "describes 2 images"),
    ("latent tokens in a generate prompt", lambda t, p: generate(t, with_latents(t, prompt_batch(t))),
     "generate inserts the latent steps itself"),
    ("latent token inside the prompt", lambda t, p: _latent_inside_prompt(t), "one block of columns"),
    ("sequence starting with a latent",
     lambda t, p: t.model(input_ids=torch.tensor([[t.model.config.latent_token_id, 5, 6]])), "starts with <\\|latent\\|>"),
    ("negative num_latent_steps", lambda t, p: generate(t, prompt_batch(t), num_latent_steps=-1),
     "num_latent_steps=-1"),
    ("fractional num_latent_steps", lambda t, p: generate(t, prompt_batch(t), num_latent_steps=1.5),
     "num_latent_steps=1.5"),
    ("max_new_tokens=0", lambda t, p: generate(t, prompt_batch(t), max_new_tokens=0), "max_new_tokens"),
    ("right-padded prompt batch",
     lambda t, p: generate(t, {"input_ids": torch.tensor([[5, 6, 7], [5, 6, 0]]),
                               "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}), "left padding"),
    ("use_cache=False with latent steps", lambda t, p: generate(t, prompt_batch(t), use_cache=False), "use_cache=False"),
    ("offloaded cache with latent steps", lambda t, p: generate(t, prompt_batch(t), cache_implementation="offloaded"),
     "cache_implementation='offloaded'"),
    ("a cache passed to latent generate",
     lambda t, p: generate(t, prompt_batch(t), **{CACHE_KWARG: DynamicCache(config=t.model.config.get_text_config())}),
     "builds its own cache"),
    ("latent tokens continuing a filled cache", lambda t, p: _latents_after_a_filled_cache(t), "continues a filled cache"),
    ("the cache of a latent generate continued", lambda t, p: _continue_a_latent_generate_cache(t),
     "holds \\d+ latent-step columns"),
    ("the cache of a latent beam search continued", lambda t, p: _continue_a_latent_generate_cache(t, num_beams=2),
     "holds \\d+ latent-step columns"),
    ("assisted decoding with latent steps", lambda t, p: generate(t, prompt_batch(t), prompt_lookup_num_tokens=3),
     "prompt_lookup_num_tokens"),
    ("video input with latent steps",
     lambda t, p: generate(t, prompt_batch(t), pixel_values_videos=torch.zeros(4, 96)), "pixel_values_videos"),
    # dataset records and files
    ("record without a question", lambda t, p: normalize_record({"steps": ["a"], "answer": "1"}, 4),
     "Record 4: field 'question'"),
    ("record with an empty rationale", lambda t, p: normalize_record({"question": "q", "rationale": " ", "answer": "1"}, 2),
     "Record 2: needs 'steps'"),
    ("record with a missing image file",
     lambda t, p: normalize_record({"question": "q", "steps": ["a"], "answer": "1", "image": "/no/such.png"}, 1),
     "/no/such.png"),
    ("record with an unreadable image",
     lambda t, p: normalize_record({"question": "q", "steps": ["a"], "answer": "1", "image": _corrupt_image(p)}, 3),
     "Record 3: cannot read image"),
    ("non-UTF-8 JSONL", lambda t, p: load_records(_bad_utf8(p)), "line 2 is not UTF-8"),
    ("truncated JSONL line", lambda t, p: load_records(_bad_json(p)), "line 2 is not valid JSON"),
    ("record that is not an object", lambda t, p: load_records([{"question": "q"}, ["x"]]),
     "Record 1: expected a dict"),
    # configuration and tooling
    ("router_top_k=0", lambda t, p: VedasQwen2VLConfig(router_top_k=0), "router_top_k=0"),
    ("unknown replay mode", lambda t, p: VedasQwen2VLConfig(replay_mode="all"), "replay_mode='all'"),
    ("router layer out of range", lambda t, p: VedasQwen2VLConfig(router_layers=[99]), "99"),
    ("negative recon weight", lambda t, p: VedasQwen2VLConfig(recon_loss_weight=-1.0), "recon_loss_weight=-1.0"),
    ("epochs_per_stage=0", lambda t, p: VedasSFTConfig(output_dir=str(p), epochs_per_stage=0, report_to="none", use_cpu=True),
     "epochs_per_stage=0"),
    ("empty training set", lambda t, p: VedasSFTTrainer(model=t.model, args=cpu_args(p), train_dataset=[],
                                                        processing_class=t.processor), "train_dataset has no records"),
    ("dict of splits as the training set",
     lambda t, p: VedasSFTTrainer(model=t.model, args=cpu_args(p), train_dataset={"train": [], "test": []},
                                  processing_class=t.processor), r"dict of splits \(train, test\); .*dataset\['train'\]"),
    ("convert into a non-empty folder", lambda t, p: (p.joinpath("x").write_text("keep"), convert_checkpoint(t.path, p)),
     "not empty"),
]


def test_the_malformed_table_is_large_enough():
    assert len(MALFORMED) >= 25


@pytest.mark.parametrize("name, call, message", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_input_gives_a_clear_value_error(tiny, tmp_path, name, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny, tmp_path)


def test_text_only_batch_is_not_an_error(tiny):
    batch = dict(make_batch(tiny.processor, ["two plus two?", "one?"], [None, None]))
    out = generate(tiny, batch, max_new_tokens=3, min_new_tokens=3)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


# ---- property-based checks ---------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 10), w=st.integers(1, 10), data=st.data())
def test_densest_window_is_a_maximum(h, w, data):
    size = data.draw(st.integers(1, min(h, w)))
    cells = data.draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
    counts = torch.tensor(cells, dtype=torch.float32).reshape(h, w)
    top, left = densest_window(counts, size)
    best = max(counts[i : i + size, j : j + size].sum() for i in range(h - size + 1) for j in range(w - size + 1))
    assert 0 <= top <= h - size and 0 <= left <= w - size
    assert counts[top : top + size, left : left + size].sum() == best


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 2), hm=st.integers(1, 4), wm=st.integers(1, 4), merge=st.integers(1, 2),
       patch=st.sampled_from([1, 2, 3]), temporal=st.integers(1, 2), channels=st.sampled_from([1, 3]))
def test_unpatchify_inverts_patchify_and_crops_match_pixels(t, hm, wm, merge, patch, temporal, channels):
    vision = SimpleNamespace(spatial_merge_size=merge, patch_size=patch, temporal_patch_size=temporal,
                             in_channels=channels)
    grid = torch.tensor([t, hm * merge, wm * merge])
    frames = torch.randn(t * temporal, channels, hm * merge * patch, wm * merge * patch)
    rows = patchify(frames, grid, vision)
    assert rows.shape == (t * hm * merge * wm * merge, channels * temporal * patch * patch)
    assert torch.equal(unpatchify(rows, grid, vision), frames)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num_steps=st.integers(1, 5), stage=st.integers(0, 6), words=st.lists(st.sampled_from(["add", "7", "then"]),
                                                                             min_size=1, max_size=4))
def test_stage_construction_keeps_the_answer_and_masks_everything_before_it(tiny, num_steps, stage, words):
    record = normalize_record({"question": "Q?", "steps": [" ".join(words)] * num_steps, "answer": "5"}, 0)
    example = build_stage_example(record, stage, processor=tiny.processor, max_latent_stage=4)
    ids, labels = example["input_ids"], example["labels"]
    latent = tiny.model.config.latent_token_id
    assert ids.count(latent) == min(stage, 4)
    supervised = [i for i, label in enumerate(labels) if label != -100]
    assert supervised and all(labels[i] == ids[i] for i in supervised)
    assert all(ids[i] != latent for i in supervised)
    assert supervised[0] > max((i for i, token in enumerate(ids) if token == latent), default=-1)
    assert "5" in tiny.processor.tokenizer.decode([ids[i] for i in supervised])


# ---- faults during training -------------------------------------------------------------------------------------


class Fault(TrainerCallback):
    """During optimizer step `step` (1-based): send ourselves SIGTERM, or raise after it (a crash)."""

    def __init__(self, step, kind):
        self.step, self.kind = step, kind

    def on_step_begin(self, args, state, control, **kwargs):
        if self.kind == "sigterm" and state.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_step_end(self, args, state, control, **kwargs):
        if self.kind == "raise" and state.global_step == self.step:
            raise RuntimeError("simulated crash")


def fault_args(output_dir, **overrides):
    defaults = dict(output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=2e-3, num_train_epochs=4,
                    epochs_per_stage=2, max_latent_stage=2, lr_scheduler_type="constant", logging_steps=1,
                    save_strategy="steps", save_steps=3, report_to="none", seed=0, use_cpu=True,
                    dataloader_num_workers=0, gradient_checkpointing=False)
    return VedasSFTConfig(**{**defaults, **overrides})


@pytest.fixture(scope="module")
def fault_records():
    return make_digit_arithmetic(12, 0, seed=1, digit_size=24, rows=1)[0]


def run_training(tiny, records, output_dir, resume=None, callbacks=(), **overrides):
    model = AutoModelForImageTextToText.from_pretrained(tiny.path)
    trainer = VedasSFTTrainer(model=model, args=fault_args(output_dir, **overrides), train_dataset=records,
                              processing_class=tiny.processor, callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def losses(trainer):
    return {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}


@pytest.fixture(scope="module")
def uninterrupted(tiny, fault_records, tmp_path_factory):
    return run_training(tiny, fault_records, tmp_path_factory.mktemp("full"))


def test_sigterm_saves_mid_stage_and_resume_continues_identically(tiny, fault_records, uninterrupted, tmp_path):
    stopped = run_training(tiny, fault_records, tmp_path, callbacks=[Fault(4, "sigterm")])
    assert stopped.state.global_step == 4  # stopped right after the step that saw the signal (mid stage 1)
    assert (tmp_path / "checkpoint-4" / "model.safetensors").is_file()
    resumed = run_training(tiny, fault_records, tmp_path, resume=True)
    assert resumed.curriculum_callback.stage == uninterrupted.curriculum_callback.stage == 1  # epochs 2-3
    expected = losses(uninterrupted)
    got = losses(resumed)
    assert sorted(got) == sorted(expected)  # the restored history plus steps 5.. of the resumed run
    assert got == pytest.approx(expected, rel=1e-4)
    for (name, a), (_, b) in zip(uninterrupted.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_crash_resumes_from_last_checkpoint(tiny, fault_records, uninterrupted, tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(tiny, fault_records, tmp_path, callbacks=[Fault(5, "raise")])
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]
    resumed = run_training(tiny, fault_records, tmp_path, resume=True)
    expected = losses(uninterrupted)
    assert losses(resumed) == pytest.approx({k: expected[k] for k in losses(resumed)}, rel=1e-4)


def test_sigterm_handler_is_restored_when_training_raises(tiny, fault_records, tmp_path):
    def previous(signum, frame):
        pass

    original = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_training(tiny, fault_records, tmp_path, callbacks=[Fault(1, "raise")], save_strategy="no")
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, original)


def test_crash_while_saving_leaves_previous_checkpoint_loadable(tiny, fault_records, tmp_path, monkeypatch):
    calls = []

    def failing_rng_save(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(VedasSFTTrainer, "_save_rng_state", failing_rng_save)
    with pytest.raises(OSError, match="disk full"):
        run_training(tiny, fault_records, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]  # no half-written checkpoint-6
    assert json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "checkpoint-3", use_safetensors=True)
    assert type(model).__name__ == "VedasQwen2VLForConditionalGeneration"


def test_checkpoints_hold_safetensors_weights_only(uninterrupted):
    folder = os.path.join(uninterrupted.args.output_dir, "checkpoint-6")
    weights = [f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin")) or f.startswith("pytorch_model")]
    assert weights == ["model.safetensors"]


# ---- numerics --------------------------------------------------------------------------------------------------


# Largest |low precision - float32| of the latent forward's logits (|logit| <= ~0.6 on this tiny model): bfloat16 keeps
# 8 mantissa bits (relative step 3.9e-3), float16 11 (4.9e-4); measured 5.9e-3 and 7.0e-4, bounds with 5x headroom.
LOW_PRECISION_BOUNDS = {torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_and_generate_stay_close_to_float32(tiny, dtype):
    model = AutoModelForImageTextToText.from_pretrained(tiny.path, dtype=dtype).eval()
    batch = with_latents(tiny, prompt_batch(tiny))
    with torch.no_grad():
        reference = tiny.model(**batch).logits
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        logits = model(**batch).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert (logits.float() - reference).abs().max().item() < LOW_PRECISION_BOUNDS[dtype]
    out = model.generate(**{**prompt_batch(tiny), "pixel_values": batch["pixel_values"]}, max_new_tokens=3,
                         min_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert all(torch.isfinite(score[score > -1e4]).all() for score in out.scores)


def test_saliency_stays_finite_when_every_visual_token_is_visited(tiny):
    # 2x2 merged grid = 4 visual tokens, K = 3: the second step has 1 left, the third none
    batch = dict(make_batch(tiny.processor, ["Tiny?", "A longer question here?"],
                            [[make_tiny_images(1, sizes=((16, 16),))[0]], None]))
    out = tiny.model.generate(**batch, max_new_tokens=2, do_sample=False, num_latent_steps=3,
                              return_dict_in_generate=True, output_scores=True)
    counts = [len(step[0]["visual_indices"]) for step in out.latent_trace]
    assert counts == [3, 1, 0]
    assert all(torch.isfinite(score).all() for score in out.scores)


def test_generate_is_deterministic_under_a_fixed_seed(tiny):
    batch = prompt_batch(tiny)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(tiny.model.generate(**batch, max_new_tokens=5, do_sample=True, top_k=20))
    assert torch.equal(runs[0], runs[1])


# ---- remote-code hygiene -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["modeling_vedas.py", "configuration_vedas.py"])
def test_remote_code_imports_only_torch_and_transformers_and_does_no_io(name):
    tree = ast.parse(open(os.path.join(REPO, "modeling", name)).read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots <= {"torch", "transformers", "copy", "math", "inspect", "numbers", "dataclasses", "typing"}, roots
    calls = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert not calls & {"open", "exec", "eval", "print", "__import__"}, calls & {"open", "exec", "eval", "print"}


def test_readme_pins_a_revision_for_remote_code():
    readme = open(os.path.join(REPO, "README.md")).read()
    assert "trust_remote_code=True" in readme and "revision=" in readme
