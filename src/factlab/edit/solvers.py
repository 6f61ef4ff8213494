"""The preservation-memorisation solves (algorithms.md §7.1), in float64, as low-rank factors.

Notation: ``C`` (d_in x d_in) second moment, ``K`` (d_in x n) keys, ``R`` (d_out x n) residuals
``V - W K`` (what the update must add at the keys). Every solver returns ``(A, B)`` with
``Delta W = A @ B.T`` (``A``: d_out x n, ``B``: d_in x n), so rank-``n`` updates are kept factored.

- ROME / EMMET (equality ``W' K = V``, preserving ``C``): ``Delta = R (K^T C^-1 K + mu I)^-1 K^T C^-1``
  (``mu = emmet_lambda`` for n > 1, 0 for n = 1, where it is ROME's ``R (C^-1 k)^T / (k^T C^-1 k)``).
- MEMIT (least squares ``lambda ||Delta K0||^2 + ||W' K - V||^2``): ``Delta = R K^T (lambda C + K K^T)^-1``,
  computed by Woodbury from the Cholesky factor of ``lambda C`` (an n x n solve instead of d_in x d_in).

- MEMIT with history (the RLS form; AlphaEdit's ``MEMIT_seq``, algorithms.md §15.1): ``H = K_p K_p^T`` sums the
  keys of earlier edits at the layer, ``Delta = R K^T (lambda C + H + K K^T)^-1`` (Woodbury on ``lambda C + H``).
- AlphaEdit (algorithms.md §15.1, paper Eq. 14 with the code's ``L2``): ``P`` projects onto the eigenvectors of ``C``
  with eigenvalue below a threshold; ``Delta = R K^T P (H P + K K^T P + l2 I)^-1``.

``C^-1`` is never formed: triangular solves with the Cholesky factor ``L`` (``C = L L^T``).
"""

from __future__ import annotations

import torch

from factlab.edit.errors import DivergenceError, SingularStatisticsError


def _solve_c(L: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """``C^-1 K`` from the lower Cholesky factor of ``C``."""
    return torch.cholesky_solve(K, L)


def _check(*ts: torch.Tensor) -> None:
    for t in ts:
        if not torch.isfinite(t).all():
            raise DivergenceError("the solve produced NaN/inf; the statistics are ill-conditioned - add hparams ridge (e.g. 1e-4) or more samples")


def rome_factors(L: torch.Tensor, k: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ROME for one key ``k`` (d_in,) and residual ``r`` (d_out,): ``A = r / (k^T C^-1 k)``, ``B = C^-1 k``."""
    L = L.double()
    k = k.double().reshape(-1, 1)
    r = r.double().reshape(-1, 1)
    u = _solve_c(L, k)
    denom = float((u * k).sum())
    if not denom > 0:
        raise SingularStatisticsError(f"k^T C^-1 k = {denom:.3g} is not positive; the statistics are not positive definite - add ridge")
    A, B = r / denom, u
    _check(A, B)
    return A, B


def emmet_factors(L: torch.Tensor, K: torch.Tensor, R: torch.Tensor, mu: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Equality-constrained batch: ``A = R (K^T C^-1 K + mu I)^-1``, ``B = C^-1 K``. ``mu`` is applied only for n > 1."""
    L, K, R = L.double(), K.double(), R.double()
    n = K.shape[1]
    U = _solve_c(L, K)  # C^-1 K   (d_in, n)
    D = K.T @ U  # (n, n), symmetric PD
    if n > 1 and mu:
        D = D + mu * torch.eye(n, dtype=D.dtype, device=D.device)
    D = (D + D.T) / 2
    Ld, info = torch.linalg.cholesky_ex(D)
    if int(info) == 0:
        A = torch.cholesky_solve(R.T, Ld).T  # R D^-1
    else:  # dependent keys (e.g. duplicate requests): least-norm solution, as the reference's pinv fallback
        A = R @ torch.linalg.pinv(D, hermitian=True)
    _check(A, U)
    return A, U


def memit_factors(L_scaled: torch.Tensor, K: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares: ``A = R``, ``B = (lambda C + K K^T)^-1 K`` with ``L_scaled`` the Cholesky factor of ``lambda C``.

    Woodbury: ``(lambda C + K K^T)^-1 K = M (I + K^T M)^-1`` with ``M = (lambda C)^-1 K``.
    """
    L, K, R = L_scaled.double(), K.double(), R.double()
    n = K.shape[1]
    M = _solve_c(L, K)
    S = torch.eye(n, dtype=M.dtype, device=M.device) + K.T @ M
    B = torch.linalg.solve(S, M.T).T  # M S^-1  (S = S^T)
    _check(B, R)
    return R.clone(), B


def memit_history_factors(C_scaled: torch.Tensor, H: torch.Tensor | None, K: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT with earlier keys in the inverse: ``A = R``, ``B = (lambda C + H + K K^T)^-1 K``.

    ``C_scaled`` (d_in, d_in) is ``lambda C`` (ridge included), ``H`` (d_in, d_in) the sum of ``K_p K_p^T`` over
    earlier edits (None: none, which is plain MEMIT), ``K`` (d_in, n), ``R`` (d_out, n).
    """
    M = C_scaled.double() if H is None else C_scaled.double() + H.double()
    L, info = torch.linalg.cholesky_ex((M + M.T) / 2)
    if int(info) != 0:
        raise SingularStatisticsError("lambda C + K_p K_p^T is not positive definite; set hparams ridge > 0 (e.g. 1e-4) or use more statistics tokens")
    return memit_factors(L, K, R)


def null_space_projector(C: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's projector: ``(P, eigenvalues)`` with ``P = U U^T`` (d_in, d_in) float64 over the eigenvectors
    ``U`` of the symmetric ``C`` (d_in, d_in) whose eigenvalue is below ``threshold`` (absolute); ``eigenvalues``
    (d_in,) ascending, so the kept dimension is ``(eigenvalues < threshold).sum()``."""
    C = C.double()
    evals, U = torch.linalg.eigh((C + C.T) / 2)
    Uk = U[:, evals < threshold]
    return Uk @ Uk.T, evals


def alphaedit_factors(P: torch.Tensor, H: torch.Tensor | None, K: torch.Tensor, R: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit: ``A = R``, ``B = (P S + l2 I)^-1 P K`` with ``S = H + K K^T``, so that
    ``A B^T = R K^T P (S P + l2 I)^-1`` (``P``, ``H``: (d_in, d_in); ``K``: (d_in, n); ``R``: (d_out, n)).

    ``B`` lies in range(P) (``l2 B = P (K - S B)``), so ``Delta x = 0`` for every ``x`` with ``P x = 0``.
    """
    P, K, R = P.double(), K.double(), R.double()
    S = K @ K.T if H is None else H.double() + K @ K.T
    M = P @ S + l2 * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
    B = torch.linalg.solve(M, P @ K)
    _check(B, R)
    return R.clone(), B


def dense(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ B.T``."""
    return A @ B.T
