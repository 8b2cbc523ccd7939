"""The pieces that let each Vedas component act and be measured: the reconstruction loss without a collapse path,
the learning-rate multiplier of the added modules, router diagnostics, the zero-latent probe, the validation split of
the bundled tasks and the statistics of the table."""

import math

import pytest
import torch
from transformers import AutoModelForImageTextToText

from test_latent import load, training_batch
from test_trainer import make_args
from vedas_hf.diagnostics import gate_magnitudes, heldout_cross_entropy, refined_share, routers_disabled
from vedas_hf.modeling.modeling_vedas import _visual_positions
from vedas_hf.stats import mean_ci, paired_sample_ci, t_quantile_975
from vedas_hf.toy import make_digit_arithmetic, make_task_splits
from vedas_hf.trainer import VedasSFTConfig, VedasSFTTrainer, vedas_added_parameters


def _replay_inputs(model, processor, images):
    from conftest import make_batch

    batch = make_batch(processor, ["Shape?", "Colour?"], [[images[0]], [images[1]]])
    ids = batch["input_ids"]
    prompt_embeds = model._prompt_embeddings(ids, batch["pixel_values"], batch.get("image_grid_thw"))
    visual_pos, visual_valid = _visual_positions(ids == model.config.image_token_id)
    saliency = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    return saliency, visual_pos, visual_valid, prompt_embeds


@pytest.mark.parametrize("grad_to_vision", [False, True])
def test_pooled_replay_features_are_values_only_by_default(vedas_dir, processor, images, grad_to_vision):
    """b(t) = Pool(B(t)) carries gradient to the saliency weights (eq. 6) but, by default, none to the visual features
    it pools; the replayed tokens themselves (the language model's input) keep both."""
    model = load(vedas_dir, recon_grad_to_vision=grad_to_vision).train()
    saliency, visual_pos, visual_valid, prompt_embeds = _replay_inputs(model, processor, images)
    active = torch.ones(visual_pos.shape[0], dtype=torch.bool)
    visited = torch.zeros_like(visual_valid)
    tokens, _, _, _, pooled = model._replay_tokens(saliency, visual_pos, visual_valid, visited, prompt_embeds,
                                                   active, 3)
    d_embeds, d_saliency = torch.autograd.grad(pooled.square().sum(), [prompt_embeds, saliency], retain_graph=True,
                                               allow_unused=True)
    assert d_saliency.abs().sum() > 0
    assert (d_embeds is not None and d_embeds.abs().sum() > 0) == grad_to_vision
    d_embeds, d_saliency = torch.autograd.grad(tokens.square().sum(), [prompt_embeds, saliency])
    assert d_embeds.abs().sum() > 0 and d_saliency.abs().sum() > 0
    # the values are the same either way: only the gradient path differs
    reference = load(vedas_dir, recon_grad_to_vision=not grad_to_vision).train()
    other = reference._replay_tokens(saliency, visual_pos, visual_valid, visited, prompt_embeds, active, 3)[-1]
    torch.testing.assert_close(pooled, other)


def _recon_gradients(model, processor, images):
    seq, labels = training_batch(processor, model, images)
    model(**seq, labels=labels).recon_loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_reconstruction_loss_alone_sends_no_gradient_into_the_vision_tower(vedas_dir, processor, images):
    """The collapse path: the target is the tower's own (no-grad) encoding of the crop, so any gradient from the
    reconstruction loss into the tower lets the loss fall by flattening the tower's features. By default the loss
    alone gives exactly zero gradient on every vision-tower parameter and reaches TokenSR and every layer's queries,
    keys and input norm (through the saliency weights of eq. 6, computed from the layers' detached inputs), and no
    other language-model weight; with `recon_grad_to_vision=True` it reaches the tower (values and saliency)."""
    grads = {}
    for grad_to_vision in (False, True):
        model = load(vedas_dir, recon_grad_to_vision=grad_to_vision).train()
        grads[grad_to_vision] = _recon_gradients(model, processor, images)
    for grad_to_vision in (False, True):
        grads[grad_to_vision] = _vision_gradients(model, grads[grad_to_vision])
    tower = [name for name in grads[False] if name.startswith("vision:")]
    assert tower
    for name in tower:
        assert grads[False][name] is None or not grads[False][name].any(), name
    assert any(grads[True][name] is not None and grads[True][name].abs().sum() > 0 for name in tower)

    reached = {name for name, g in grads[False].items() if g is not None and g.abs().sum() > 0}
    assert {"token_sr.net.weight", "token_sr.net.bias"} <= reached
    layers = model.model.language_model.layers
    prefix = next(name for name, module in model.named_modules() if module is layers) + "."  # ...layers.
    for i in range(len(layers)):
        assert {f"{prefix}{i}.self_attn.q_proj.weight", f"{prefix}{i}.self_attn.k_proj.weight",
                f"{prefix}{i}.input_layernorm.weight"} <= reached, i
    language = {name for name in reached if not name.startswith("token_sr.")}
    assert all(name.startswith(prefix) for name in language), language  # no embedding, no final norm, no head
    assert all(name[len(prefix):].split(".")[1] in ("self_attn", "input_layernorm") for name in language)
    assert not any("v_proj" in name or "o_proj" in name or "mlp" in name for name in language)


def _vision_gradients(model, grads: dict) -> dict:
    """`grads` with what the visual features come from renamed `vision:<name>`: Qwen's vision tower; Chameleon's
    image-code rows of the embedding table (its VQ-VAE is discrete)."""
    if hasattr(model.model, "visual"):
        return {("vision:" + n if n.startswith("model.visual.") else n): g for n, g in grads.items()}
    name = next(n for n, p in model.named_parameters() if p is model.model.embed_tokens.weight)
    codes = model.model.vocabulary_mapping.image_tokens
    embedding = grads.pop(name)
    return {**grads, "vision:image-code embeddings": None if embedding is None else embedding[codes]}


def test_detached_saliency_has_the_values_of_the_saliency(vedas_dir, processor, images):
    """The reconstruction loss's weights are the saliency recomputed from detached layer inputs: equal values (the
    loss is unchanged), only the gradient path differs."""
    losses = {}
    for grad_to_vision in (False, True):
        model = load(vedas_dir, recon_grad_to_vision=grad_to_vision).train()
        seq, labels = training_batch(processor, model, images)
        out = model(**seq, labels=labels)
        losses[grad_to_vision] = (out.recon_loss.item(), out.ce_loss.item())
    assert losses[False] == pytest.approx(losses[True], rel=1e-6)


def test_recon_grad_to_vision_is_validated(vedas_dir):
    with pytest.raises(ValueError, match="recon_grad_to_vision='yes'"):
        AutoModelForImageTextToText.from_pretrained(vedas_dir, recon_grad_to_vision="yes")


def test_latent_inputs_zeros_changes_the_answer_logits_and_is_validated(vedas_dir, processor, images):
    from conftest import make_batch

    model = load(vedas_dir)
    batch = make_batch(processor, ["Shape?"], [[images[0]]])
    kwargs = dict(max_new_tokens=2, do_sample=False, num_latent_steps=2, return_dict_in_generate=True,
                  output_logits=True)
    hidden = model.generate(**batch, **kwargs)
    zeros = model.generate(**batch, latent_inputs="zeros", **kwargs)
    assert not torch.allclose(hidden.logits[0], zeros.logits[0])
    # same replay selections at step 0 (the prompt's saliency does not depend on the latent inputs)
    assert hidden.latent_trace[0] == zeros.latent_trace[0]
    with pytest.raises(ValueError, match="latent_inputs='random'"):
        model.generate(**batch, latent_inputs="random", max_new_tokens=1, num_latent_steps=1)


# ---- the learning-rate multiplier of the added modules -----------------------------------------------------


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    from vedas_hf.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("components"), seed=0, replay_top_k=4, router_top_k=2,
                                num_latent_steps=2)


@pytest.fixture(scope="module")
def digit_records():
    return make_digit_arithmetic(16, 0, seed=0, digit_size=24, rows=1)[0]


def _trainer(train_dir, records, tmp_path, **overrides):
    from transformers import AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(train_dir)
    processor = AutoProcessor.from_pretrained(train_dir)
    args = make_args(tmp_path, **{"num_train_epochs": 1, "max_latent_stage": 1, **overrides})
    return VedasSFTTrainer(model=model, args=args, train_dataset=records, processing_class=processor)


def test_vedas_lr_multiplier_puts_routers_and_token_sr_in_their_own_groups(train_dir, digit_records, tmp_path):
    trainer = _trainer(train_dir, digit_records, tmp_path, vedas_lr_multiplier=10.0, weight_decay=0.1)
    optimizer = trainer.create_optimizer()
    added = {id(p) for p in vedas_added_parameters(trainer.model)}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert added and all("router" in names[i] or "token_sr" in names[i] for i in added)
    lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert set(lrs) == {id(p) for p in trainer.model.parameters() if p.requires_grad}  # every parameter, once
    for i, lr in lrs.items():
        assert lr == pytest.approx(2e-3 * (10.0 if i in added else 1.0)), names[i]
    # the gates and biases keep the weight decay of the group they came from
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    gate = next(i for i in added if names[i].endswith("gate"))
    score_bias = next(i for i in added if names[i].endswith("score.bias"))
    assert decay[score_bias] == 0.0 and decay[gate] in (0.0, 0.1)


def test_vedas_lr_multiplier_moves_the_gates_further(train_dir, digit_records, tmp_path):
    """Same data, same seed: the gates (zero at the start) end larger with the multiplier, and the scheduler scales
    both groups alike (the ratio of the learning rates stays at the multiplier)."""
    moved = {}
    for multiplier in (1.0, 10.0):
        trainer = _trainer(train_dir, digit_records, tmp_path / str(multiplier), vedas_lr_multiplier=multiplier,
                           lr_scheduler_type="linear", num_train_epochs=2)  # stage 1 (latents) in the second epoch
        trainer.train()
        moved[multiplier] = sum(sum(v) for v in gate_magnitudes(trainer.model).values())
        groups = trainer.optimizer.param_groups
        if multiplier == 10.0:
            base = min(g["lr"] for g in groups)
            assert max(g["lr"] for g in groups) == pytest.approx(10 * base) or base == 0
    assert moved[1.0] > 0 and moved[10.0] > 3 * moved[1.0]


@pytest.mark.parametrize("value", [0, -1.0, "10"])
def test_vedas_lr_multiplier_is_validated(tmp_path, value):
    with pytest.raises(ValueError, match="vedas_lr_multiplier"):
        VedasSFTConfig(output_dir=str(tmp_path), vedas_lr_multiplier=value, use_cpu=True, bf16=False)


# ---- diagnostics ----------------------------------------------------------------------------------------------


def test_routers_disabled_gives_the_stock_layers_and_restores_the_gates(vedas_dir, processor, images):
    from conftest import make_batch

    model = load(vedas_dir)  # random gates
    before = gate_magnitudes(model)
    assert all(v[0] > 0 for v in before.values())
    batch = make_batch(processor, ["Shape?"], [[images[0]]])
    routed = model.generate(**batch, max_new_tokens=3, do_sample=False, num_latent_steps=2,
                            return_dict_in_generate=True, output_logits=True).logits
    with routers_disabled(model):
        assert all(v[0] == 0 for v in gate_magnitudes(model).values())
        off = model.generate(**batch, max_new_tokens=3, do_sample=False, num_latent_steps=2,
                             return_dict_in_generate=True, output_logits=True).logits
    reference = load(vedas_dir, router_layers="none")  # no routers at all
    for layer in reference.model.language_model.layers:
        assert layer.router is None
    stock = reference.generate(**batch, max_new_tokens=3, do_sample=False, num_latent_steps=2,
                               return_dict_in_generate=True, output_logits=True).logits
    torch.testing.assert_close(off[0], stock[0])
    assert not torch.allclose(routed[0], off[0])
    assert gate_magnitudes(model) == before


def test_refined_share_counts_alpha_per_chunk(vedas_dir):
    config = load(vedas_dir).config  # replay_top_k=3, router_top_k=4, routers on every layer
    # prompt of 20 tokens (6 visual): chunks 20, 3 + 1, 3 + 1, then nothing left to replay: 0 + 1
    shares = refined_share(config, [20], [6], 3)
    expected = (4 + 4 + 4 + 1) / (20 + 4 + 4 + 1)
    assert shares["mean"] == pytest.approx(expected)
    assert set(shares) == set(config.router_layer_indices) | {"mean"}
    config.router_top_k = 2
    assert refined_share(config, [20], [6], 3)["mean"] == pytest.approx((2 + 2 + 2 + 1) / 29)
    config.router_layers = "none"
    assert refined_share(config, [20], [6], 3) == {"mean": 0.0}


def test_heldout_cross_entropy_matches_the_trainer_evaluation(train_dir, digit_records, tmp_path):
    trainer = _trainer(train_dir, digit_records, tmp_path, num_train_epochs=2, max_latent_stage=1)
    trainer.model.eval()
    ours = heldout_cross_entropy(trainer.model, trainer.processing_class, digit_records[:8], trainer.args,
                                 batch_size=8)
    evaluated = trainer.evaluate(eval_dataset=trainer._eval_dataset(digit_records[:8], trainer.processing_class,
                                                                      trainer.args, "check"))
    assert ours == pytest.approx(evaluated["eval_loss"], rel=1e-5)


# ---- the bundled tasks' validation split -----------------------------------------------------------------------


def test_validation_split_comes_from_held_out_training_images():
    splits = make_task_splits("digits", 200, 100, 100, seed=0)
    ids = {name: {s for r in records for s in r["source_ids"]} for name, records in splits.items()}
    assert ids["train"] and ids["validation"] and ids["test"]
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    # the test split draws from the same scans as without a validation split
    _, test = make_digit_arithmetic(0, 100, seed=0)
    assert {s for r in test for s in r["source_ids"]} <= ids["test"] | {s for r in test for s in r["source_ids"]}
    shapes = make_task_splits("shapes", 60, 30, 0, seed=0)
    train_images = {r["image"].tobytes() for r in shapes["train"]}
    assert not any(r["image"].tobytes() in train_images for r in shapes["validation"])


def test_digits_default_to_two_by_two_visual_tokens():
    train, _ = make_digit_arithmetic(2, 0, seed=0)
    assert train[0]["image"].size == (48, 32)  # 3 columns x 2 rows of 16 px tiles


# ---- statistics -------------------------------------------------------------------------------------------------


def test_mean_ci_against_known_values():
    ci = mean_ci([0.5, 0.6, 0.7])
    assert ci["mean"] == pytest.approx(0.6)
    assert ci["half_width"] == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-4)
    assert mean_ci([0.4])["low"] is None
    assert t_quantile_975(1) == pytest.approx(12.706) and t_quantile_975(1000) == 1.96
    with pytest.raises(ValueError, match="df=0"):
        t_quantile_975(0)


def test_paired_sample_ci_uses_the_per_sample_differences():
    a, b = [1, 1, 0, 1, 0, 1], [1, 0, 0, 0, 0, 1]
    ci = paired_sample_ci(a, b)
    diffs = [0, 1, 0, 1, 0, 0]
    sd = math.sqrt(sum((d - 1 / 3) ** 2 for d in diffs) / 5)
    assert ci["mean"] == pytest.approx(1 / 3) and ci["half_width"] == pytest.approx(1.96 * sd / math.sqrt(6))
    with pytest.raises(ValueError, match="equal lengths"):
        paired_sample_ci([1], [1, 0])


# ---- earlier-stage mixing (Coconut) ------------------------------------------------------------------------------


def test_earlier_stage_probability_renders_some_records_with_fewer_latents(train_dir, digit_records, tmp_path):
    counts = {}
    for probability in (0.0, 0.5, 1.0):
        trainer = _trainer(train_dir, digit_records, tmp_path / str(probability), max_latent_stage=2,
                           earlier_stage_probability=probability)
        renderer = trainer.curriculum_callback.renderers[0]
        renderer.stage, renderer.epoch = 2, 3
        counts[probability] = [renderer.example(i)["num_latents"] for i in range(len(digit_records))]
        # the same epoch renders the same stages (a resume sees the same data); evaluation never mixes
        assert counts[probability] == [renderer.example(i)["num_latents"] for i in range(len(digit_records))]
        assert not trainer._eval_renderers or not trainer._eval_renderers[0].mix_earlier_stages
    assert counts[0.0] == [2] * len(digit_records)
    assert all(c in (0, 1) for c in counts[1.0]) and {0, 1} <= set(counts[1.0])
    assert 0 < sum(c < 2 for c in counts[0.5]) < len(digit_records)
    renderer.epoch = 4  # another epoch draws again
    assert [renderer.example(i)["num_latents"] for i in range(len(digit_records))] != counts[1.0]


def test_earlier_stage_mixing_trains_and_is_validated(train_dir, digit_records, tmp_path):
    trainer = _trainer(train_dir, digit_records, tmp_path, max_latent_stage=1, num_train_epochs=2,
                       earlier_stage_probability=0.5)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "ce_loss" in log]
    assert logs[-1]["stage"] == 1.0 and all(math.isfinite(log["ce_loss"]) for log in logs)
    with pytest.raises(ValueError, match="earlier_stage_probability=1.5"):
        VedasSFTConfig(output_dir=str(tmp_path), earlier_stage_probability=1.5, use_cpu=True, bf16=False)


# ---- the logit-lens probe of the latent steps ---------------------------------------------------------------------


def test_latent_probe_reads_the_lm_head_at_each_latent(vedas_dir, processor, images):
    """The probe of step t is the LM head's distribution at the t-th latent: the same as the teacher-forced latent
    forward's logits at the latent columns."""
    from conftest import make_batch
    from test_modeling import latent_sequence

    model = load(vedas_dir)
    batch = make_batch(processor, ["Shape?", "Colour of the big one?"], [[images[0]], [images[1]]])
    out = model.generate(**batch, num_latent_steps=2, max_new_tokens=1, do_sample=False,
                         return_dict_in_generate=True, latent_probe_top_k=3)
    seq = latent_sequence(processor, batch, model.config, 2, [])
    with torch.no_grad():
        logits = model(**seq).logits
    first = batch["input_ids"].shape[1] + 1  # after the start marker
    for step in range(2):
        expected = logits[:, first + step].softmax(-1).topk(3)
        for row in range(2):
            probe = out.latent_trace[step][row]["probe"]
            assert [token for token, _ in probe] == expected.indices[row].tolist()
            assert [p for _, p in probe] == pytest.approx(expected.values[row].tolist(), abs=1e-5)
    plain = model.generate(**batch, num_latent_steps=2, max_new_tokens=1, return_dict_in_generate=True)
    assert "probe" not in plain.latent_trace[0][0]
    with pytest.raises(ValueError, match="latent_probe_top_k=-1"):
        model.generate(**batch, num_latent_steps=1, max_new_tokens=1, latent_probe_top_k=-1)
