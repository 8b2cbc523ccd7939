"""Hub distribution: config templates for the paper's backbones, conversion CLI per backbone, push tooling
(against a fake `HfApi`), and the `image-text-to-text` pipeline on a loaded folder."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, pipeline

import vedas_hf.convert
import vedas_hf.push
from conftest import make_batch
from vedas_hf.data import chat_prompt
from vedas_hf.convert import SETTABLE_FIELDS, convert_checkpoint, detect_backbone, main as convert_main, model_card
from vedas_hf.push import IGNORE_PATTERNS, check_folder, push_to_hub
from vedas_hf.testing import make_tiny_images, make_tiny_stock_checkpoint


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB_CONFIGS = os.path.join(REPO, "hub_configs")

# template -> (model class, stock parameter count of the checkpoint it names, hidden, layers, lambda)
TEMPLATES = {
    # Chameleon-7B: 7.04B on the Hub; its language model by hand: 2 * 65536 * 4096 (embeddings, untied head) +
    # 32 * (4 * 4096^2 + 3 * 4096 * 11008 + 4 * 4096 (q/k LayerNorms) + 2 * 4096 (RMSNorms)) + 4096 = 7,013,666,816,
    # plus the VQ-VAE encoder (29,423,616)
    "vedas-chameleon-7b": ("VedasChameleonForConditionalGeneration", 7_043_090_432, 4096, 32, 0.2),
    "vedas-qwen2-vl-2b": ("VedasQwen2VLForConditionalGeneration", 2_208_985_600, 1536, 28, 1.0),  # Qwen2-VL-2B
    "vedas-qwen2-vl-7b": ("VedasQwen2VLForConditionalGeneration", 8_291_375_616, 3584, 28, 0.2),  # Qwen2-VL-7B
    "vedas-qwen2.5-vl-3b": ("VedasQwen2_5_VLForConditionalGeneration", 3_754_622_976, 2048, 36, 1.0),  # Qwen2.5-VL-3B
    "vedas-qwen2.5-vl-7b": ("VedasQwen2_5_VLForConditionalGeneration", 8_292_166_656, 3584, 28, 0.2),  # Qwen2.5-VL-7B
}


def load_template(name):
    with open(os.path.join(HUB_CONFIGS, f"{name}.json")) as f:
        values = json.load(f)
    return AutoConfig.for_model(values.pop("model_type"), **values), values


def test_every_template_is_tested():
    assert sorted(f[:-5] for f in os.listdir(HUB_CONFIGS) if f.endswith(".json")) == sorted(TEMPLATES)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_instantiates_on_meta_with_the_stock_sizes_and_paper_settings(name):
    class_name, stock_params, hidden, layers, recon_weight = TEMPLATES[name]
    config, values = load_template(name)
    assert values["auto_map"]["AutoModelForImageTextToText"] == f"modeling_vedas.{class_name}"
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert type(model).__name__ == class_name
    new = {n: p.numel() for n, p in model.named_parameters() if ".router." in n or n.startswith("token_sr.")}
    stock = sum(p.numel() for n, p in model.named_parameters() if n not in new)
    # Chameleon's tokenizer fills its vocabulary: the latent tokens are 3 rows past it (embedding and LM head)
    grown = 3 if class_name.startswith("VedasChameleon") else 0
    assert stock - 2 * grown * hidden == stock_params  # exactly the architecture of the stock checkpoint named
    if grown:
        assert stock_params - 29_423_616 == 2 * 65536 * 4096 + 32 * (
            4 * 4096**2 + 3 * 4096 * 11008 + 4 * 4096 + 2 * 4096) + 4096
    # one router per decoder layer (score: hidden + 1, gate: D x hidden), TokenSR linear: hidden^2 + hidden
    assert sum(new.values()) == layers * (hidden + 1 + hidden) + hidden * hidden + hidden
    assert (config.num_latent_steps, config.replay_top_k, config.router_top_k, config.router_depth,
            config.recon_window, config.recon_loss_weight) == (4, 32, 32, 1, 3, recon_weight)
    assert config.router_layer_indices == list(range(layers))


def test_convert_cli_per_backbone_and_backbone_mismatch(tmp_path, stock_dir, backbone):
    assert detect_backbone(stock_dir) == backbone
    other = "qwen2_5_vl" if backbone == "qwen2_vl" else "qwen2_vl"
    with pytest.raises(ValueError, match=f"backbone='{other}'"):
        convert_checkpoint(stock_dir, tmp_path / "wrong", backbone=other)
    with pytest.raises(ValueError, match="Unknown backbone='llava'"):
        convert_checkpoint(stock_dir, tmp_path / "unknown", backbone="llava")
    dst = tmp_path / "cli"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "vedas_hf.convert", str(stock_dir), str(dst), "--backbone", "auto",
         "--set", "replay_top_k=3", "--set", "router_layers=[1, 2]"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == f"vedas_{backbone}"
    assert config["replay_top_k"] == 3 and config["router_layers"] == [1, 2]
    card = (dst / "README.md").read_text()
    assert "trust_remote_code=True" in card and "revision=" in card


class FakeHfApi:
    """Records what `push_to_hub` would send to the Hub."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return "https://hub.example/commit/1"


def test_push_uploads_code_and_safetensors_only(vedas_dir, tmp_path):
    api = FakeHfApi()
    assert push_to_hub(vedas_dir, "me/vedas-tiny", private=True, revision="v1", api=api) == "https://hub.example/commit/1"
    kinds = [call[0] for call in api.calls]
    assert kinds == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][2]["private"] is True and api.calls[1][2]["branch"] == "v1"
    upload = api.calls[2][2]
    files = upload["allow_patterns"]
    assert upload["revision"] == "v1" and upload["folder_path"] == str(vedas_dir)
    assert {"config.json", "configuration_vedas.py", "modeling_vedas.py", "model.safetensors"} <= set(files)
    assert "README.md" in files and "tokenizer.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]


def test_push_refuses_broken_folders(vedas_dir, stock_dir, tmp_path):
    def copy_without(skip, extra=None):
        folder = tmp_path / f"copy_{len(os.listdir(tmp_path))}"
        folder.mkdir()
        for name in os.listdir(vedas_dir):
            if name != skip:
                os.symlink(os.path.join(vedas_dir, name), folder / name)
        for name, content in (extra or {}).items():
            (folder / name).write_bytes(content)
        return folder

    with pytest.raises(ValueError, match="model_type="):
        check_folder(stock_dir)
    with pytest.raises(ValueError, match="modeling_vedas.py"):
        check_folder(copy_without("modeling_vedas.py"))
    with pytest.raises(ValueError, match="pickle files"):
        check_folder(copy_without(None, {"optimizer.pt": b"\x80\x04"}))
    with pytest.raises(ValueError, match="safetensors"):
        check_folder(copy_without("model.safetensors"))
    with pytest.raises(ValueError, match="no config.json"):
        check_folder(copy_without("config.json"))
    # Trainer leftovers are skipped, not uploaded
    folder = copy_without(None)
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "optimizer.pt").write_bytes(b"\x80\x04")
    assert not [f for f in check_folder(folder) if f.startswith("checkpoint-")]


def test_image_text_to_text_pipeline_runs_latent_generation(vedas_dir):
    model = AutoModelForImageTextToText.from_pretrained(vedas_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(vedas_dir)
    if processor.chat_template is None:  # ChameleonProcessor takes no chat template on reload; its tokenizer keeps it
        processor.chat_template = processor.tokenizer.chat_template
    image = make_tiny_images(1, sizes=((48, 32),), seed=3)[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    out = pipe(text=messages, max_new_tokens=4, return_full_text=False,
               generate_kwargs={"num_latent_steps": 2, "do_sample": False, "min_new_tokens": 4})
    prompt = chat_prompt(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}])
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, num_latent_steps=2)
    expected = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert out[0]["generated_text"] == expected


def link_copy(source, folder, skip=(), extra=None):
    """`folder` holding symlinks to the files of `source` except `skip`, plus `extra` ({relative path: text})."""
    folder.mkdir(parents=True)
    for name in os.listdir(source):
        if name not in skip:
            os.symlink(os.path.join(source, name), folder / name)
    for name, text in (extra or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if (folder / name).is_symlink():
            (folder / name).unlink()
        (folder / name).write_text(text)
    return folder


# ---- conversion: tied embeddings, config overrides, atomic writes, model card ---------------------------------------


def test_tied_checkpoint_converts_to_exactly_the_stock_logits(tmp_path, backbone, stock_class, vedas_class, processor,
                                                             images, caplog):
    stock_dir = make_tiny_stock_checkpoint(tmp_path / "stock", seed=0, backbone=backbone, tie_word_embeddings=True)
    stock = stock_class.from_pretrained(stock_dir).eval()
    assert stock.lm_head.weight.data_ptr() == stock.get_input_embeddings().weight.data_ptr()
    with caplog.at_level(logging.INFO, logger="vedas_hf.convert"):
        convert_checkpoint(stock_dir, tmp_path / "vedas", replay_top_k=3, router_top_k=4)
    model = vedas_class.from_pretrained(tmp_path / "vedas").eval()
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # still tied on reload
    assert torch.equal(model.lm_head.weight, stock.lm_head.weight)  # latent rows included
    batch = make_batch(processor, ["What digit is this?", "Colour of the shape?"], [[images[0]], None])
    with torch.no_grad():
        expected, got = stock(**batch).logits, model(**batch).logits
    assert got.shape[-1] == model.config.get_text_config().vocab_size
    assert torch.equal(got, expected)  # every column, the latent tokens' included
    assert "Tied word embeddings: the latent tokens keep their stock embedding rows" in caplog.text


def test_settable_fields_are_the_vedas_fields_without_the_token_ids():
    assert SETTABLE_FIELDS == (
        "num_latent_steps", "replay_mode", "replay_top_k", "replay_positions", "router_layers", "router_top_k",
        "router_schedule", "router_alpha_start", "router_alpha_end", "router_depth", "router_positions",
        "recon_window", "recon_crop_size", "token_sr", "recon_loss_weight", "recon_grad_to_vision",
    )


@pytest.mark.parametrize("overrides, message", [
    ({"num_latent_step": 2}, "'num_latent_step' is not a Vedas config field. Did you mean 'num_latent_steps'? Allowed: "),
    ({"model_type": "foo"}, "'model_type' is not a Vedas config field. Allowed: num_latent_steps, replay_mode, "),
    ({"vocab_size": 10}, "'vocab_size' is not a Vedas config field. Allowed: "),
    ({"latent_token_id": 5}, "latent_token_id cannot be set: convert reads the latent-token ids from the tokenizer"),
])
def test_convert_refuses_overrides_that_are_not_vedas_fields(stock_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        convert_checkpoint(stock_dir, tmp_path / "dst", replay_top_k=3, **overrides)
    assert not (tmp_path / "dst").exists()


def test_convert_cli_set_refuses_a_misspelt_field(stock_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_main([str(stock_dir), str(tmp_path / "dst"), "--set", "replay_top_k=3", "--set", "replay_topk=8"])
    assert exit_info.value.code == 2
    assert "--set: 'replay_topk' is not a Vedas config field. Did you mean 'replay_top_k'?" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_convert_refuses_a_target_that_contains_or_is_inside_the_source(stock_dir, tmp_path):
    """`convert par/stock par --overwrite` used to delete the source and everything beside it."""
    parent = tmp_path / "par"
    shutil.copytree(stock_dir, parent / "stock")
    (parent / "notes.txt").write_text("keep me")
    before = sorted(os.listdir(parent / "stock"))
    with pytest.raises(ValueError, match="contains the source"):
        convert_main([str(parent / "stock"), str(parent), "--overwrite"])
    with pytest.raises(ValueError, match="is inside the source"):
        convert_checkpoint(parent / "stock", parent / "stock" / "vedas", overwrite=True)
    assert sorted(os.listdir(parent)) == ["notes.txt", "stock"] and sorted(os.listdir(parent / "stock")) == before


def test_convert_writes_atomically_and_overwrite_replaces_the_folder(stock_dir, tmp_path, monkeypatch, backbone):
    from transformers import ProcessorMixin

    root = tmp_path / "out"
    dst = root / "vedas"
    seen = []

    def interrupted_save(self, save_directory, *args, **kwargs):
        seen.append(sorted(os.listdir(save_directory)))
        raise KeyboardInterrupt("simulated interrupt while saving the processor")

    with monkeypatch.context() as patch:
        patch.setattr(ProcessorMixin, "save_pretrained", interrupted_save)
        with pytest.raises(KeyboardInterrupt):
            convert_checkpoint(stock_dir, dst)
        assert "model.safetensors" in seen[0] and "config.json" in seen[0]  # interrupted after the weights
        assert os.listdir(root) == []  # no partial target, no temporary folder
        dst.mkdir()
        (dst / "keep.txt").write_text("previous run")
        with pytest.raises(KeyboardInterrupt):
            convert_checkpoint(stock_dir, dst, overwrite=True)
        assert os.listdir(root) == ["vedas"] and os.listdir(dst) == ["keep.txt"]  # existing target untouched
    convert_checkpoint(stock_dir, dst, overwrite=True, replay_top_k=3)
    assert os.listdir(root) == ["vedas"] and not (dst / "keep.txt").exists()
    assert "model.safetensors" in check_folder(dst)
    # in place (dst == src), through the CLI
    in_place = tmp_path / "in_place"
    shutil.copytree(stock_dir, in_place)
    convert_main([str(in_place), str(in_place), "--overwrite", "--base-model", "me/base"])
    assert json.loads((in_place / "config.json").read_text())["model_type"] == f"vedas_{backbone}"
    assert "\nbase_model: me/base\n" in (in_place / "README.md").read_text()
    assert sorted(os.listdir(tmp_path)) == ["in_place", "out"]
    assert type(AutoModelForImageTextToText.from_pretrained(in_place)).__name__.startswith("Vedas")
    # a target that is a file
    (root / "file").write_text("not a folder")
    with pytest.raises(ValueError, match=re.escape(f"Target {root / 'file'} is an existing file, not a folder")):
        convert_checkpoint(stock_dir, root / "file", overwrite=True)
    assert (root / "file").read_text() == "not a folder"


def test_model_card_names_the_hub_base_model_and_loads_the_processor_with_remote_code(stock_dir, tmp_path):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2-VL-2B-Instruct" / "snapshots" / ("0123abcd" * 5)
    shutil.copytree(stock_dir, snapshot)
    convert_checkpoint(snapshot, tmp_path / "vedas")
    card = (tmp_path / "vedas" / "README.md").read_text()
    assert "\n# Vedas latent reasoning on Qwen/Qwen2-VL-2B-Instruct\n" in card
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n"
                           "base_model: Qwen/Qwen2-VL-2B-Instruct\ntags: [")
    assert "0123abcd" not in card and "license" not in card
    assert 'processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True, revision="<pinned commit>")' in card
    # `_name_or_path` of the stock config when it is a Hub id; a plain folder name titles the card only
    with open(os.path.join(stock_dir, "config.json")) as f:
        config = json.load(f)
    named = link_copy(stock_dir, tmp_path / "named",
                      extra={"config.json": json.dumps(dict(config, _name_or_path="Qwen/Qwen2.5-VL-3B-Instruct"))})
    assert vedas_hf.convert._base_model_name(named) == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert vedas_hf.convert._base_model_name(named, "me/base") == "me/base"
    plain = link_copy(stock_dir, tmp_path / "plain-stock")
    assert vedas_hf.convert._base_model_name(plain) == "plain-stock"
    vedas_config = AutoConfig.from_pretrained(tmp_path / "vedas")
    plain_card = model_card("plain-stock", vedas_config)
    assert "\n# Vedas latent reasoning on plain-stock\n" in plain_card and "base_model" not in plain_card


def test_readme_loads_processors_with_remote_code():
    with open(os.path.join(REPO, "README.md")) as f:
        lines = [line for line in f if "AutoProcessor.from_pretrained(" in line]
    assert lines and all("trust_remote_code=True" in line for line in lines), lines


# ---- push: required files, hidden files ------------------------------------------------------------------------------


def test_push_requires_auto_config_root_weights_and_processor_files(vedas_dir, tmp_path):
    with open(os.path.join(vedas_dir, "config.json")) as f:
        config = json.load(f)
    no_auto_config = dict(config, auto_map={k: v for k, v in config["auto_map"].items() if k != "AutoConfig"})
    with pytest.raises(ValueError, match=re.escape("has no auto_map for ['AutoConfig']")):
        check_folder(link_copy(vedas_dir, tmp_path / "no_auto_config", extra={"config.json": json.dumps(no_auto_config)}))
    nested = link_copy(vedas_dir, tmp_path / "nested", skip={"model.safetensors"})
    (nested / "weights").mkdir()
    os.symlink(os.path.join(vedas_dir, "model.safetensors"), nested / "weights" / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape("has no root-level safetensors weights (model.safetensors or "
                                                   "model.safetensors.index.json)")):
        check_folder(nested)
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}}
    sharded = link_copy(vedas_dir, tmp_path / "sharded", skip={"model.safetensors"},
                        extra={"model.safetensors.index.json": json.dumps(index)})
    os.symlink(os.path.join(vedas_dir, "model.safetensors"), sharded / "model-00001-of-00001.safetensors")
    assert {"model.safetensors.index.json", "model-00001-of-00001.safetensors"} <= set(check_folder(sharded))
    index["weight_map"]["model.norm.weight"] = "model-00002-of-00003.safetensors"  # a shard the save never wrote
    index["weight_map"]["model.embed_tokens.weight"] = "model-00003-of-00003.safetensors"
    shard_lost = link_copy(sharded, tmp_path / "shard_lost", extra={"model.safetensors.index.json": json.dumps(index)})
    with pytest.raises(ValueError, match=re.escape("lists weight shards that are not in the folder: "
                                                   "['model-00002-of-00003.safetensors', "
                                                   "'model-00003-of-00003.safetensors']")):
        check_folder(shard_lost)
    for name, text in [("bad_index", "{}"), ("list_index", '{"weight_map": []}')]:
        with pytest.raises(ValueError, match="is not a safetensors index"):
            check_folder(link_copy(sharded, tmp_path / name, extra={"model.safetensors.index.json": text}))
    for skip, missing in [
        ({"tokenizer_config.json"}, ["tokenizer_config.json"]),
        ({"processor_config.json"}, ["processor_config.json or preprocessor_config.json"]),
        ({"tokenizer_config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja"},  # half written
         ["tokenizer_config.json", "tokenizer.json or vocab.json", "processor_config.json or preprocessor_config.json"]),
    ]:
        with pytest.raises(ValueError, match=re.escape(f"lacks the processor files {missing} that AutoProcessor loads")):
            check_folder(link_copy(vedas_dir, tmp_path / f"no_{len(skip)}_{sorted(skip)[0]}", skip=skip))


def test_convert_needs_the_checkpoint_tokenizer_and_takes_any_vocabulary_token_as_init(stock_dir, tmp_path):
    """Without tokenizer files transformers builds a near-empty tokenizer, and the latent tokens would land on
    ordinary vocabulary rows: a clear error before anything loads. `init_token` may be any token of the vocabulary,
    the unknown token included (the tiny tokenizer's `<|endoftext|>` is also its unk token)."""
    for skip, missing in [({"tokenizer.json", "vocab.json"}, ["tokenizer.json or vocab.json"]),
                          ({"tokenizer_config.json"}, ["tokenizer_config.json"])]:
        source = link_copy(stock_dir, tmp_path / f"no_{sorted(skip)[0]}", skip=skip)
        with pytest.raises(ValueError, match=re.escape(f"lacks the tokenizer files {missing}")):
            convert_checkpoint(source, tmp_path / f"out_{sorted(skip)[0]}")
    tokenizer = AutoTokenizer.from_pretrained(stock_dir)
    init = tokenizer.unk_token or "<|endoftext|>"
    dst = convert_checkpoint(stock_dir, tmp_path / "unk_init", init_token=init)
    model = AutoModelForImageTextToText.from_pretrained(dst)
    rows = model.get_input_embeddings().weight
    source_row = rows[tokenizer.get_vocab()[init]]
    for field in ("latent_token_id", "start_latent_token_id", "end_latent_token_id"):
        assert torch.equal(rows[getattr(model.config, field)], source_row), field
    with pytest.raises(ValueError, match=re.escape("init_token='<|no such token|>' is not in the tokenizer")):
        convert_checkpoint(stock_dir, tmp_path / "bad_init", init_token="<|no such token|>")


def test_push_never_uploads_hidden_files_or_run_leftovers(vedas_dir, tmp_path, monkeypatch, capsys):
    leftovers = [".env", ".git/HEAD", ".staging/checkpoint-2/model.safetensors", "checkpoint-5/optimizer.pt",
                 "runs/events.out", "sub/.secret", "train.lock", "wandb/run-1/logs.txt"]
    folder = link_copy(vedas_dir, tmp_path / "run", extra={name: "x" for name in leftovers + ["sub/notes.txt"]})
    files = check_folder(folder)
    assert files == sorted(os.listdir(vedas_dir) + ["sub/notes.txt"])
    api = FakeHfApi()
    push_to_hub(folder, "me/vedas-tiny", api=api)
    upload = api.calls[-1][2]
    assert upload["allow_patterns"] == files and upload["ignore_patterns"] == IGNORE_PATTERNS
    from huggingface_hub.utils import filter_repo_objects

    assert list(filter_repo_objects(sorted(leftovers + files), ignore_patterns=IGNORE_PATTERNS)) == files
    monkeypatch.setattr(vedas_hf.push, "HfApi", lambda token=None: FakeHfApi())
    vedas_hf.push.main([str(folder), "me/vedas-tiny"])
    assert f"Skipping 8 leftover or hidden files: {', '.join(sorted(leftovers))}\n" in capsys.readouterr().out


# ---- push: weight integrity, evaluation outputs, dry run, run folders -----------------------------------------------


def test_push_verifies_every_safetensors_file_from_its_header(vedas_dir, tmp_path):
    """A weight file cut short by an interrupted save or copy (half of it, or nothing), one with trailing bytes or a
    garbled header, and an indexed shard cut short are refused before anything is sent, naming file, sizes and fix."""
    data = Path(vedas_dir, "model.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    garbled = data[:8] + b"{" * header_len + data[8 + header_len:]
    for name, content, message in [
        ("half", data[: len(data) // 2], f"is {len(data) // 2} bytes, its header says {len(data)}"),
        ("empty", b"", "is 0 bytes, too short for a safetensors header"),
        ("short_header", data[:8] + data[8:100], f"is 100 bytes, its header alone says {8 + header_len}"),
        ("trailing", data + b"\0" * 16, f"is {len(data) + 16} bytes, its header says {len(data)}"),
        ("garbled", garbled, "has a corrupt safetensors header"),
    ]:
        folder = link_copy(vedas_dir, tmp_path / name, skip={"model.safetensors"})
        (folder / "model.safetensors").write_bytes(content)
        api = FakeHfApi()
        with pytest.raises(ValueError, match=re.escape(f"{folder / 'model.safetensors'} {message}")) as error:
            push_to_hub(folder, "me/vedas-tiny", api=api)
        assert "re-save the model with save_pretrained" in str(error.value) and api.calls == []
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors",
                                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    sharded = link_copy(vedas_dir, tmp_path / "sharded", skip={"model.safetensors"},
                        extra={"model.safetensors.index.json": json.dumps(index)})
    os.symlink(Path(vedas_dir, "model.safetensors"), sharded / "model-00001-of-00002.safetensors")
    (sharded / "model-00002-of-00002.safetensors").write_bytes(data[:-1])
    with pytest.raises(ValueError, match=re.escape(f"{sharded / 'model-00002-of-00002.safetensors'} is "
                                                   f"{len(data) - 1} bytes, its header says {len(data)}")):
        check_folder(sharded)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    os.symlink(Path(vedas_dir, "model.safetensors"), sharded / "model-00002-of-00002.safetensors")
    assert "model-00002-of-00002.safetensors" in check_folder(sharded)
    (sharded / "extra.safetensors").write_bytes(b"")  # any root-level safetensors file is checked, indexed or not
    with pytest.raises(ValueError, match=re.escape(f"{sharded / 'extra.safetensors'} is 0 bytes")):
        check_folder(sharded)


def test_push_never_uploads_evaluation_outputs(vedas_dir, tmp_path):
    """examples/eval.py writes <checkpoint>/eval/{eval.json, eval.md, windows/sample_*.png} by default."""
    outputs = ["eval/eval.json", "eval/eval.md", "eval/windows/sample_0000.png", "eval/windows/sample_0001.png"]
    folder = link_copy(vedas_dir, tmp_path / "evaluated", extra={name: "x" for name in outputs})
    files = check_folder(folder)
    assert files == sorted(os.listdir(vedas_dir))
    assert vedas_hf.push.split_files(folder)[1] == sorted(outputs)
    from huggingface_hub.utils import filter_repo_objects

    assert list(filter_repo_objects(sorted(outputs + files), ignore_patterns=IGNORE_PATTERNS)) == files
    api = FakeHfApi()
    push_to_hub(folder, "me/vedas-tiny", api=api)
    assert api.calls[-1][2]["allow_patterns"] == files and "eval/*" in api.calls[-1][2]["ignore_patterns"]


def test_push_dry_run_checks_and_lists_files_without_calling_the_hub(vedas_dir, tmp_path, monkeypatch, capsys):
    folder = link_copy(vedas_dir, tmp_path / "dry", extra={"wandb/run-1/logs.txt": "x", "eval/eval.json": "{}"})
    api = FakeHfApi()
    files = push_to_hub(folder, "me/vedas-tiny", private=True, revision="v1", api=api, dry_run=True)
    assert files == check_folder(folder) and api.calls == []
    out = capsys.readouterr().out
    size = Path(vedas_dir, "model.safetensors").stat().st_size
    assert f"would upload {len(files)} files" in out and f"{size:,}  model.safetensors\n" in out
    assert "Would skip 2 leftover or hidden files: eval/eval.json, wandb/run-1/logs.txt" in out
    apis = []
    monkeypatch.setattr(vedas_hf.push, "HfApi", lambda token=None: apis.append(FakeHfApi()) or apis[-1])
    vedas_hf.push.main([str(folder), "me/vedas-tiny", "--dry-run"])
    assert all(not api.calls for api in apis)
    assert "Nothing was created or uploaded." in capsys.readouterr().out
    broken = link_copy(vedas_dir, tmp_path / "dry_broken", skip={"model.safetensors"})
    (broken / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is 0 bytes"):  # a dry run runs every check
        push_to_hub(broken, "me/vedas-tiny", api=api, dry_run=True)
    assert api.calls == []


def test_push_points_a_training_run_folder_at_its_final_or_newest_checkpoint(vedas_dir, tmp_path):
    """A run folder (examples/sft.py output_dir) holds final/ and checkpoint-<step>/ models but no config.json."""
    run = tmp_path / "run"
    link_copy(vedas_dir, run / "final")
    for step in (5, 40, 100):
        link_copy(vedas_dir, run / f"checkpoint-{step}", skip={"README.md"})
    with pytest.raises(ValueError, match=re.escape(f"did you mean {run / 'final'}?")):
        check_folder(run)
    shutil.rmtree(run / "final")
    with pytest.raises(ValueError, match=re.escape(f"pass its newest checkpoint, {run / 'checkpoint-100'},")):
        check_folder(run)  # by step: checkpoint-100, not the lexically last checkpoint-5
    empty = link_copy(vedas_dir, tmp_path / "no_config", skip={"config.json"},
                      extra={"checkpoint-7/notes.txt": "no model here"})
    with pytest.raises(ValueError, match=re.escape(f"{empty} has no config.json, so it is not a saved model")) as error:
        check_folder(empty)
    assert "did you mean" not in str(error.value) and "trainer.save_model" in str(error.value)
