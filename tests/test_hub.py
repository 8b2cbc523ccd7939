"""Hub distribution: config templates for the paper's backbones, conversion CLI per backbone, push tooling
(against a fake `HfApi`), and the `image-text-to-text` pipeline on a loaded folder."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, pipeline

from vedas_hf.convert import convert_checkpoint, detect_backbone
from vedas_hf.push import check_folder, push_to_hub
from vedas_hf.testing import make_tiny_images


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB_CONFIGS = os.path.join(REPO, "hub_configs")

# template -> (model class, stock parameter count of the checkpoint it names, hidden, layers, lambda)
TEMPLATES = {
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
    assert stock == stock_params  # exactly the architecture of the stock checkpoint the template names
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
    image = make_tiny_images(1, sizes=((48, 32),), seed=3)[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    out = pipe(text=messages, max_new_tokens=4, return_full_text=False,
               generate_kwargs={"num_latent_steps": 2, "do_sample": False, "min_new_tokens": 4})
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}], add_generation_prompt=True
    )
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, num_latent_steps=2)
    expected = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert out[0]["generated_text"] == expected
