"""Accelerator checks: the same latent code paths on a GPU, in float32 (equal to the CPU) and in bfloat16 (weights
or autocast, as `--bf16` training does).

Runs on the device named by `VEDAS_TEST_DEVICE` (default: `cuda` when available); skipped on a machine without
one, so CI (CPU only) skips this file. `VEDAS_TEST_DEVICE=cpu` runs the same checks on the CPU (a smoke test of
the file itself). `benchmarks/device_checks.sh` runs it on a lent GPU machine.
"""

import os

import pytest
import torch
from transformers import AutoModelForImageTextToText

from conftest import make_batch
from test_latent import training_batch, uncached_first_answer_logits
from test_modeling import randomize_gates

DEVICE = os.environ.get("VEDAS_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no accelerator (set VEDAS_TEST_DEVICE to run these checks)")

# bfloat16 keeps 8 bits of mantissa. The tiny models' logits (|logit| <= 0.56) differ by 3.9e-3 between the cached
# and the uncached bf16 computation on the CPU (both backbones; bf16 vs float32: 4.4e-3; batch vs one by one: 0).
# GPU kernels accumulate in a different order: 5x the CPU difference is allowed.
BF16_LOGIT_TOL = 2e-2


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 matmuls would make float32 on the GPU differ from the CPU by ~1e-3; the checks want the float32 path."""
    if DEVICE is None or not DEVICE.startswith("cuda"):
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def load(vedas_dir, device, dtype=torch.float32):
    """The checkpoint loaded as a user does (`dtype=` at load time), random router gates, moved to `device`."""
    model = AutoModelForImageTextToText.from_pretrained(vedas_dir, dtype=dtype).eval()
    randomize_gates(model)  # drawn on the CPU, so every device and dtype starts from the same gates
    return model.to(device)


def to_device(batch, device, dtype=None):
    """A processor batch on `device`; `pixel_values` cast to `dtype` (the model's) when given."""
    out = {k: v.to(device) for k, v in batch.items()}
    if dtype is not None and "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def prompt(processor, images):
    return make_batch(processor, ["How many shapes?", "Top left colour?"], [[images[0]], [images[1], images[2]]])


def test_float32_latent_generate_on_the_device_equals_the_cpu(vedas_dir, processor, images):
    batch = prompt(processor, images)
    kwargs = dict(num_latent_steps=3, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    cpu = load(vedas_dir, "cpu").generate(**batch, **kwargs)
    dev = load(vedas_dir, DEVICE).generate(**to_device(batch, DEVICE), **kwargs)
    assert [[row["visual_indices"] for row in step] for step in dev.latent_trace] == \
        [[row["visual_indices"] for row in step] for step in cpu.latent_trace]
    assert torch.equal(dev.sequences.cpu(), cpu.sequences)
    for step, (got, expected) in enumerate(zip(dev.logits, cpu.logits)):
        assert (got.cpu() - expected).abs().max().item() < 1e-4, step


def test_float32_training_forward_and_gradients_on_the_device_equal_the_cpu(vedas_dir, processor, images):
    results = []
    for device in ("cpu", DEVICE):
        model = load(vedas_dir, device).train()
        seq, labels = training_batch(processor, model, images)
        out = model(**to_device(seq, device), labels=labels.to(device))
        out.loss.backward()
        gate = next(l.router.gate for l in model.model.language_model.layers if l.router is not None)
        results.append((out.ce_loss.item(), out.recon_loss.item(), gate.grad.cpu(), model.token_sr.net.weight.grad.cpu()))
    (cpu_ce, cpu_recon, *cpu_grads), (dev_ce, dev_recon, *dev_grads) = results
    assert abs(cpu_ce - dev_ce) < 1e-5 and abs(cpu_recon - dev_recon) < 1e-5
    for got, expected in zip(dev_grads, cpu_grads):
        assert (got - expected).abs().max().item() < 1e-4 * max(1.0, expected.abs().max().item())


def test_bfloat16_cached_latent_generate_equals_uncached_recomputation(vedas_dir, processor, images):
    model = load(vedas_dir, DEVICE, torch.bfloat16)
    batch = to_device(prompt(processor, images), DEVICE, torch.bfloat16)
    out = model.generate(**batch, num_latent_steps=3, max_new_tokens=1, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        reference = uncached_first_answer_logits(model, batch, steps=3)
    assert torch.isfinite(out.logits[0]).all()
    assert (out.logits[0].float() - reference.float()).abs().max().item() < BF16_LOGIT_TOL


def test_bfloat16_generate_batch_equals_one_by_one(vedas_dir, processor, images):
    model = load(vedas_dir, DEVICE, torch.bfloat16)
    questions, row_images = ["How many shapes?", "Colour?"], [[images[0]], [images[1]]]
    kwargs = dict(num_latent_steps=2, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    together = model.generate(**to_device(make_batch(processor, questions, row_images), DEVICE, torch.bfloat16),
                              **kwargs)
    for row in range(2):
        alone = model.generate(**to_device(make_batch(processor, questions[row:row + 1], row_images[row:row + 1]),
                                           DEVICE, torch.bfloat16), **kwargs)
        diff = (alone.logits[0][0].float() - together.logits[0][row].float()).abs().max().item()
        assert diff < BF16_LOGIT_TOL, (row, diff)


@pytest.mark.parametrize("precision", ["bf16-weights", "bf16-autocast"])
def test_bfloat16_training_lowers_the_loss_and_updates_routers(vedas_dir, processor, images, precision):
    """`dtype=torch.bfloat16` weights, or float32 weights under bfloat16 autocast (the Trainer's `--bf16`)."""
    dtype = torch.bfloat16 if precision == "bf16-weights" else torch.float32
    model = load(vedas_dir, DEVICE, dtype).train()
    seq, labels = training_batch(processor, model, images)
    seq, labels = to_device(seq, DEVICE, dtype), labels.to(DEVICE)
    gates = [l.router.gate for l in model.model.language_model.layers if l.router is not None]
    before = [g.detach().clone() for g in gates]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3 if precision == "bf16-weights" else 3e-4)
    losses = []
    device_type = torch.device(DEVICE).type
    for _ in range(8):
        optimizer.zero_grad()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            out = model(**seq, labels=labels)
        out.loss.backward()
        assert torch.isfinite(out.loss) and out.recon_loss > 0
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(not torch.equal(g.detach(), b) for g, b in zip(gates, before))
