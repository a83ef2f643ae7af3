"""Optimizers pretraining can use beyond the Trainer's AdamW.

`AdamC` is AdamW with *corrected* weight decay (Defazio 2025, "Why Gradients Rapidly Increase Near
the End of Training", arXiv 2506.02285): the decoupled decay of step t is scaled by lr_t / lr_max,
so the effective shrinkage per step is lr_t · (lr_t / lr_max) · λ instead of lr_t · λ. With AdamW
the balance between the decay and the gradient update shifts as the schedule anneals, and the
gradient norm rises towards the end of training; that rise feeds straight into the refinement's
weights (w = 1/n), so a baseline trained with AdamC gives the refinement cleaner norms.
"""

from __future__ import annotations

import torch


class AdamC(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose weight decay at each step is ``weight_decay · lr / lr_max``.

    ``lr_max`` is each group's peak LR: the ``initial_lr`` that LR schedulers record (the LR the
    optimizer was built with), or the group's ``max_lr`` when given. At ``lr == lr_max`` the update
    is exactly AdamW's.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 1e-2, **kwargs):
        super().__init__(params, lr=lr, weight_decay=weight_decay, **kwargs)
        for group in self.param_groups:
            group.setdefault("corrected_weight_decay", group["weight_decay"])
            group.setdefault("max_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr = float(group["lr"])
            lr_max = float(group.get("max_lr") or group.get("initial_lr") or lr)
            group["weight_decay"] = group["corrected_weight_decay"] * (lr / lr_max if lr_max > 0 else 0.0)
        return super().step(closure)


OPTIMIZERS = ("adamw", "adamc")
