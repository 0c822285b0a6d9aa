"""Empirical neural tangent kernel (NTK) of any ``nn.Module`` and the metrics read from it.

The empirical NTK on a probe batch is the Gram matrix of per-sample parameter Jacobians,
``Theta_ij = <df(x_i)/dtheta, df(x_j)/dtheta>``. It is computed with :mod:`torch.func` (``vmap`` of
``grad`` / ``jacrev`` over the samples of a chunk), one pair of chunks at a time, so memory grows
with ``chunk_size * n_params`` rather than with the probe batch. It runs on the model's device.

Three forms are offered:

- ``"sum"``: the Jacobian of the sum of the outputs (the form the research group's code uses),
  shape ``(N, M)``;
- ``"full"``: one block per pair of outputs, ``Theta[i, j, k, l] = <df_k(x_i), df_l(x_j)>``,
  shape ``(N, M, K, K)``;
- ``"trace"``: the trace of each block, ``sum_k Theta[i, j, k, k]``, shape ``(N, M)``.

Metrics: :func:`ntk_eigen_metrics` (lambda_min, lambda_max, condition number, trace),
:func:`kernel_distance`, :func:`kernel_target_alignment`, :func:`ntk_regression`.

References: Jacot, Gabriel, Hongler, "Neural Tangent Kernel", NeurIPS 2018; the kernel-distance and
alignment metrics as in Fort et al., "Deep learning versus kernel learning", NeurIPS 2020.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

__all__ = [
    "NTK_CONVENTIONS",
    "NTK_MODES",
    "NTKLinear",
    "default_output",
    "empirical_ntk",
    "kernel_distance",
    "kernel_target_alignment",
    "ntk_eigen_metrics",
    "ntk_matrix",
    "ntk_mlp",
    "ntk_regression",
    "target_matrix",
]

NTK_MODES = ("sum", "full", "trace")
#: ``"tutorial"``: every trainable parameter, each sample on its own, the model's mode (PyTorch's
#: NTK tutorial; default); ``"tenas"``: parameters named ``*weight*``, train mode, the whole batch
#: in one forward pass (TE-NAS's ``get_ntk_n``)
NTK_CONVENTIONS = ("tutorial", "tenas")


def default_output(out: Any) -> Tensor:
    """The tensor the NTK differentiates: the output itself, ``out["logits"]``, ``out.logits`` or the
    first element of a tuple."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        if "logits" in out:
            return out["logits"]
        raise ValueError(f"model output is a mapping without 'logits' (keys {list(out)}); pass output_fn")
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ValueError(f"cannot read a tensor from a model output of type {type(out).__name__}; pass output_fn")


def _select_params(
    model: nn.Module, params: Iterable[str] | str | None, weights_only: bool = False
) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    if params is None:
        selected = {n: p for n, p in named.items() if p.requires_grad and (not weights_only or "weight" in n)}
    else:
        names = [params] if isinstance(params, str) else list(params)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ValueError(f"params: unknown parameter name(s) {unknown}; the model has {list(named)}")
        selected = {n: named[n] for n in names}
    if not selected:
        raise ValueError("params: no parameter selected (the model has no trainable parameters)")
    return selected


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _prepare_input(x: Tensor, like: Tensor) -> Tensor:
    x = x.to(like.device)
    if x.is_floating_point():
        x = x.to(like.dtype)
    return x


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def empirical_ntk(
    model: nn.Module,
    x: Tensor,
    x2: Tensor | None = None,
    *,
    mode: str = "sum",
    params: Iterable[str] | str | None = None,
    param_scales: Mapping[str, Tensor | float] | None = None,
    chunk_size: int = 32,
    output_fn: Callable[[Any], Tensor] | None = None,
    convention: str = "tutorial",
) -> Tensor:
    r"""Empirical NTK of ``model`` between the probe batches ``x`` and ``x2``.

    .. math::
        \Theta(x_i, x'_j) = \sum_{\theta} \frac{\partial f(x_i)}{\partial \theta}
        \frac{\partial f(x'_j)}{\partial \theta}^\top

    With ``convention="tutorial"`` (default, as PyTorch's NTK tutorial) each sample is passed
    through the model alone (batch of one, under ``vmap``), so the model must not mix samples: put
    BatchNorm/dropout models in ``eval()`` mode first. Gradients flow only to the selected
    parameters (default: all trainable ones); the others and the buffers are held fixed.

    With ``convention="tenas"`` (TE-NAS's ``get_ntk_n``, ``train_mode=True``) the default
    parameters are those whose name contains ``"weight"`` (BatchNorm weights included, biases
    left out), the model runs in train mode (restored afterwards; its buffers are not modified)
    and each of ``x`` and ``x2`` goes through it as one batch, so BatchNorm normalizes with that
    batch's statistics and a sample's gradient depends on the rest of its batch; per-sample
    gradients come from one backward pass per sample (per output for ``"full"``/``"trace"``),
    and ``chunk_size`` does not apply.

    Args:
        model (nn.Module): the network; the kernel is computed on its device and in its dtype.
        x (Tensor): probe inputs, first dimension = samples (float inputs are cast to the model's
            dtype; integer inputs such as token ids are passed as they are).
        x2 (Tensor, optional): second batch; ``None`` gives the symmetric kernel of ``x``.
        mode (str): ``"sum"`` (Jacobian of the summed outputs), ``"full"`` (per-output blocks) or
            ``"trace"`` (trace of the blocks). Default ``"sum"``.
        params (iterable of str, optional): names (as in ``named_parameters``) of the parameters to
            differentiate; default all parameters with ``requires_grad``.
        param_scales (mapping, optional): per-parameter elementwise factors ``s`` applied to the
            Jacobian: the NTK of the reparametrization ``W = s * theta`` evaluated at the current
            weights. A 0/1 mask restricts the kernel to the surviving weights of a pruned layer;
            ``mask / sqrt(1 - p)`` is the rescaled pruning of :mod:`.random_pruning`.
        chunk_size (int): samples per Jacobian evaluation (memory ~ ``chunk_size * K * n_params``
            for ``"full"``/``"trace"``, ``chunk_size * n_params`` for ``"sum"``). Default 32.
        output_fn (callable, optional): maps the model's output to the tensor to differentiate;
            default :func:`default_output` (the tensor, ``logits`` of a mapping/ModelOutput, or the
            first element of a tuple). The per-sample output is flattened to ``K`` values.
        convention (str): ``"tutorial"`` (default) or ``"tenas"``; see above.

    Returns:
        Tensor: shape ``(N, M)`` for ``"sum"`` and ``"trace"``, ``(N, M, K, K)`` for ``"full"``.

    Reference: Jacot, Gabriel, Hongler, "Neural Tangent Kernel: Convergence and Generalization in
    Neural Networks", NeurIPS 2018.
    """
    if mode not in NTK_MODES:
        raise ValueError(f"mode must be one of {NTK_MODES}, got {mode!r}")
    if convention not in NTK_CONVENTIONS:
        raise ValueError(f"convention must be one of {NTK_CONVENTIONS}, got {convention!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be a tensor with at least one sample, got {type(x).__name__}")
    if x2 is not None and (not isinstance(x2, Tensor) or x2.dim() < 1 or x2.shape[0] == 0):
        raise ValueError(f"x2 must be a tensor with at least one sample, got {type(x2).__name__}")
    selected = _select_params(model, params, weights_only=convention == "tenas")
    names = list(selected)
    like = next(iter(selected.values()))
    scales: dict[str, Tensor] = {}
    for n, s in (param_scales or {}).items():
        if n not in selected:
            raise ValueError(f"param_scales: {n!r} is not a selected parameter ({names})")
        s = torch.as_tensor(s, dtype=like.dtype, device=like.device)
        try:
            torch.broadcast_shapes(s.shape, selected[n].shape)
        except RuntimeError:
            raise ValueError(
                f"param_scales[{n!r}] has shape {tuple(s.shape)}, not broadcastable to {tuple(selected[n].shape)}"
            ) from None
        scales[n] = s

    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in selected}
    frozen.update({n: b for n, b in model.named_buffers()})
    primals = {n: p.detach() for n, p in selected.items()}
    read = output_fn if output_fn is not None else default_output

    def f(theta: dict[str, Tensor], xi: Tensor) -> Tensor:
        out = functional_call(model, {**frozen, **theta}, (xi.unsqueeze(0),))
        return read(out).reshape(-1)

    if mode == "sum":
        per_sample = vmap(grad(lambda theta, xi: f(theta, xi).sum()), in_dims=(None, 0))
    else:
        per_sample = vmap(jacrev(f), in_dims=(None, 0))

    def jac(xc: Tensor) -> dict[str, Tensor]:
        j = per_sample(primals, xc)
        c = xc.shape[0]
        lead = (c,) if mode == "sum" else (c, j[names[0]].shape[1])
        out = {}
        for n in names:
            jn = j[n] * scales[n] if n in scales else j[n]
            out[n] = jn.reshape(*lead, -1)
        return out

    def contract(j1: dict[str, Tensor], j2: dict[str, Tensor]) -> Tensor:
        block = None
        for n in names:
            if mode == "sum":
                b = j1[n] @ j2[n].T
            elif mode == "full":
                b = torch.einsum("akp,blp->abkl", j1[n], j2[n])
            else:
                b = torch.einsum("akp,bkp->ab", j1[n], j2[n])
            block = b if block is None else block + b
        return block

    if convention == "tenas":
        return _tenas_ntk(model, x, x2, mode, selected, scales, read)

    with torch.no_grad():
        x = _prepare_input(x, like)
        rows = _chunks(x.shape[0], chunk_size)
        if x2 is None:
            blocks: dict[tuple[int, int], Tensor] = {}
            for i, ri in enumerate(rows):
                ji = jac(x[ri])
                for j in range(i, len(rows)):
                    jj = ji if j == i else jac(x[rows[j]])
                    blocks[i, j] = contract(ji, jj)
                del ji
            n = x.shape[0]
            first = blocks[0, 0]
            theta = first.new_zeros((n, n, *first.shape[2:]))
            for (i, j), b in blocks.items():
                theta[rows[i], rows[j]] = b
                if i != j:
                    theta[rows[j], rows[i]] = b.transpose(0, 1).transpose(-1, -2) if mode == "full" else b.T
            return theta
        x2 = _prepare_input(x2, like)
        cols = _chunks(x2.shape[0], chunk_size)
        col_jac = jac(x2) if len(cols) == 1 else None
        out_rows = []
        for ri in rows:
            ji = jac(x[ri])
            row = [contract(ji, col_jac if col_jac is not None else jac(x2[cj])) for cj in cols]
            out_rows.append(torch.cat(row, dim=1))
        return torch.cat(out_rows, dim=0)


def _tenas_ntk(
    model: nn.Module,
    x: Tensor,
    x2: Tensor | None,
    mode: str,
    selected: dict[str, Tensor],
    scales: dict[str, Tensor],
    read: Callable[[Any], Tensor],
) -> Tensor:
    """TE-NAS-style kernel: train mode, whole-batch forward, one backward per sample (output)."""
    names = list(selected)
    like = next(iter(selected.values()))

    def batch_jacobian(xb: Tensor) -> Tensor:
        leaves = {n: p.detach().clone().requires_grad_(True) for n, p in selected.items()}
        state = {n: p.detach() for n, p in model.named_parameters() if n not in leaves}
        state.update({n: b.clone() for n, b in model.named_buffers()})  # running stats: a copy
        was_training = model.training
        model.train()
        try:
            with torch.enable_grad():
                out = read(functional_call(model, {**state, **leaves}, (xb,)))
                out = out.reshape(xb.shape[0], -1)
                targets = out.sum(1, keepdim=True) if mode == "sum" else out
                rows = []
                for i in range(targets.shape[0]):
                    per_output = []
                    for k in range(targets.shape[1]):
                        grads = torch.autograd.grad(
                            targets[i, k], [leaves[n] for n in names], retain_graph=True, allow_unused=True
                        )
                        flat = [
                            (torch.zeros_like(leaves[n]) if g is None else g * scales[n] if n in scales else g).reshape(
                                -1
                            )
                            for n, g in zip(names, grads)
                        ]
                        per_output.append(torch.cat(flat))
                    rows.append(torch.stack(per_output))
        finally:
            model.train(was_training)
        return torch.stack(rows).detach()  # (N, K', P)

    x = _prepare_input(x, like)
    j1 = batch_jacobian(x)
    j2 = j1 if x2 is None else batch_jacobian(_prepare_input(x2, like))
    if mode == "sum":
        return j1[:, 0] @ j2[:, 0].T
    if mode == "full":
        return torch.einsum("akp,blp->abkl", j1, j2)
    return torch.einsum("akp,bkp->ab", j1, j2)


def ntk_matrix(theta: Tensor) -> Tensor:
    """The kernel as a matrix: ``(N, M)`` unchanged, ``(N, M, K, K)`` blocks as ``(N*K, M*K)`` with
    row ``i*K + k``.

    Args:
        theta (Tensor): an NTK from :func:`empirical_ntk`.
    """
    if theta.dim() == 2:
        return theta
    if theta.dim() == 4 and theta.shape[2] == theta.shape[3]:
        n, m, k, _ = theta.shape
        return theta.permute(0, 2, 1, 3).reshape(n * k, m * k)
    raise ValueError(f"theta must have shape (N, M) or (N, M, K, K), got {tuple(theta.shape)}")


def ntk_eigen_metrics(theta: Tensor) -> dict[str, float]:
    r"""Spectral summary of a symmetric kernel: ``lambda_min``, ``lambda_max``,
    ``condition_number`` = lambda_max / lambda_min (``inf`` when lambda_min <= 0) and ``trace``.

    The eigenvalues are those of ``(Theta + Theta^T) / 2`` in float64.

    Args:
        theta (Tensor): square kernel ``(N, N)`` or blocks ``(N, N, K, K)``.

    Reference: the condition number as a training-free metric: Chen, Gong, Wang, "Neural
    Architecture Search on ImageNet in Four GPU Hours: A Theoretically Inspired Perspective"
    (TE-NAS), ICLR 2021.
    """
    mat = ntk_matrix(theta)
    if mat.shape[0] != mat.shape[1]:
        raise ValueError(f"theta must be square, got shape {tuple(theta.shape)}")
    mat = mat.detach().to(torch.float64)
    ev = torch.linalg.eigvalsh((mat + mat.T) / 2)
    lam_min, lam_max = float(ev[0]), float(ev[-1])
    cond = lam_max / lam_min if lam_min > 0 else math.inf
    return {
        "lambda_min": lam_min,
        "lambda_max": lam_max,
        "condition_number": cond,
        "trace": float(mat.diagonal().sum()),
    }


def kernel_distance(theta_ref: Tensor, theta: Tensor) -> float:
    r"""Kernel distance ``1 - <Theta_0, Theta_t>_F / (||Theta_0||_F ||Theta_t||_F)``.

    0 for kernels equal up to a positive scale, 1 for orthogonal ones.

    Args:
        theta_ref (Tensor): reference kernel (e.g. the NTK at initialization).
        theta (Tensor): kernel of the same shape.

    Reference: Fort et al., "Deep learning versus kernel learning: an empirical study of loss
    landscape geometry and the time evolution of the Neural Tangent Kernel", NeurIPS 2020.
    """
    if theta_ref.shape != theta.shape:
        raise ValueError(f"kernel shapes differ: {tuple(theta_ref.shape)} vs {tuple(theta.shape)}")
    a = theta_ref.detach().to(torch.float64).flatten()
    b = theta.detach().to(theta_ref.device, torch.float64).flatten()
    denom = a.norm() * b.norm()
    if denom == 0:
        raise ValueError("kernel_distance: a kernel is identically zero")
    return float(1 - (a @ b) / denom)


def target_matrix(targets: Tensor, num_classes: int | None = None, center: bool = True) -> Tensor:
    """Targets as a float matrix ``Y`` of shape ``(N, C)``.

    Integer class labels become one-hot rows, centred (``one_hot - 1/C``) by default; a float
    vector becomes a column; a float matrix is returned as it is.

    Args:
        targets (Tensor): labels ``(N,)`` (integer) or values ``(N,)`` / ``(N, C)`` (float).
        num_classes (int, optional): number of classes for integer labels; default ``max + 1``.
        center (bool): centre one-hot labels. Default True.
    """
    if targets.is_floating_point():
        if targets.dim() == 1:
            return targets[:, None]
        if targets.dim() == 2:
            return targets
        raise ValueError(f"float targets must be (N,) or (N, C), got shape {tuple(targets.shape)}")
    if targets.dim() != 1:
        raise ValueError(f"integer targets must be class labels of shape (N,), got {tuple(targets.shape)}")
    c = int(targets.max()) + 1 if num_classes is None else num_classes
    if c < 2 or int(targets.min()) < 0 or int(targets.max()) >= c:
        raise ValueError(f"labels must lie in [0, num_classes) with num_classes >= 2, got num_classes={c}")
    y = torch.nn.functional.one_hot(targets.long(), c).to(torch.float64)
    return y - 1.0 / c if center else y


def kernel_target_alignment(theta: Tensor, targets: Tensor, num_classes: int | None = None) -> float:
    r"""Kernel-target alignment ``<Theta, Y Y^T>_F / (||Theta||_F ||Y Y^T||_F)``.

    Args:
        theta (Tensor): kernel ``(N, N)`` (a block kernel is reduced to its trace form).
        targets (Tensor): class labels (centred one-hot, see :func:`target_matrix`) or float targets.
        num_classes (int, optional): for integer labels.

    Reference: Cristianini, Shawe-Taylor, Elisseeff, Kandola, "On kernel-target alignment",
    NeurIPS 2001.
    """
    if theta.dim() == 4:
        theta = theta.diagonal(dim1=2, dim2=3).sum(-1)
    if theta.dim() != 2 or theta.shape[0] != theta.shape[1]:
        raise ValueError(f"theta must be a square kernel, got shape {tuple(theta.shape)}")
    y = target_matrix(targets, num_classes).to(theta.device, torch.float64)
    if y.shape[0] != theta.shape[0]:
        raise ValueError(f"targets have {y.shape[0]} rows, the kernel has {theta.shape[0]}")
    t = theta.detach().to(torch.float64)
    yy = y @ y.T
    denom = t.norm() * yy.norm()
    if denom == 0:
        raise ValueError("kernel_target_alignment: the kernel or the target Gram matrix is zero")
    return float((t * yy).sum() / denom)


def ntk_regression(
    theta_train: Tensor,
    theta_test_train: Tensor,
    y_train: Tensor,
    y_test: Tensor,
    *,
    num_classes: int | None = None,
    ridge: float = 0.0,
) -> dict[str, float]:
    r"""Kernel regression with the NTK: ``Y_pred = Theta_yx (Theta_xx + ridge I)^{-1} Y_x``.

    Integer labels are centred one-hot (see :func:`target_matrix`); then ``accuracy`` (argmax of
    the prediction) is reported with the ``mse`` (mean over entries of ``(Y_pred - Y_y)^2``).
    Block kernels ``(N, M, K, K)`` are used as ``(N*K, M*K)`` matrices on the flattened targets.

    Args:
        theta_train (Tensor): ``Theta(x_train, x_train)``.
        theta_test_train (Tensor): ``Theta(x_test, x_train)``.
        y_train, y_test (Tensor): labels or targets.
        num_classes (int, optional): for integer labels (default: from both label sets).
        ridge (float): added to the diagonal. Default 0 (least squares with ``lstsq`` when the
            kernel is singular).

    Reference: Arora et al., "On Exact Computation with an Infinitely Wide Neural Net",
    NeurIPS 2019.
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    classes = None
    if not y_train.is_floating_point():
        classes = num_classes or int(max(int(y_train.max()), int(y_test.max()))) + 1
    ytr = target_matrix(y_train, classes).to(torch.float64)
    yte = target_matrix(y_test, classes).to(torch.float64)
    block = theta_train.dim() == 4
    ktr = ntk_matrix(theta_train).detach().to(torch.float64).cpu()
    kte = ntk_matrix(theta_test_train).detach().to(torch.float64).cpu()
    if block:
        ytr_v, k = ytr.reshape(-1, 1), theta_train.shape[2]
        if ytr.shape[1] != k:
            raise ValueError(f"block kernel has {k} outputs, the targets {ytr.shape[1]} columns")
    else:
        ytr_v = ytr
    if ktr.shape[0] != ktr.shape[1] or ktr.shape[0] != ytr_v.shape[0] or kte.shape[1] != ktr.shape[0]:
        raise ValueError(
            f"shape mismatch: theta_train {tuple(theta_train.shape)}, theta_test_train "
            f"{tuple(theta_test_train.shape)}, y_train {tuple(y_train.shape)}"
        )
    a = ktr + ridge * torch.eye(ktr.shape[0], dtype=ktr.dtype)
    try:
        alpha = torch.linalg.solve(a, ytr_v)
    except RuntimeError:  # singular kernel: minimum-norm least squares
        alpha = torch.linalg.lstsq(a, ytr_v, driver="gelsd").solution
    pred = kte @ alpha
    if block:
        pred = pred.reshape(yte.shape)
    out = {"mse": float(((pred - yte) ** 2).mean())}
    if classes is not None:
        out["accuracy"] = float((pred.argmax(1) == y_test.cpu().long()).double().mean())
    return out


class NTKLinear(nn.Linear):
    r"""Linear layer in the NTK parametrization: ``y = sigma_w / sqrt(fan_in) * W x + sigma_b * b``
    with ``W ~ N(0, 1)`` and ``b ~ N(0, 1)``, so the NTK has a finite limit as the width grows.

    Args:
        in_features, out_features (int): sizes.
        bias (bool): learnable bias. Default False.
        sigma_w (float): weight multiplier. Default sqrt(2) (ReLU He scaling).
        sigma_b (float): bias multiplier. Default 0.1.

    Reference: Jacot, Gabriel, Hongler, NeurIPS 2018 (section 2, the NTK parametrization).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        sigma_w: float = math.sqrt(2.0),
        sigma_b: float = 0.1,
        device: Any = None,
        dtype: Any = None,
    ):
        self.sigma_w = sigma_w
        self.sigma_b = sigma_b
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.normal_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.nn.functional.linear(x, self.weight) * (self.sigma_w / math.sqrt(self.in_features))
        return y if self.bias is None else y + self.sigma_b * self.bias


def ntk_mlp(
    in_features: int,
    width: int,
    depth: int,
    out_features: int = 1,
    *,
    bias: bool = False,
    dtype: torch.dtype | None = None,
) -> nn.Sequential:
    """ReLU MLP in the NTK parametrization: ``depth`` hidden :class:`NTKLinear` layers of ``width``
    units, then an :class:`NTKLinear` readout with ``sigma_w = 1``.

    Args:
        in_features (int): input size.
        width (int): hidden width.
        depth (int): number of hidden layers (>= 1).
        out_features (int): outputs. Default 1.
        bias (bool): biases in every layer. Default False.
        dtype (torch.dtype, optional): parameter dtype.
    """
    for label, value in (
        ("in_features", in_features),
        ("width", width),
        ("depth", depth),
        ("out_features", out_features),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    layers: list[nn.Module] = []
    fan_in = in_features
    for _ in range(depth):
        layers += [NTKLinear(fan_in, width, bias=bias, dtype=dtype), nn.ReLU()]
        fan_in = width
    layers.append(NTKLinear(fan_in, out_features, bias=bias, sigma_w=1.0, dtype=dtype))
    return nn.Sequential(*layers)
