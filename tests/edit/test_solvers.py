"""The closed-form solves against plain reference formulas (explicit inverses, kept here)."""

from __future__ import annotations

import pytest
import torch

from factlab.edit.errors import SingularStatisticsError
from factlab.edit.solvers import (
    alphaedit_factors,
    dense,
    emmet_factors,
    memit_factors,
    memit_history_factors,
    null_space_projector,
    rome_factors,
)
from factlab.edit.stats import SecondMoment

torch.manual_seed(0)


def _spd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * d, d, generator=g, dtype=torch.float64)
    return X.T @ X / (4 * d)


def _chol(C):
    return torch.linalg.cholesky(C)


def test_rome_writes_value_and_keeps_c_orthogonal_keys():
    d_in, d_out = 12, 7
    C, W = _spd(d_in), torch.randn(d_out, d_in, dtype=torch.float64)
    k, v = torch.randn(d_in, dtype=torch.float64), torch.randn(d_out, dtype=torch.float64)
    A, B = rome_factors(_chol(C), k, v - W @ k)
    W2 = W + dense(A, B)
    torch.testing.assert_close(W2 @ k, v, rtol=1e-10, atol=1e-10)
    # keys with zero C^-1 inner product to k map as before
    u = torch.linalg.solve(C, k)
    for _ in range(5):
        x = torch.randn(d_in, dtype=torch.float64)
        x = x - (x @ u) / (u @ u) * u  # x . C^-1 k = 0
        torch.testing.assert_close(W2 @ x, W @ x, rtol=1e-10, atol=1e-10)
    # plain formula: Delta = (v - W k) (C^-1 k)^T / ((C^-1 k)^T k)
    ref = torch.outer(v - W @ k, u) / (u @ k)
    torch.testing.assert_close(dense(A, B), ref)


def test_emmet_one_request_is_rome_and_batch_meets_constraints():
    d_in, d_out = 10, 6
    C = _spd(d_in, 1)
    L = _chol(C)
    K, R = torch.randn(d_in, 1, dtype=torch.float64), torch.randn(d_out, 1, dtype=torch.float64)
    ra, rb = rome_factors(L, K[:, 0], R[:, 0])
    ea, eb = emmet_factors(L, K, R, mu=0.1)  # mu is not applied for one request
    torch.testing.assert_close(dense(ea, eb), dense(ra, rb))
    K, R = torch.randn(d_in, 4, dtype=torch.float64), torch.randn(d_out, 4, dtype=torch.float64)
    a, b = emmet_factors(L, K, R, mu=0.0)
    torch.testing.assert_close(dense(a, b) @ K, R)
    Ci = torch.linalg.inv(C)
    ref = R @ torch.linalg.inv(K.T @ Ci @ K + 0.5 * torch.eye(4, dtype=torch.float64)) @ K.T @ Ci
    a, b = emmet_factors(L, K, R, mu=0.5)
    torch.testing.assert_close(dense(a, b), ref)


@pytest.mark.parametrize("n", [1, 5, 30])
def test_memit_woodbury_matches_plain_least_squares(n):
    d_in, d_out, lam = 16, 8, 3.0
    C = _spd(d_in, 2)
    K, R = torch.randn(d_in, n, dtype=torch.float64), torch.randn(d_out, n, dtype=torch.float64)
    a, b = memit_factors(_chol(lam * C), K, R)
    ref = R @ K.T @ torch.linalg.inv(lam * C + K @ K.T)
    torch.testing.assert_close(dense(a, b), ref)


def test_singular_statistics_raise():
    m = SecondMoment(torch.zeros(5, 5), 10)
    with pytest.raises(SingularStatisticsError, match="ridge"):
        m.factor()
    # a ridge makes it usable
    m2 = SecondMoment(torch.diag(torch.tensor([1.0, 1, 1, 1, 0])), 10)
    with pytest.raises(SingularStatisticsError):
        m2.factor()
    assert torch.isfinite(m2.factor(ridge=1e-3)).all()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n", [1, 4])
def test_memit_history_matches_plain_rls_formula(n):
    d_in, d_out, lam = 14, 6, 2.0
    C = _spd(d_in, 3)
    Kp = torch.randn(d_in, 9, dtype=torch.float64, generator=_gen(1))
    H = Kp @ Kp.T
    K, R = torch.randn(d_in, n, dtype=torch.float64, generator=_gen(2)), torch.randn(d_out, n, dtype=torch.float64, generator=_gen(3))
    a, b = memit_history_factors(lam * C, H, K, R)
    ref = R @ K.T @ torch.linalg.inv(lam * C + Kp @ Kp.T + K @ K.T)
    torch.testing.assert_close(dense(a, b), ref)
    a0, b0 = memit_history_factors(lam * C, None, K, R)  # no history: MEMIT
    torch.testing.assert_close(dense(a0, b0), R @ K.T @ torch.linalg.inv(lam * C + K @ K.T))
    assert not torch.allclose(dense(a, b), dense(a0, b0))


def test_memit_history_refuses_indefinite_matrix():
    with pytest.raises(SingularStatisticsError, match="ridge"):
        memit_history_factors(-torch.eye(4, dtype=torch.float64), None, torch.ones(4, 1, dtype=torch.float64), torch.ones(3, 1, dtype=torch.float64))


def test_null_space_projector_keeps_small_eigenvalue_directions():
    d = 10
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=_gen(4)))
    evals = torch.tensor([1e-4, 5e-3, 1e-2, 0.03, 0.1, 0.5, 1.0, 2.0, 3.0, 5.0], dtype=torch.float64)
    C = Q @ torch.diag(evals) @ Q.T
    P, got = null_space_projector(C, 2e-2)
    U = Q[:, :3]  # the three eigenvalues below 2e-2
    torch.testing.assert_close(P, U @ U.T)
    torch.testing.assert_close(P @ P, P)
    torch.testing.assert_close(got, evals)
    assert int((got < 2e-2).sum()) == 3


@pytest.mark.parametrize("with_history", [False, True])
def test_alphaedit_matches_eq14_and_preserves_the_kept_space(with_history):
    d_in, d_out, n, l2 = 12, 5, 3, 0.7
    Q, _ = torch.linalg.qr(torch.randn(d_in, d_in, dtype=torch.float64, generator=_gen(5)))
    U = Q[:, :5]  # the null space
    P = U @ U.T
    K, R = torch.randn(d_in, n, dtype=torch.float64, generator=_gen(6)), torch.randn(d_out, n, dtype=torch.float64, generator=_gen(7))
    Kp = torch.randn(d_in, 7, dtype=torch.float64, generator=_gen(8))
    H = Kp @ Kp.T if with_history else None
    a, b = alphaedit_factors(P, H, K, R, l2)
    S = K @ K.T if H is None else Kp @ Kp.T + K @ K.T
    ref = R @ K.T @ P @ torch.linalg.inv(S @ P + l2 * torch.eye(d_in, dtype=torch.float64))  # Eq. 14, I scaled by l2
    torch.testing.assert_close(dense(a, b), ref)
    keep = Q[:, 5:]  # the preserved space: Delta x = 0 there
    torch.testing.assert_close(dense(a, b) @ keep, torch.zeros(d_out, d_in - 5, dtype=torch.float64), atol=1e-12, rtol=0)
    assert dense(a, b).abs().max() > 1e-3
