"""The adversarial term as PCM does it: heads on the teacher's encoder and decoder maps,
a discriminator that learns when real and fake differ (and cannot when they agree), D and
G steps that alternate, one D update per optimizer step over all its micro-batches, and
the switch of what "real" is."""

from types import SimpleNamespace

import pytest
import torch

from hypersd_core.distill.adversarial import AdversarialTerm, TeacherFeatureDiscriminator
from hypersd_core.distill.tscd import ConsistencyStage, adaptive_weight, edge_weight, tscd_loss
from hypersd_core.models.lora import add_lora


class _Embeds:
    def __init__(self, hidden):
        self.hidden = hidden

    def unet_kwargs(self):
        return {"encoder_hidden_states": self.hidden}

    def cat(self, other):
        return _Embeds(torch.cat([self.hidden, other.hidden]))


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        norm_num_groups=8, attention_head_dim=4)
    unet.requires_grad_(False)
    add_lora(unet, 2, 2.0, adapter_name="student")  # the discriminator reads it disabled
    unet.set_adapter("student")
    return unet


def _ac():
    return torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)


def _train_discriminator(make_fake, steps=60, real="data"):
    unet = _tiny_unet()
    term = AdversarialTerm(unet, _ac(), 1000, lr=2e-3, hidden=16, heads_per_map=2, real=real)
    g = torch.Generator().manual_seed(0)
    embeds = _Embeds(torch.zeros(8, 4, 16))
    edge = torch.full((8,), -1, dtype=torch.long)  # the last segment: the edge is clean
    losses, logs = [], {}
    for _ in range(steps):
        term.begin_step()
        real_x = torch.randn(8, 4, 8, 8, generator=g) * 0.3 + 1.0
        term.accumulate_d(make_fake(g), real_x, edge, 8, embeds, g)
        logs = term.step()
        losses.append(logs["loss_adv_d"])
    return sum(losses[-10:]) / 10, logs


def test_heads_read_encoder_middle_and_decoder_maps():
    unet = _tiny_unet()
    disc = TeacherFeatureDiscriminator(unet, hidden=0, heads_per_map=3)
    maps = disc.maps(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]),
                     _Embeds(torch.zeros(2, 4, 16)))
    # 2 encoder blocks + the middle + 2 decoder blocks, 3 heads each, one logit per pixel
    assert len(maps) == 5 * 3
    assert [tuple(m.shape[1:]) for m in maps[::3]] == [(1, 4, 4), (1, 4, 4), (1, 4, 4),
                                                       (1, 8, 8), (1, 8, 8)]
    # hidden 0: PCM's heads keep the map's channels (16, 32, 32, 32, 16)
    assert [h[0].conv1[0].out_channels for h in disc.heads] == [16, 32, 32, 32, 16]


@pytest.mark.slow  # trains a discriminator to convergence
def test_discriminator_learns_when_real_and_fake_differ():
    loss, logs = _train_discriminator(lambda g: torch.randn(8, 4, 8, 8, generator=g) * 0.3 - 1.0)
    assert loss < 1.0, f"discriminator hinge loss {loss:.3f} did not fall clearly below 2"
    assert logs["adv_acc_real"] > 0.8 and logs["adv_acc_fake"] > 0.8, logs


def test_discriminator_stays_at_chance_when_real_and_fake_agree():
    loss, _ = _train_discriminator(lambda g: torch.randn(8, 4, 8, 8, generator=g) * 0.3 + 1.0)
    assert loss > 1.6, f"hinge loss {loss:.3f} far below chance on identical distributions"


def test_generator_loss_reaches_the_fake_not_the_heads():
    unet = _tiny_unet()
    term = AdversarialTerm(unet, _ac(), 1000, hidden=8, heads_per_map=2)
    fake = torch.randn(2, 4, 8, 8, requires_grad=True)
    g, logs = term.generator_loss(fake, torch.tensor([-1, 124]), 8,
                                  _Embeds(torch.zeros(2, 4, 16)), torch.Generator().manual_seed(0))
    g.sum().backward()
    assert g.shape == (2,) and (g >= 0).all() and "loss_adv_g" in logs
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in term.params)
    assert all(p.requires_grad for p in term.params)  # restored for the D step


# ---------------------------------------------------------------- the stage's schedule
class _Data:
    def __init__(self, b=4):
        g = torch.Generator().manual_seed(1)
        self.latents = torch.randn(b, 4, 8, 8, generator=g)
        self.embeds = _Embeds(torch.randn(b, 4, 16, generator=g))
        self.uncond = _Embeds(torch.zeros(b, 4, 16))


def _stage(**cfg_values):
    unet = _tiny_unet()
    values = dict(stage="tscd", k=2, num_solver_steps=8, t_end="edge", w_min=1.0, w_max=1.0,
                  distance="mse", huber_c=0.001, offset_noise=0.0, loss_scale="none",
                  loss_scale_min=0.01, target="online", adv_weight=0.1, adv_dynamic=False,
                  adv_real="target", adv_schedule="alternate", grad_accum=1)
    values.update(cfg_values)
    cfg = SimpleNamespace(**values)
    backbone = SimpleNamespace(unet=unet, alphas_cumprod=_ac(), device=torch.device("cpu"),
                               num_train_timesteps=1000, prediction_type="epsilon")
    term = AdversarialTerm(unet, _ac(), 1000, lr=1e-3, hidden=8, heads_per_map=2,
                           real=cfg.adv_real, schedule=cfg.adv_schedule,
                           grad_accum=cfg.grad_accum)
    stage = ConsistencyStage(cfg, backbone, discriminator=term)
    student = [p for n, p in unet.named_parameters() if "student" in n]
    stage.setup(student)
    return stage, term, student


def _count_steps(term):
    calls = []
    original = term.optimizer.step

    def step(*a, **k):
        calls.append(1)
        return original(*a, **k)
    term.optimizer.step = step
    return calls


def test_d_and_g_steps_alternate_as_pcm():
    stage, term, student = _stage()
    d_steps = _count_steps(term)
    heads_before = [p.detach().clone() for p in term.params]
    for step in range(4):
        stage.begin_step(step)
        loss, logs = stage.loss(_Data(), torch.Generator().manual_seed(step))
        if step % 2 == 0:  # PCM's even steps: the discriminator only, no student loss
            assert loss is None and "loss_adv_g" not in logs
            assert all(p.grad is None for p in student)
        else:  # odd steps: consistency + relu(1 - D); the heads do not train
            assert loss is not None and "loss_adv_g" in logs
            loss.mean().backward()
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student)
            for p in student:
                p.grad = None
        logs = stage.after_step(step)
        assert ("loss_adv_d" in logs) == (step % 2 == 0)
    assert len(d_steps) == 2
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, term.params))


def test_joint_schedule_trains_both_every_step():
    stage, term, _ = _stage(adv_schedule="joint")
    d_steps = _count_steps(term)
    for step in range(2):
        stage.begin_step(step)
        loss, logs = stage.loss(_Data(), torch.Generator().manual_seed(step))
        assert loss is not None and "loss_adv_g" in logs
        assert "loss_adv_d" in stage.after_step(step)
    assert len(d_steps) == 2


def test_discriminator_trains_on_every_micro_batch_once_per_step():
    """grad_accum 3: three micro-batches accumulate into one update, not three, and not
    only the last one's (the gradient equals the mean of the three micro-batches')."""
    stage, term, _ = _stage(grad_accum=3)
    d_steps = _count_steps(term)
    stage.begin_step(0)
    grads = []
    for micro in range(3):
        before = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                  for p in term.params]
        assert stage.loss(_Data(), torch.Generator().manual_seed(micro))[0] is None
        grads.append([p.grad - b for p, b in zip(term.params, before)])
    assert all(any(x.abs().sum() > 0 for x in g) for g in grads)  # each micro-batch counted
    logs = stage.after_step(0)
    assert len(d_steps) == 1 and "loss_adv_d" in logs


@pytest.mark.parametrize("real", ["target", "data"])
def test_real_is_the_reno_target_or_the_data(real, monkeypatch):
    stage, term, _ = _stage(adv_real=real)
    seen = {}

    def spy(fake, real_x, edge, k, embeds, generator):
        seen["real"], seen["fake"] = real_x, fake
    monkeypatch.setattr(term, "accumulate_d", spy)
    data = _Data()
    stage.begin_step(0)
    stage.loss(data, torch.Generator().manual_seed(0))
    if real == "data":
        assert torch.equal(seen["real"], data.latents)
    else:  # the target's edge jump: close to the student's (the same online weights)
        assert not torch.equal(seen["real"], data.latents)
        assert seen["real"].shape == seen["fake"].shape
        assert (seen["real"] - seen["fake"]).abs().mean() < (seen["real"] - data.latents).abs().mean()


def test_x0_scale_undoes_the_edge_weight():
    """An x0 error e gives edge-space MSE edge_weight^2 * e^2; x0 scaling returns e^2."""
    ac = _ac()
    a_t, a_e = ac[torch.tensor([899, 124])], ac[torch.tensor([874, -1 + 1])]
    x_t = torch.randn(2, 4, 4, 4)
    x0 = torch.randn(2, 4, 4, 4)
    eps = (x_t - a_t.sqrt().view(-1, 1, 1, 1) * x0) / (1 - a_t).sqrt().view(-1, 1, 1, 1)
    x0_bad = x0 + 0.1
    eps_bad = (x_t - a_t.sqrt().view(-1, 1, 1, 1) * x0_bad) / (1 - a_t).sqrt().view(-1, 1, 1, 1)
    target = a_e.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a_e).sqrt().view(-1, 1, 1, 1) * eps
    edge_space = tscd_loss(x0_bad, eps_bad, target, a_e)
    w2 = edge_weight(a_t, a_e).square()
    torch.testing.assert_close(edge_space, w2 * 0.01, rtol=1e-3, atol=1e-8)
    assert w2[0] < 0.02 < 0.5 < w2[1]  # k=8's first segment against the last
    scaled = tscd_loss(x0_bad, eps_bad, target, a_e, a_t=a_t, scale_min=1e-4)
    torch.testing.assert_close(scaled, torch.full((2,), 0.01), rtol=1e-3, atol=1e-8)


def test_adaptive_weight_balances_gradients_at_the_last_layer():
    w = torch.nn.Parameter(torch.ones(3))
    rec = (w * 2).sum()  # gradient norm 2 * sqrt(3)
    adv = (w * 0.5).sum()  # gradient norm 0.5 * sqrt(3)
    ratio = adaptive_weight(rec, adv, w, max_ratio=10.0)
    assert abs(ratio.item() - 4.0) < 1e-3
    assert adaptive_weight(rec, adv * 1e-6, w, max_ratio=10.0).item() == 10.0
