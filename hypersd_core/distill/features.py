"""Feature maps of a UNet's blocks, read by forward hooks (no copied forward).

Two readers use them: PCM's discriminator (every encoder, middle and decoder block of
the frozen teacher) and DMD2's classifier (the bottleneck of the fake score). The
UNet's forward stops after the last block asked for (a hook raises), so a reader of
the bottleneck never runs the decoder.
"""

from __future__ import annotations

import contextlib

import torch


class _Stop(Exception):
    pass


def block_channels(block: torch.nn.Module) -> int:
    """Output channels of a diffusers UNet block (its last resnet's)."""
    return block.resnets[-1].out_channels


def all_blocks(unet) -> list[torch.nn.Module]:
    """The encoder blocks, the middle block and the decoder blocks, in forward order
    (PCM's ``modified_forward`` returns their outputs: 9 maps on SD1.5)."""
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


def block_outputs(unet, blocks: list[torch.nn.Module], x: torch.Tensor, t: torch.Tensor,
                  unet_kwargs: dict) -> list[torch.Tensor]:
    """The outputs of ``blocks`` (in the order given) for one UNet forward [B,C,h,w] each;
    the forward stops after the last of them to run."""
    found: dict[int, torch.Tensor] = {}
    want = {id(b) for b in blocks}

    def hook(module, args, output):
        found[id(module)] = output[0] if isinstance(output, tuple) else output
        if len(found) == len(want):
            raise _Stop

    handles = [b.register_forward_hook(hook) for b in blocks]
    try:
        unet(x, t, **unet_kwargs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, b in enumerate(blocks) if id(b) not in found]
    if missing:
        raise RuntimeError(f"UNet blocks {missing} did not run in the forward pass")
    return [found[id(b)] for b in blocks]


@contextlib.contextmanager
def no_grad_for(params):
    """Build the graph without ``params`` as leaves: gradients flow through them to the
    input (the generator's sample) but none accumulate in them (another optimiser's
    weights: the discriminator's heads, DMD2's fake score and classifier)."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
