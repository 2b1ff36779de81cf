"""The manifold interface: how a mixer turns a stream state into (H_pre, H_post, H_res).

Every variant in the literature (HC, mHC, mHC-lite, KromHC, sHC, JPmHC) is one subclass.
A subclass declares how many logits H_res needs (`res_logits`), how those logits become an
n x n matrix (`res_map`), the near-identity bias for them (`res_identity_bias`) and, where
rows sum to 1 away from I too, a default bias that already mixes the streams
(`res_init_bias`). Everything else -- the projection of the flattened n*C state, the
sigmoid maps of H_pre and H_post, the function-preserving and paper inits -- is shared here
and can be overridden where a paper differs (HC overrides `project` and `coefficients`).

Conventions (see docs/math.md):
- stream states are stream-major, ``x[n, *positions, C]``;
- ``X'[i] = sum_j H_res[..., i, j] X[j] + H_post[..., i] * y`` (rows of H_res mix *into* stream i);
- coefficients are computed in fp32 whatever the stream dtype.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

# identity: function preserving, the streams differ from the first step (uniform H_pre,
#   unequal H_post of mean 1) and H_res starts mixing them (see `init_bias`);
# identity-copies: function preserving, the streams start as copies (H_pre favours one
#   stream, H_post = 1), H_res mixing; the default before, and what `identity` falls back to
#   where a chain applies a nonlinear op to every stream (`init_bias`'s keep_copies);
# identity-sharp: identity-copies with H_res ~ I (the papers' H_res bias);
# paper: the papers' init for training from scratch.
INITS = ("identity", "identity-copies", "identity-sharp", "paper")

# Options that only set where the parameters start (the bias logits, alpha's initial
# value), not what the ops compute: left out of `Manifold.spec`.
INIT_ONLY = ("init", "alpha")

# RMSNorm epsilon of the flattened n*C state ("tiny" in the mHC paper).
RMS_EPS = 1e-6

# sigmoid(PRE_LOGIT_CAP) rounds to 1.0 in fp32; used for n = 1 where logit(1) is +inf.
PRE_LOGIT_CAP = 30.0

# Diagonal of H_res under the default init, for the manifolds whose rows sum to 1 (so any
# value keeps the function): the off-diagonal (1 - d) / (n - 1) is where the maps' gradients
# are not saturated. Chosen with benchmarks/learning.py, see docs/training.md.
MIXED_DIAGONAL = 0.7

# H_pre weight of the favoured stream in the identity-copies init (the others share the rest).
FAVOURED_PRE_WEIGHT = 0.75

# H_post of stream ``site mod n`` is 1 + POST_SPREAD in the identity init, the others'
# 1 - POST_SPREAD / (n - 1): the mean stays 1. Below 1 (H_post = 2 sigmoid is < 2) and
# n - 1. Chosen with benchmarks/learning.py, see docs/training.md.
POST_SPREAD = 0.5


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Coefficients and stream sums accumulate in fp32 (fp64 stays fp64, for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def flatten_positions(x: Tensor) -> Tensor:
    """A stream state ``[n, *pos, C]`` as ``[n, P, C]`` with ``P = prod(pos)``, a view where
    the layout allows (``-1`` for P would be ambiguous in an empty batch)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])


def _stream_blocks(x: Tensor, phi: Tensor) -> tuple[Tensor, Tensor]:
    """x ``[n, *pos, C]`` as ``[n, P, C]`` and phi ``[n*C, k]`` as its n row blocks
    ``[n, C, k]``, so that ``vec(X) @ phi = sum_i X[i] @ phi_i``: a matmul batched over the
    streams reads the stream-major state in place, where the positions-first ``vec X``
    (``[*pos, n*C]``) would be a copy of it."""
    return flatten_positions(x), phi.reshape(x.shape[0], x.shape[-1], phi.shape[-1])


class Manifold:
    """Base class of every mixer manifold. Subclasses set the class attributes and
    implement `res_logits`, `res_map` and `res_identity_bias`."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str]
    # Extra options a subclass accepts, with their defaults (streams/dynamic/init/alpha are common).
    option_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        streams: int,
        *,
        dynamic: bool = True,
        init: str = "identity",
        alpha: float = 0.01,
        **options: Any,
    ) -> None:
        if not isinstance(streams, int) or isinstance(streams, bool) or streams < 1:
            raise ValueError(f"streams must be an integer >= 1, got {streams!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not isinstance(dynamic, bool):
            raise ValueError(f"dynamic must be True or False, got {dynamic!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if dynamic and alpha == 0:
            # phi starts at zero, so with alpha = 0 both get zero gradients: the dynamic part
            # would never move.
            raise ValueError(
                "alpha = 0 with dynamic=True leaves the dynamic mixers without gradient "
                "(phi starts at zero); pass a nonzero alpha (default 0.01), or dynamic=False "
                "for static mixers"
            )
        unknown = set(options) - set(self.option_defaults)
        if unknown:
            valid = sorted({"streams", "dynamic", "init", "alpha", *self.option_defaults})
            raise ValueError(
                f"manifold {self.name!r} got unknown option(s) {sorted(unknown)}; "
                f"valid options: {valid}"
            )
        self.streams = streams
        self.dynamic = dynamic
        self.init = init
        self.alpha = float(alpha)
        self.options = {**self.option_defaults, **options}
        self.validate()

    # ----------------------------------------------------------------- subclass API
    def validate(self) -> None:
        """Check `self.options` (and `self.streams`); raise ValueError with a clear message."""

    @property
    def res_logits(self) -> int:
        """How many logits H_res is computed from."""
        raise NotImplementedError

    def res_map(self, logits: Tensor) -> Tensor:
        """``[..., res_logits]`` fp32 logits -> ``[..., n, n]`` H_res."""
        raise NotImplementedError

    def res_identity_bias(self) -> Tensor:
        """Logits (shape ``[res_logits]``) whose H_res is (close to) the identity."""
        raise NotImplementedError

    def res_init_bias(self) -> Tensor:
        """H_res logits of the default ``init="identity"``. Any H_res whose rows sum to 1
        keeps n identical streams identical, so a manifold with that property overrides this
        with logits that already mix the streams: near the identity its map saturates
        (off-diagonal gradients ~exp(-8)) and H_res would not move in a training run. The
        base returns `res_identity_bias`, for maps whose rows do not sum to 1 off I
        (orthogonal ones) and for HC, whose H_res is linear in its logits."""
        return self.res_identity_bias()

    def triton_res_map(self) -> str | None:
        """Triton source of `res_map` fused into the coefficient kernels (hcpass.codegen),
        or None: the kernels then return the raw H_res logits and `res_map` finishes in
        PyTorch (its gradient by `torch.func.vjp`).

        The source defines two ``@triton.jit`` functions (``triton`` and ``tl`` are in
        scope), fp32 (fp64 for fp64 streams), S >= n a power of two:
        ``res_map(logits, N: tl.constexpr, S: tl.constexpr)`` returns H_res as a
        ``[BLOCK, S, S]`` tile (entries with i or j >= N are padding, not stored) and
        ``res_map_vjp(logits, grad, N: tl.constexpr, S: tl.constexpr)`` the logits' gradient,
        shaped like `logits`, given H_res's (``grad`` is 0 on the padding). How `logits`
        arrives is `triton_res_layout`.
        """
        return None

    def res_map_backward(self, logits: Tensor, grad: Tensor) -> Tensor:
        """Gradient of the loss w.r.t. the ``[..., res_logits]`` logits given H_res's,
        ``grad`` (``[..., n, n]``). Optional: this fallback differentiates `res_map` by
        `torch.func.vjp` (recomputing it); a manifold overrides it with a closed form."""
        _, vjp = torch.func.vjp(self.res_map, logits)
        return vjp(grad)[0]

    # How `triton_res_map`'s functions receive the res logits: "square", a ``[BLOCK, S, S]``
    # tile with entry ``[b, i, j]`` = logit ``i * n + j`` (only for res_logits == n * n;
    # padding reads 0), or "flat", a ``[BLOCK, RW]`` tile with column r = logit r (RW >= 16
    # a power of two; columns r >= res_logits are padding, read 0, and their gradient is
    # ignored).
    triton_res_layout: ClassVar[str] = "square"

    # ------------------------------------------------------------------ shared parts
    @property
    def num_logits(self) -> int:
        return 2 * self.streams + self.res_logits

    def phi_shape(self, channels: int) -> tuple[int, ...]:
        """Shape of the dynamic projection weight phi for a stream of width `channels`."""
        return (self.streams * channels, self.num_logits)

    def project(self, x: Tensor, phi: Tensor) -> Tensor:
        """mHC's fused projection: ``(vec(X) @ phi) / rms(vec(X))`` per position.

        x: ``[n, *positions, C]`` -> ``[*positions, num_logits]`` in fp32. Dividing after
        the matmul equals projecting RMSNorm(vec X) (the norm weight is folded into phi).
        Computed stream by stream (`_stream_blocks`): the mean over vec X is over axes 0
        and -1 of x.
        """
        dtype = compute_dtype(x.dtype)
        x = x.to(dtype)
        xs, w = _stream_blocks(x, phi.to(dtype))
        rms = x.square().mean((0, -1)).unsqueeze(-1).add(RMS_EPS).sqrt()
        return (xs @ w).sum(0).reshape(*x.shape[1:-1], w.shape[-1]) / rms

    def split(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n = self.streams
        return logits[..., :n], logits[..., n : 2 * n], logits[..., 2 * n :]

    def coefficients(
        self, x: Tensor, phi: Tensor | None, alpha: Tensor | None, bias: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(H_pre ``[*pos, n]``, H_post ``[*pos, n]``, H_res ``[*pos, n, n]``) in
        ``compute_dtype(x.dtype)``."""
        positions = x.shape[1:-1]
        dtype = compute_dtype(x.dtype)
        b_pre, b_post, b_res = self.split(bias.to(dtype))
        if phi is None:
            l_pre, l_post, l_res = b_pre, b_post, b_res
        else:
            d_pre, d_post, d_res = self.split(self.project(x, phi))
            a = alpha.to(dtype)
            l_pre = a[0] * d_pre + b_pre
            l_post = a[1] * d_post + b_post
            l_res = a[2] * d_res + b_res
        h_pre = torch.sigmoid(l_pre)
        h_post = 2.0 * torch.sigmoid(l_post)
        h_res = self.res_map(l_res)
        n = self.streams
        return (
            h_pre.expand(*positions, n),
            h_post.expand(*positions, n),
            h_res.expand(*positions, n, n),
        )

    def coefficients_backward(
        self,
        grad_pre: Tensor,
        grad_post: Tensor,
        grad_res: Tensor,
        x: Tensor,
        phi: Tensor | None,
        alpha: Tensor | None,
        bias: Tensor,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
        """Gradients of (x, phi, alpha, bias) given those of (H_pre, H_post, H_res),
        recomputing the forward from the inputs (nothing else is saved).

        With ``f = vec X`` (``[*pos, nC]``), ``s = (mean f^2 + eps)^-1/2``, ``d = (f @ phi) s``,
        logits ``l = a * d + b`` (a per slice), the closed form is
        ``dl_pre = g_pre h(1 - h)``, ``dl_post = g_post h_post (1 - h_post / 2)``,
        ``dl_res = res_map_backward``; ``db = sum_pos dl``, ``da_k = sum dl_k * d_k``; with
        ``dd = a * dl``: ``dphi = f^T (dd s)`` and
        ``df = (dd s) @ phi^T - (sum dd * d) s^2 f / nC``. As in `project`, the products with
        f and phi are computed per stream: ``dphi_i = X[i]^T (dd s)``,
        ``dX[i] = (dd s) @ phi_i^T - (sum dd * d) s^2 X[i] / nC``.
        A subclass that overrides `coefficients` or `project` gets the vjp of its forward.
        """
        if (
            type(self).coefficients is not Manifold.coefficients
            or type(self).project is not Manifold.project
        ):
            return self._coefficients_vjp(grad_pre, grad_post, grad_res, x, phi, alpha, bias)
        dtype = compute_dtype(x.dtype)
        g_pre, g_post, g_res = grad_pre.to(dtype), grad_post.to(dtype), grad_res.to(dtype)
        b_pre, b_post, b_res = self.split(bias.to(dtype))
        if phi is None:
            # Static: one set of logits broadcast to every position.
            positions = tuple(range(g_pre.dim() - 1))
            dl = self._logit_grads(
                b_pre,
                b_post,
                b_res,
                g_pre.sum(positions),
                g_post.sum(positions),
                g_res.sum(positions),
            )
            return torch.zeros_like(x), None, None, dl.to(bias.dtype)
        xd = x.to(dtype)
        xs, w = _stream_blocks(xd, phi.to(dtype))
        inv_rms = torch.rsqrt(xd.square().mean((0, -1)).unsqueeze(-1) + RMS_EPS)
        d = (xs @ w).sum(0).reshape(*x.shape[1:-1], w.shape[-1]) * inv_rms
        a = alpha.to(dtype)
        d_pre, d_post, d_res = self.split(d)
        dl = self._logit_grads(
            a[0] * d_pre + b_pre,
            a[1] * d_post + b_post,
            a[2] * d_res + b_res,
            g_pre,
            g_post,
            g_res,
        )
        n = self.streams
        scale = torch.cat([a[0].expand(n), a[1].expand(n), a[2].expand(self.res_logits)])
        rows = dl.flatten(0, -2)
        g_bias = rows.sum(0)
        g_alpha = torch.stack([s.sum() for s in self.split((dl * d).flatten(0, -2).sum(0))])
        dd = dl * scale
        d_proj = dd * inv_rms
        # d_proj broadcast over the streams ([n, P, k], stride 0): the matmuls batch over them
        d_streams = d_proj.reshape(xs.shape[1], w.shape[-1]).expand(n, -1, -1)
        g_phi = (xs.transpose(1, 2) @ d_streams).flatten(0, 1)
        norm_share = (dd * d).sum(-1, keepdim=True) * inv_rms.square() / (n * xs.shape[-1])
        g_x = (d_streams @ w.transpose(1, 2)).view(x.shape).addcmul_(norm_share, xd, value=-1)
        return g_x.to(x.dtype), g_phi.to(phi.dtype), g_alpha.to(alpha.dtype), g_bias.to(bias.dtype)

    def _logit_grads(
        self,
        l_pre: Tensor,
        l_post: Tensor,
        l_res: Tensor,
        g_pre: Tensor,
        g_post: Tensor,
        g_res: Tensor,
    ) -> Tensor:
        """``[..., num_logits]`` gradient of the logits through the sigmoid maps and res_map."""
        h_pre = torch.sigmoid(l_pre)
        s_post = torch.sigmoid(l_post)
        return torch.cat(
            [
                g_pre * h_pre * (1 - h_pre),
                2.0 * g_post * s_post * (1 - s_post),
                self.res_map_backward(l_res, g_res),
            ],
            dim=-1,
        )

    def _coefficients_vjp(
        self,
        grad_pre: Tensor,
        grad_post: Tensor,
        grad_res: Tensor,
        x: Tensor,
        phi: Tensor | None,
        alpha: Tensor | None,
        bias: Tensor,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
        """`coefficients_backward` by differentiating `coefficients` with `torch.func.vjp`
        (torch.func rather than torch.autograd: this runs inside a custom-op kernel, below
        the Autograd dispatch key, where the autograd engine is switched off)."""
        present = [t for t in (x, phi, alpha, bias) if t is not None]

        def forward(*tensors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            it = iter(tensors)
            args = [next(it) if t is not None else None for t in (x, phi, alpha, bias)]
            return self.coefficients(*args)

        _, vjp = torch.func.vjp(forward, *present)
        grads = iter(vjp((grad_pre, grad_post, grad_res)))
        g_x, g_phi, g_alpha, g_bias = (
            next(grads) if t is not None else None for t in (x, phi, alpha, bias)
        )
        return g_x, g_phi, g_alpha, g_bias

    def init_alpha(self) -> Tensor:
        return torch.full((3,), self.alpha)

    def init_bias(self, chain_position: int, *, keep_copies: bool = False) -> Tensor:
        """Bias logits ``[num_logits]`` at init, for the site at `chain_position` in its chain
        (0 for its first site; the HC paper's layer index k in A_m = e_{k mod n}).

        Every function-preserving init relies on the n streams' *mean* being the original
        residual stream: the chain starts with n copies, reads out (and hands side readers)
        the mean, and every init H_res has columns summing to 1, so it keeps the mean.

        identity: H_pre uniform (1/n each), so the branch reads the mean; H_post has mean 1
        (stream ``chain_position mod n`` at 1 + POST_SPREAD, the others lower), so the mean gains
        exactly the branch output; H_res mixing (`res_init_bias`). The streams differ from
        the first site on. (A doubly stochastic H_res still gets no gradient at the first
        step, where every read is the mean, which it keeps; it does from the second, once
        H_pre has moved off uniform: docs/math.md.) This needs the streams to be
        combined only linearly between sites: with ``keep_copies=True`` (a chain that
        applies a post-norm or activation to every stream, where the mean of g(X_i) is not
        g of the mean) it falls back to identity-copies.
        identity-copies: the streams stay copies until training separates them: H_post = 1,
        H_pre sums to 1 favouring stream ``chain_position mod n`` (FAVOURED_PRE_WEIGHT; uniform
        weights with copies would make the streams a symmetric fixed point of training).
        identity-sharp: identity-copies with H_res ~ I (`res_identity_bias`).
        paper: the mHC-lite / KromHC / sHC init (+1 on stream ``chain_position mod n``, -1
        elsewhere, H_res ~ I), meant for training from scratch.
        """
        n = self.streams
        favoured = chain_position % n
        if self.init == "paper":
            b_pre = torch.full((n,), -1.0)
            b_pre[favoured] = 1.0
            b_post = b_pre.clone()
        elif n == 1:
            b_pre, b_post = torch.full((1,), PRE_LOGIT_CAP), torch.zeros(1)
        elif self.init == "identity" and not keep_copies and self._keeps_mean():
            b_pre = torch.full((n,), -math.log(n - 1))  # sigmoid = 1/n
            post = torch.full((n,), 1 - POST_SPREAD / (n - 1), dtype=torch.float64)
            post[favoured] = 1 + POST_SPREAD
            b_post = torch.logit(post / 2).float()
        else:
            weights = torch.full((n,), (1 - FAVOURED_PRE_WEIGHT) / (n - 1))
            weights[favoured] = FAVOURED_PRE_WEIGHT
            b_pre = torch.logit(weights.double()).float()
            b_post = torch.zeros(n)
        sharp = self.init in ("identity-sharp", "paper")
        b_res = self.res_identity_bias() if sharp else self.res_init_bias()
        return torch.cat([b_pre, b_post, b_res.float()])

    def _keeps_mean(self) -> bool:
        """Whether the init H_res has columns summing to 1 (it keeps the streams' mean), as
        the identity init needs once the streams differ. True for every built-in manifold;
        a custom map whose init H_res only has rows summing to 1 gets identity-copies."""
        h_res = self.res_map(self.res_init_bias().double())
        column_sums = h_res.sum(-2).double()  # a custom map may compute in fp32
        return bool(torch.allclose(column_sums, torch.ones_like(column_sums), atol=1e-6))

    # ---------------------------------------------------------------------- identity
    @property
    def config(self) -> dict[str, Any]:
        return {
            "streams": self.streams,
            "dynamic": self.dynamic,
            "init": self.init,
            "alpha": self.alpha,
            **self.options,
        }

    def spec(self) -> str:
        """Canonical string naming the function this manifold's ops compute: its name and
        every option but the init-only ones (an op argument and a cache key);
        `hcpass.manifolds.resolve` turns it back into an instance that computes the same.
        Leaving out where the parameters start lets two models of one class, converted
        with different inits, share the graphs Dynamo caches for that class."""
        computed = {k: v for k, v in self.config.items() if k not in INIT_ONLY}
        return f"{self.name}:{json.dumps(computed, sort_keys=True, separators=(',', ':'))}"

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({opts})"
