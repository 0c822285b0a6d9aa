"""Training dynamics of a shallow transformer on word co-occurrence.

Task: orthonormal embeddings ``mu_1``, ``mu_2`` (the designated words) and ``mu_3`` (filler) in
``R^d``; a sequence of length ``L`` holds ``mu_1`` and/or ``mu_2`` at random positions and ``mu_3``
elsewhere; the label is ``+1`` iff both designated words appear. Sample types: ``both`` (+1),
``only_mu1``, ``only_mu2``, ``neither`` (-1).

Model (one attention layer with a linear "MLP" read-out, all trained from a small Gaussian init):

    F(X) = (1/L) sum_l w_O^T W_V X softmax(X^T W_K^T W_Q x_l),

trained with the logistic loss by full-batch gradient descent. The paper describes two phases:
in phase 1 the MLP aligns with the two target signals (``w_O^T W_V mu_{1,2}`` grow, the filler's
goes negative) while attention barely moves, ending when every margin ``y F(X)`` is positive;
in phase 2 attention and MLP evolve together and the margin grows; "automatic balancing" keeps the
per-sample losses falling at nearly the same rate. :func:`cooccurrence_probe` logs those
quantities; :func:`train_cooccurrence` runs the experiment.

The paper's exact data model was not available; this design is consistent with its description
(the paper's description of its setting).

Reference: Yang, Kailkhura, Wang, Liang, "Training Dynamics of Transformers to Recognize Word
Co-occurrence via Gradient Flow Analysis", NeurIPS 2024.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "SAMPLE_TYPES",
    "CooccurrenceConfig",
    "CooccurrenceData",
    "CooccurrenceTransformer",
    "cooccurrence_probe",
    "make_cooccurrence_data",
    "train_cooccurrence",
]

SAMPLE_TYPES = ("both", "only_mu1", "only_mu2", "neither")


@dataclass
class CooccurrenceData:
    """A co-occurrence data set.

    Attributes:
        x: ``(N, L, d)`` token embeddings (row ``l`` is the ``l``-th token).
        y: ``(N,)`` labels in {-1, +1}.
        types: ``(N,)`` index into :data:`SAMPLE_TYPES`.
        mu: ``(3, d)`` the embeddings ``mu_1``, ``mu_2`` (designated) and ``mu_3`` (filler).
        tokens: ``(N, L)`` token ids in {0, 1, 2} (index into ``mu``).
    """

    x: Tensor
    y: Tensor
    types: Tensor
    mu: Tensor
    tokens: Tensor


def make_cooccurrence_data(
    dim: int = 16,
    seq_len: int = 8,
    n_per_type: int = 32,
    *,
    include_neither: bool = False,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> CooccurrenceData:
    """Generate the co-occurrence task: ``n_per_type`` sequences of each type in
    :data:`SAMPLE_TYPES` (``both`` puts ``mu_1`` and ``mu_2`` at two distinct random positions,
    ``only_mu*`` one of them at a random position; every other token is the filler ``mu_3``).

    Args:
        dim (int): embedding dimension ``d`` (>= 3).
        seq_len (int): sequence length ``L`` (>= 2).
        n_per_type (int): samples per type (>= 1). Default 32.
        include_neither (bool): add the all-filler type ``neither`` (its loss falls much faster than
            the others', which swamps the balance ratio). Default False.
        generator (torch.Generator, optional): for the embeddings and positions.
        dtype (torch.dtype): Default float32.

    Reference: Yang et al., "Training Dynamics of Transformers to Recognize Word Co-occurrence via
    Gradient Flow Analysis", NeurIPS 2024.
    """
    if not isinstance(dim, int) or dim < 3:
        raise ValueError(f"dim must be an int >= 3 (three orthonormal embeddings), got {dim!r}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if not isinstance(n_per_type, int) or n_per_type < 1:
        raise ValueError(f"n_per_type must be a positive int, got {n_per_type!r}")
    q, _ = torch.linalg.qr(torch.randn(dim, 3, generator=generator, dtype=torch.float64))
    mu = q.T.contiguous()  # rows orthonormal
    n_types = 4 if include_neither else 3
    tokens = torch.full((n_types * n_per_type, seq_len), 2, dtype=torch.long)
    types = torch.arange(n_types).repeat_interleave(n_per_type)
    for i in range(n_types * n_per_type):
        t = int(types[i])
        perm = torch.randperm(seq_len, generator=generator)
        if t == 0:
            tokens[i, perm[0]], tokens[i, perm[1]] = 0, 1
        elif t == 1:
            tokens[i, perm[0]] = 0
        elif t == 2:
            tokens[i, perm[0]] = 1
    has1, has2 = (tokens == 0).any(1), (tokens == 1).any(1)
    y = torch.where(has1 & has2, 1.0, -1.0).to(dtype)
    return CooccurrenceData(x=mu.to(dtype)[tokens], y=y, types=types, mu=mu.to(dtype), tokens=tokens)


class CooccurrenceTransformer(nn.Module):
    r"""One softmax-attention layer with a linear read-out:
    ``F(X) = (1/L) sum_l w_O^T W_V X softmax(X^T W_K^T W_Q x_l)``.

    With tokens as rows of ``x`` (``(N, L, d)``): scores ``s[l, j] = (W_Q x_l) . (W_K x_j)``,
    attention ``softmax_j``, output ``mean_l sum_j att[l, j] w_O . (W_V x_j)``.

    Args:
        dim (int): embedding dimension ``d``.
        init_std (float): standard deviation of the Gaussian init of every parameter. Default 0.1.
        generator (torch.Generator, optional): for the init.
        dtype (torch.dtype): Default float32.

    Reference: Yang et al., NeurIPS 2024 (the model of section 2).
    """

    def __init__(self, dim: int, init_std: float = 0.1, generator: torch.Generator | None = None, dtype=torch.float32):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std!r}")

        def init(*shape):
            return nn.Parameter(init_std * torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype))

        self.W_Q, self.W_K, self.W_V = init(dim, dim), init(dim, dim), init(dim, dim)
        self.w_O = init(dim)

    def attention(self, x: Tensor) -> Tensor:
        """Attention weights ``(N, L_query, L_key)``."""
        q, k = x @ self.W_Q.T, x @ self.W_K.T
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        v = x @ self.W_V.T  # (N, L, d)
        return (self.attention(x) @ v).mean(1) @ self.w_O


def _logistic(margin: Tensor) -> Tensor:
    return nn.functional.softplus(-margin)


@torch.no_grad()
def cooccurrence_probe(
    model: CooccurrenceTransformer, data: CooccurrenceData, reference_scores: Tensor | None = None
) -> dict[str, Any]:
    r"""The quantities of the co-occurrence dynamics.

    Returns a dict with

    - ``alignment``: ``{"mu1", "mu2", "mu3"}`` -> ``w_O^T W_V mu_k``;
    - ``scores``: the 3x3 matrix ``mu_i^T W_Q^T W_K mu_j`` (query ``i``, key ``j``) as nested lists,
      and ``score_mu1_mu2`` / ``score_mu2_mu1`` / ``score_mu1_mu1`` as scalars;
    - ``attention_change``: ``||M - M_0||_F / ||M_0||_F`` with ``M = W_Q^T W_K`` (only with
      ``reference_scores`` = ``M_0``);
    - ``loss`` (mean logistic loss), ``loss_by_type`` (mean per :data:`SAMPLE_TYPES`);
    - ``balance_ratio``: max / min per-sample loss;
    - ``min_margin``: ``min y F(X)``; ``phase1_done``: all margins positive (1.0 / 0.0);
    - ``attention_on_designated``: mean attention mass that queries put on the ``mu_1``/``mu_2``
      tokens of ``both`` samples (``2/L`` for uniform attention).

    Args:
        model (CooccurrenceTransformer): the model.
        data (CooccurrenceData): the data set.
        reference_scores (Tensor, optional): ``W_Q^T W_K`` at initialization.

    Reference: Yang et al., NeurIPS 2024.
    """
    mu = data.mu.to(model.W_V.device, model.W_V.dtype)
    x = data.x.to(mu.device, mu.dtype)
    y = data.y.to(mu.device, mu.dtype)
    types = data.types.to(mu.device)
    margin = y * model(x)
    losses = _logistic(margin)
    m = model.W_Q.T @ model.W_K
    scores = mu @ m @ mu.T
    align = mu @ model.W_V.T @ model.w_O
    out: dict[str, Any] = {
        "alignment": {"mu1": float(align[0]), "mu2": float(align[1]), "mu3": float(align[2])},
        "scores": scores.tolist(),
        "score_mu1_mu2": float(scores[0, 1]),
        "score_mu2_mu1": float(scores[1, 0]),
        "score_mu1_mu1": float(scores[0, 0]),
        "loss": float(losses.mean()),
        "loss_by_type": {
            name: float(losses[types == t].mean()) for t, name in enumerate(SAMPLE_TYPES) if (types == t).any()
        },
        "balance_ratio": float(losses.max() / losses.min().clamp_min(1e-300)),
        "min_margin": float(margin.min()),
        "phase1_done": float(bool((margin > 0).all())),
    }
    both = types == 0
    if both.any():
        att = model.attention(x[both])  # (n, L, L)
        designated = (data.tokens.to(mu.device)[both] < 2).to(att.dtype)  # (n, L) keys
        out["attention_on_designated"] = float((att * designated[:, None, :]).sum(-1).mean())
    if reference_scores is not None:
        ref = reference_scores.to(m.device, m.dtype)
        out["attention_change"] = float((m - ref).norm() / ref.norm())
    return out


@dataclass
class CooccurrenceConfig:
    """Settings of :func:`train_cooccurrence` (the defaults finish in seconds on a CPU).

    Attributes:
        dim, seq_len, n_per_type: data (see :func:`make_cooccurrence_data`).
        init_std: Gaussian init of every parameter.
        lr: gradient-descent step.
        steps: number of full-batch steps.
        log_every: probe interval (the phase-1 check runs every step).
        include_neither: add the all-filler sample type.
        seed: for data and init.
    """

    dim: int = 16
    seq_len: int = 8
    n_per_type: int = 32
    init_std: float = 0.1
    lr: float = 0.5
    steps: int = 3000
    log_every: int = 25
    include_neither: bool = False
    seed: int = 0


def train_cooccurrence(config: CooccurrenceConfig | None = None, callbacks=None) -> dict[str, Any]:
    """Train :class:`CooccurrenceTransformer` on the co-occurrence task by full-batch gradient
    descent on the mean logistic loss and record the dynamics.

    Args:
        config (CooccurrenceConfig, optional): settings (defaults if ``None``).
        callbacks (LoopCallbacks, optional): also stepped after every update (step from 1) with
            ``batch = (x, y)``.

    Returns:
        dict: ``config``, ``history`` (probe dicts with ``step``, every ``log_every`` steps and at
        the end of phase 1), ``phase1_end`` (first step with every margin positive, or ``None``),
        ``attention_change_phase1`` / ``attention_change_phase2`` (``||M_t - M_s||_F / ||M_0||_F``
        over phase 1 and over the rest, ``M = W_Q^T W_K``), ``alignment_change_phase1`` /
        ``alignment_change_phase2`` (the same for the vector ``w_O^T W_V mu_k``), ``final`` (last
        probe) and ``max_balance_ratio_phase2``.

    Reference: Yang et al., NeurIPS 2024.
    """
    cfg = config or CooccurrenceConfig()
    if not isinstance(cfg.steps, int) or cfg.steps < 1:
        raise ValueError(f"steps must be a positive int, got {cfg.steps!r}")
    if not cfg.lr > 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr!r}")
    g = torch.Generator().manual_seed(cfg.seed)
    data = make_cooccurrence_data(
        cfg.dim, cfg.seq_len, cfg.n_per_type, include_neither=cfg.include_neither, generator=g
    )
    model = CooccurrenceTransformer(cfg.dim, cfg.init_std, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    m0 = (model.W_Q.T @ model.W_K).detach().clone()
    a0 = (data.mu @ model.W_V.T @ model.w_O).detach().clone()

    def snapshot():
        with torch.no_grad():
            return (model.W_Q.T @ model.W_K).clone(), (data.mu @ model.W_V.T @ model.w_O).clone()

    history = [{"step": 0, **cooccurrence_probe(model, data, m0)}]
    if callbacks is not None:
        callbacks.step(0, model, opt, (data.x, data.y))
    phase1_end, at_phase1 = None, None
    for step in range(1, cfg.steps + 1):
        opt.zero_grad(set_to_none=True)
        margin = data.y * model(data.x)
        _logistic(margin).mean().backward()
        opt.step()
        if callbacks is not None:
            callbacks.step(step, model, opt, (data.x, data.y))
        logged = False
        if phase1_end is None:
            with torch.no_grad():
                if bool(((data.y * model(data.x)) > 0).all()):
                    phase1_end, at_phase1 = step, snapshot()
                    history.append({"step": step, "phase1_end": True, **cooccurrence_probe(model, data, m0)})
                    logged = True
        if not logged and (step % cfg.log_every == 0 or step == cfg.steps):
            history.append({"step": step, **cooccurrence_probe(model, data, m0)})
    m_end, a_end = snapshot()
    out: dict[str, Any] = {"config": asdict(cfg), "history": history, "phase1_end": phase1_end, "final": history[-1]}
    if at_phase1 is not None:
        m1, a1 = at_phase1
        out["attention_change_phase1"] = float((m1 - m0).norm() / m0.norm())
        out["attention_change_phase2"] = float((m_end - m1).norm() / m0.norm())
        out["alignment_change_phase1"] = float((a1 - a0).norm() / a0.norm())
        out["alignment_change_phase2"] = float((a_end - a1).norm() / a0.norm())
        out["max_balance_ratio_phase2"] = max(h["balance_ratio"] for h in history if h["step"] >= phase1_end)
    out["final_loss"] = history[-1]["loss"]
    if not math.isfinite(out["final_loss"]):
        raise FloatingPointError(f"training diverged (loss {out['final_loss']}); lower lr={cfg.lr}")
    return out
