"""The optimizer and its learning-rate schedule; which parameters are the classifier ("head") when fine-tuning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cnnlab.errors import CnnlabError

if TYPE_CHECKING:
    from cnnlab.engine.config import TrainConfig


def classifier_modules(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The classifier: the last module with its own parameters that the forward pass calls, for input x (1, C, H, W).

    Everything before it is the feature extractor ("backbone") that --freeze features keeps fixed.
    """
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []

    def hook(module: nn.Module, inputs: object, output: object) -> None:
        order.append(names[module])

    # Not the root: its own parameters (ViT's class token) are used first, but its hook would fire last.
    own = [m for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False))]
    handles = [m.register_forward_hook(hook) for m in own]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if not order:
        raise CnnlabError("the model has no parameters to train")
    return [order[-1]]


def split_parameters(model: nn.Module, head: list[str]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone, head) parameters, given the head's module names."""
    head_ids = {id(p) for name in head for p in model.get_submodule(name).parameters()}
    params = list(model.parameters())
    return [p for p in params if id(p) not in head_ids], [p for p in params if id(p) in head_ids]


def lr_scale(cfg: TrainConfig, world_size: int) -> float:
    """The factor --scale-lr puts on the peak lr for `world_size` data-parallel processes (1 without it)."""
    if world_size <= 1 or cfg.scale_lr == "none":
        return 1.0
    return float(world_size) if cfg.scale_lr == "linear" else float(world_size) ** 0.5


def build_optimizer(model: nn.Module, cfg: TrainConfig, head: list[str] | None = None, world_size: int = 1
                    ) -> torch.optim.Optimizer:  # fmt: skip
    """SGD-Nesterov / Adam / AdamW; weight decay only on weights of rank >= 2 (not biases, norms, scales).

    With `head` (fine-tuning), the backbone's groups get lr x backbone_lr_mult. Frozen parameters are in the
    optimizer too: they get no gradient (so no update) until they are unfrozen. With --scale-lr, the peak lr grows
    with the `world_size` processes' global batch (`lr_scale`).
    """
    lr = cfg.resolved_lr() * lr_scale(cfg, world_size)
    parts = [(list(model.parameters()), lr)]
    if head is not None:
        backbone, head_params = split_parameters(model, head)
        parts = [(backbone, lr * cfg.backbone_lr_mult), (head_params, lr)]
    groups = []
    for params, group_lr in parts:
        groups.append({"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr": group_lr})
        groups.append({"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": group_lr})
    groups = [g for g in groups if g["params"]]
    # On a GPU, one fused kernel per step instead of a few per parameter group: a small network's step there costs the
    # host's launches (SGD's step was 0.8 ms of host time per step of the `accurate` recipe on an H200). On a CPU the
    # recipes were measured with the default (foreach/for-loop) update, which is kept.
    fused = {"fused": True} if all(p.is_cuda for g in groups for p in g["params"]) and groups else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, **fused)
    if cfg.optimizer == "adam":
        # Adam's weight decay is L2 added to the gradient (coupled); AdamW's is decoupled.
        return torch.optim.Adam(groups, lr=lr, **fused)
    return torch.optim.AdamW(groups, lr=lr, **fused)


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`opt.load_state_dict(state)`, keeping the fused update `opt` was built with for this device.

    A state dict carries each group's `fused` flag: a GPU run resumed on a CPU would otherwise run fused there, and a
    CPU run resumed on a GPU would lose it. A fused Adam keeps its step count on the parameter's device, a plain one on
    the CPU; moved to match.
    """
    built = [group.get("fused") for group in opt.param_groups]
    opt.load_state_dict(state)
    for group, fused in zip(opt.param_groups, built, strict=True):
        if group.get("fused") == fused:
            continue
        group["fused"] = fused
        for p in group["params"]:
            step = opt.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                opt.state[p]["step"] = step.to(p.device if fused else "cpu", torch.float32)


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-step schedule over `total_steps` optimizer steps."""
    if cfg.schedule == "onecycle":
        if total_steps < 4:  # too few steps for a warm-up and a decay phase (OneCycleLR divides by zero)
            return None
        # At least ~2 warm-up steps, or the first phase has zero length on very short runs.
        pct = min(max(cfg.warmup, 2.0 / total_steps), 0.5)
        # A rebuilt schedule (a time budget re-planned) keeps each group's peak: its current lr is mid-cycle.
        peaks = [g.get("max_lr", g["lr"]) for g in opt.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=peaks, total_steps=total_steps, pct_start=pct,
            cycle_momentum=cfg.optimizer == "sgd",
        )  # fmt: skip
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_epochs * steps_per_epoch, gamma=cfg.step_gamma)
    return None
