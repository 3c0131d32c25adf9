"""The adversarial term learns: its discriminator separates real from fake when they
differ, and it cannot when they are the same distribution (loss stays near chance, 2)."""

import torch

from hypersd_core.distill.adversarial import AdversarialTerm
from hypersd_core.distill.tscd import adaptive_weight, edge_weight, tscd_loss
from hypersd_core.models.lora import add_lora


class _Embeds:
    def __init__(self, hidden):
        self.hidden = hidden

    def unet_kwargs(self):
        return {"encoder_hidden_states": self.hidden}


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        norm_num_groups=8, attention_head_dim=4)
    add_lora(unet, 2, 2.0, adapter_name="student")  # the discriminator reads it disabled
    return unet.requires_grad_(False)


def _train_discriminator(make_fake, steps=60):
    unet = _tiny_unet()
    ac = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
    term = AdversarialTerm(unet, ac, 1000, lr=2e-3, hidden=16)
    g = torch.Generator().manual_seed(0)
    embeds = _Embeds(torch.zeros(8, 4, 16))
    edge = torch.full((8,), -1, dtype=torch.long)  # the last segment: the edge is clean
    losses, logs = [], {}
    for _ in range(steps):
        real = torch.randn(8, 4, 8, 8, generator=g) * 0.3 + 1.0
        fake = make_fake(g)
        term.generator_loss(fake, real, edge, 8, embeds, g)
        logs = term.discriminator_step()
        losses.append(logs["loss_adv_d"])
    return sum(losses[-10:]) / 10, logs


def test_discriminator_learns_when_real_and_fake_differ():
    loss, logs = _train_discriminator(lambda g: torch.randn(8, 4, 8, 8, generator=g) * 0.3 - 1.0)
    assert loss < 1.0, f"discriminator hinge loss {loss:.3f} did not fall clearly below 2"
    assert logs["adv_acc_real"] > 0.8 and logs["adv_acc_fake"] > 0.8, logs


def test_discriminator_stays_at_chance_when_real_and_fake_agree():
    loss, _ = _train_discriminator(lambda g: torch.randn(8, 4, 8, 8, generator=g) * 0.3 + 1.0)
    assert loss > 1.6, f"hinge loss {loss:.3f} far below chance on identical distributions"


def test_x0_scale_undoes_the_edge_weight():
    """An x0 error e gives edge-space MSE edge_weight^2 * e^2; x0 scaling returns e^2."""
    ac = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
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
