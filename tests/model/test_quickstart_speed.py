"""The quickstart's faster training step computes what the straightforward one did.

Each faster path is compared with a plain reference computation written out here: the prefixed backbone against a
per-layer loop that indexes the prefixes, and ``create_optimizer``'s AdamW (the fused kernel) against the AdamW update
worked out from its formula (Loshchilov & Hutter, decoupled weight decay) and against torch's for-loop AdamW, whose
optimiser state must still load (checkpoints written before the change resume).
"""

import copy
import math

import pytest
import torch

from model import build_facegcd
from trainer.optim import create_optimizer


def test_prefixed_backbone_matches_per_layer_reference(make_config, images):
    torch.manual_seed(0)
    model = build_facegcd(make_config(grad_from_block=0)).train()
    backbone = model.backbone
    tokens = backbone.embed_tokens(images)
    prefixes = torch.randn(12, 2, images.shape[0], 3, 4, 64, requires_grad=True)

    def reference() -> torch.Tensor:
        x = tokens
        for i, block in enumerate(backbone.blocks):
            x = block(x, prefixes[i])
        return backbone.norm(x)

    weights = torch.randn(images.shape[0], backbone.num_tokens, 192, generator=torch.Generator().manual_seed(1))
    outputs, grads = [], []
    for forward in (reference, lambda: backbone.forward_tokens(tokens, prefixes)):
        out = forward()
        outputs.append(out)
        grads.append(torch.autograd.grad((out * weights).sum(), [prefixes, backbone.blocks[0].attn.qkv.weight]))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for fast, slow in zip(grads[1], grads[0]):
        assert slow.abs().sum() > 0  # the prefixes of every layer and the first block's weights receive gradient
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def _adamw_by_hand(param, grads, *, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """AdamW with decoupled weight decay, step by step: p <- p(1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)."""
    p, m, v = param.clone(), torch.zeros_like(param), torch.zeros_like(param)
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * weight_decay)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


def _run(optimizer, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()


def test_adamw_update_equals_its_formula_and_uses_the_fused_kernel():
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(7, 5, generator=gen), torch.randn(5, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in start] for _ in range(3)]
    params = [torch.nn.Parameter(p.clone()) for p in start]
    optimizer = create_optimizer(
        [{"params": params[:1], "weight_decay": 0.05}, {"params": params[1:], "weight_decay": 0.0}],
        opt="adamw",
        lr=1e-2,
    )
    assert optimizer.defaults["fused"] is True
    _run(optimizer, params, grads)
    for i, wd in enumerate((0.05, 0.0)):
        expected = _adamw_by_hand(start[i], [g[i] for g in grads], lr=1e-2, weight_decay=wd)
        torch.testing.assert_close(params[i].detach(), expected, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(params[i].detach(), start[i])  # three steps of 1e-2 moved every parameter
    assert math.isclose(float(optimizer.state[params[0]]["step"]), 3.0)


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_optimizer_state_of_the_for_loop_implementation_resumes(opt):
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(6, 4, generator=gen)
    grads = [[torch.randn(6, 4, generator=gen)] for _ in range(4)]
    old_params = [torch.nn.Parameter(start.clone())]
    old_class = torch.optim.AdamW if opt == "adamw" else torch.optim.SGD
    kwargs = dict(lr=1e-2, weight_decay=0.05, foreach=False)
    kwargs.update({} if opt == "adamw" else dict(momentum=0.9, nesterov=True))
    old = old_class(old_params, **kwargs)
    _run(old, old_params, grads[:2])
    new_params = [torch.nn.Parameter(old_params[0].detach().clone())]
    new = create_optimizer(new_params, opt=opt, lr=1e-2, weight_decay=0.05)
    new.load_state_dict(copy.deepcopy(old.state_dict()))  # as from a checkpoint file: no shared tensors
    _run(old, old_params, grads[2:])
    _run(new, new_params, grads[2:])
    torch.testing.assert_close(new_params[0].detach(), old_params[0].detach(), rtol=1e-6, atol=1e-7)
