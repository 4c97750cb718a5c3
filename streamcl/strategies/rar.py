"""Retrospective Adversarial Replay (RAR), Kumari et al., NeurIPS 2022 — as the authors' code.

Replay alone refines the old classes only where the memory happens to be. RAR synthesises
replay samples *near the forgetting boundary*: old samples pushed towards the new data.

Each step (following the authors' ``retrieve_er_mixup_rar``):

1. Backpropagate the current batch's loss; keep those gradients.
2. **Look-ahead model**: the weights after one virtual SGD step of size ``opt_lr`` along them —
   where the model is about to go, which is where forgetting will happen.
3. Draw ``batch_size_mem`` memory samples and **mix them up** pairwise (one
   ``lam ~ Beta(1, 1) = U(0, 1)`` per step, soft labels mixed alike).
4. In the look-ahead model's feature space (``name_ext_layer``, default: the penultimate
   layer), find for each mixed sample the **nearest** current sample of another class.
5. ``iter_fgsm`` **MI-FGSM** steps *towards* that neighbour's features (minimising the feature
   MSE), momentum ``decay_factor_fgsm``, step ``epsilon_fgsm / iter_fgsm``, each step projected
   onto the L-inf ball of radius ``epsilon_fgsm`` around the mixed sample.
6. Loss ``(1 - beta_coef) * CE(memory) + beta_coef * CE(adversarial, mixed soft labels)``,
   its gradients added to the current batch's, one optimizer step.

The reference implementation picks the farthest neighbour, steps away from it and dropped the
mixup; this one does what the paper and its code do. With ``use_adversarial_replay=False`` it is
plain experience replay.

The memory holds past experiences only, balanced per experience (:class:`ExperienceMemory`, as
ER and as Avalanche's RAR, whose reservoir is filled at experience ends): replaying the open
experience too gives its classes a second share of every step.

**Not data-parallel.** Sharding the memory is not enough for N replicas to run one RAR step:
the look-ahead model (2.) needs the step's *global* batch gradient in the middle of the step,
so a gradient all-reduce before the replay and a second one after it; and the adversarial
targets (4.) are the nearest samples of the *global* batch, whose features sit on the other
replicas (each step would gather them, with variable sizes, or each replica would attack
towards its own part only: another method). The trainer refuses it with replicas.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from streamcl.strategies.base import Strategy
from streamcl.strategies.buffer import ExperienceMemory


class RAR(Strategy):
    name = "rar"

    def __init__(self, model, optimizer, generator, *, batch_size_mem: int = 32,
                 mem_size: int = 200, opt_lr: float = 0.1, name_ext_layer: str | None = None,
                 use_adversarial_replay: bool = True, beta_coef: float = 0.4,
                 decay_factor_fgsm: float = 1.0, epsilon_fgsm: float = 0.0314,
                 iter_fgsm: int = 2) -> None:
        super().__init__(model, optimizer, generator)
        self.batch_size_mem = batch_size_mem
        self.opt_lr = opt_lr
        self.name_ext_layer = name_ext_layer or "body"
        try:
            model.get_submodule(self.name_ext_layer)
        except AttributeError:
            layers = ", ".join(n for n, _ in model.named_modules() if n)
            raise ValueError(f"--param name_ext_layer={name_ext_layer!r}: no such layer; the "
                             f"model has {layers}") from None
        self.use_adversarial_replay = use_adversarial_replay
        self.beta_coef = beta_coef
        self.decay_factor_fgsm = decay_factor_fgsm
        self.epsilon_fgsm = epsilon_fgsm
        self.iter_fgsm = iter_fgsm
        self.memory = ExperienceMemory(mem_size, generator)

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(x)
        F.cross_entropy(logits, y).backward()
        if len(self.memory):
            mem = self.memory.sample(self.batch_size_mem)
            if self.use_adversarial_replay:
                x_adv, soft = self.adversarial_replay(x, y, mem["x"], mem["y"])
                out = self.model(torch.cat([mem["x"], x_adv]))
                k = len(mem["x"])
                replay = (1 - self.beta_coef) * F.cross_entropy(out[:k], mem["y"])
                replay = replay - self.beta_coef * (soft * F.log_softmax(out[k:], 1)).sum(1).mean()
            else:
                replay = F.cross_entropy(self.model(mem["x"]), mem["y"])
            replay.backward()
        self.optimizer.step()
        self.memory.add(x=x, y=y)
        return logits.detach()

    def on_experience_end(self) -> None:
        self.memory.close_experience(self.experience)

    # -- the parts of one RAR step, separately testable -------------------------------------
    def lookahead_params(self) -> dict[str, torch.Tensor]:
        """Weights after one virtual SGD step of size ``opt_lr`` on the current gradients."""
        return {k: (p - self.opt_lr * p.grad if p.grad is not None else p).detach()
                for k, p in self.model.named_parameters()}

    def features(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Output of ``name_ext_layer`` (flattened) under ``params``."""
        captured: list[torch.Tensor] = []
        layer = self.model.get_submodule(self.name_ext_layer)
        hook = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            functional_call(self.model, params, (x,))
        finally:
            hook.remove()
        return captured[0].flatten(1)

    def mixup(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
        """Pairwise mixup of memory samples: mixed inputs, soft labels, and the partner's label."""
        perm = torch.randperm(len(x), generator=self.generator)
        lam = float(torch.rand((), generator=self.generator))  # Beta(1, 1) is uniform
        onehot = F.one_hot(y, self.model.n_classes).float()
        return lam * x + (1 - lam) * x[perm], lam * onehot + (1 - lam) * onehot[perm], y[perm]

    def adversarial_replay(self, x: torch.Tensor, y: torch.Tensor, mem_x: torch.Tensor,
                           mem_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.lookahead_params()
        mixed, soft, partner = self.mixup(mem_x, mem_y)
        with torch.no_grad():
            cur = self.features(params, x)
            dist = torch.cdist(self.features(params, mixed), cur)
            same = (mem_y.unsqueeze(1) == y.unsqueeze(0)) | (partner.unsqueeze(1) == y.unsqueeze(0))
            dist = dist.masked_fill(same, float("inf"))
            nearest = dist.argmin(1)
            has_target = torch.isfinite(dist.gather(1, nearest.unsqueeze(1))).squeeze(1)
        target = cur[nearest]
        x_adv = self.mi_fgsm(params, mixed, target)
        x_adv = torch.where(has_target.view(-1, *[1] * (mixed.dim() - 1)), x_adv, mixed)
        return x_adv, soft

    def mi_fgsm(self, params: dict[str, torch.Tensor], x_nat: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        """Momentum iterative FGSM moving ``x_nat``'s features towards ``target``."""
        eps, step = self.epsilon_fgsm, self.epsilon_fgsm / max(self.iter_fgsm, 1)
        x_adv = x_nat.detach().clone()
        g = torch.zeros_like(x_adv)
        for _ in range(self.iter_fgsm):
            x_adv.requires_grad_(True)
            loss = F.mse_loss(self.features(params, x_adv), target)
            (grad_x,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                l1 = grad_x.flatten(1).abs().sum(1).clamp_min(1e-12)
                g = self.decay_factor_fgsm * g + grad_x / l1.view(-1, *[1] * (grad_x.dim() - 1))
                x_adv = x_adv - step * g.sign()  # descend: towards the target's features
                x_adv = torch.max(torch.min(x_adv, x_nat + eps), x_nat - eps)
        return x_adv.detach()

    def extra_state(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])
