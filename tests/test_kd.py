"""kd.py: the loss against dense brute-force references, and the fused path against the plain one."""

import pytest
import torch

import kd
from cache_teacher import EXP_FLOOR, topk_stats
from kd import DIVERGENCES, FUSED, check_impl, kd_loss, kd_stats, teacher_q

# --- the loss against a dense reference built from full distributions -----------------------------------------


def dense_reference(h, W, z, targets, m, alpha, T, k, mode, n_norm):
    """Brute force from the full teacher logits z and full student logits: coarsen both distributions at T to the
    teacher's top-k ids plus one tail bucket (tail) or renormalise over the top-k (renorm)."""
    u = h @ W.t()
    ids = torch.topk(z, k, -1).indices
    q = torch.softmax(z.double() / T, -1)
    p = torch.softmax(u.double() / T, -1)
    qK, pK = q.gather(1, ids), p.gather(1, ids)
    if mode == "tail":
        qb = torch.cat([qK, 1 - qK.sum(-1, keepdim=True)], 1)
        pb = torch.cat([pK, 1 - pK.sum(-1, keepdim=True)], 1)
    else:
        qb, pb = qK / qK.sum(-1, keepdim=True), pK / pK.sum(-1, keepdim=True)
    kl = (qb * (qb.log() - pb.log())).sum(-1)
    ce = -torch.log_softmax(u.double(), -1).gather(1, targets[:, None])[:, 0]
    return (m * ((1 - alpha) * ce + alpha * T * T * kl)).sum() / n_norm


def cached_teacher(z, k, temperatures=(1.0, 2.0), fp16=True):
    """What cache_teacher.py stores for these logits (top-k log-probs, rounded to fp16 as on disk; logsumexp per T)."""
    head = torch.nn.Linear(z.shape[1], z.shape[1], bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(z.shape[1]))  # head(h) = h: feed the logits straight through
        st = topk_stats(head, z.clone(), torch.zeros(len(z), dtype=torch.long), k, list(temperatures), 1024)
    return st["ids"], st["logprobs"].half().float() if fp16 else st["logprobs"], st["lse"]


@pytest.mark.parametrize("impl", ["fused", "plain"])
@pytest.mark.parametrize("T, mode", [(1.0, "tail"), (2.0, "tail"), (2.0, "renorm")])
def test_loss_and_gradients_match_dense_reference(T, mode, impl):
    """Loss, T^2 factor, weights, normalisation and both gradients equal a dense autograd brute force."""
    torch.manual_seed(0)
    R, C, V, k = 37, 16, 300, 64
    h = torch.randn(R, C, requires_grad=True)
    W = (torch.randn(V, C) * 0.5).requires_grad_(True)
    z = torch.randn(R, V) * 3
    targets = torch.randint(0, V, (R,))
    m = torch.rand(R) * 2 + 0.5
    alpha, n_norm = 0.45, 50.0
    ref = dense_reference(h, W, z, targets, m, alpha, T, k, mode, n_norm)
    gh_ref, gW_ref = torch.autograd.grad(ref, [h, W])
    w_ce, w_kd = m * (1 - alpha) / n_norm, m * alpha * T * T / n_norm
    # the math, with the teacher's top-k kept in fp32: tight
    ids, lp, lse = cached_teacher(z, k, fp16=False)
    lq, Q = teacher_q(lp, lse, [1.0, 2.0].index(T), T)
    loss, sums = kd_loss(h, W, targets, w_ce, w_kd, (ids, lq, Q), T, mode, 7, impl)  # 7: chunks do not divide R
    gh, gW = torch.autograd.grad(loss, [h, W])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(gh, gh_ref.float(), rtol=1e-4, atol=1e-7)
    assert torch.allclose(gW, gW_ref.float(), rtol=1e-4, atol=1e-7)
    assert Q.mean() > 0.01  # the tail bucket carries weight here
    # end to end with the fp16 log-probs as cached on disk: within the storage precision
    ids16, lp16, lse16 = cached_teacher(z, k)
    lq16, Q16 = teacher_q(lp16, lse16, [1.0, 2.0].index(T), T)
    loss16, _ = kd_loss(h, W, targets, w_ce, w_kd, (ids16, lq16, Q16), T, mode, 7, impl)
    assert loss16.item() == pytest.approx(ref.item(), rel=2e-4)
    # normalisation by the row count, not by the sum of m: doubling m doubles the loss
    loss2, _ = kd_loss(h, W, targets, 2 * w_ce, 2 * w_kd, (ids, lq, Q), T, mode, 7, impl)
    assert loss2.item() == pytest.approx(2 * loss.item(), rel=1e-6)


@pytest.mark.parametrize("impl", ["fused", "plain"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_peaked_rows_match_dense_reference(T, impl):
    """A trained model's rows, minus their max, reach far below -87, where fp32 exp leaves the normal range (and
    where a CPU's exp is 10-30x slower, so kd_rows and row_stats clamp its input at EXP_FLOOR). Loss, gradients and
    the cached statistics still equal a float64 brute force. (Not covered: a row whose whole tail at T lies below
    exp(-87), so that the student's tail mass P is not an fp32 number; there the loss stays finite, but the tail's
    gradient is spread evenly over the tail ids instead of in proportion to p.)"""
    torch.manual_seed(2)
    R, C, V, k = 24, 16, 300, 64
    h = (torch.randn(R, C) * 12).requires_grad_(True)
    W = torch.randn(V, C).requires_grad_(True)
    z = torch.randn(R, V) * 60
    u = (h @ W.t()).detach()
    assert ((u - u.max(-1, keepdim=True).values) < EXP_FLOOR).float().mean() > 0.3  # the clamped region is hit
    assert ((z - z.max(-1, keepdim=True).values) < EXP_FLOOR).float().mean() > 0.3
    targets = torch.randint(0, V, (R,))
    m, alpha, n_norm = torch.ones(R), 0.45, float(R)
    # the brute force in log space (1 - sum of the top-k underflows to 0 or below at these peaks, even in float64)
    ids = torch.topk(z, k, -1).indices
    tail = torch.ones(R, V, dtype=torch.bool).scatter_(1, ids, False)
    lq_all, lp_all = torch.log_softmax(z.double() / T, -1), torch.log_softmax((h @ W.t()).double() / T, -1)
    lqK, lpK = lq_all.gather(1, ids), lp_all.gather(1, ids)
    lQ, lP = (torch.logsumexp(a.masked_fill(~tail, -float("inf")), -1) for a in (lq_all, lp_all))
    kl = (lqK.exp() * (lqK - lpK)).sum(-1) + lQ.exp() * (lQ - lP)
    ce = -torch.log_softmax((h @ W.t()).double(), -1).gather(1, targets[:, None])[:, 0]
    ref = (m * ((1 - alpha) * ce + alpha * T * T * kl)).sum() / n_norm
    gh_ref, gW_ref = torch.autograd.grad(ref, [h, W])
    assert torch.isfinite(ref) and ref > 1.0  # finite, and far from a trivial loss
    ids, lp, lse = cached_teacher(z, k, fp16=False)
    assert torch.allclose(lse.double(), torch.stack([torch.logsumexp(z.double() / t, -1) for t in (1, 2)], 1),
                          rtol=1e-6)
    assert torch.allclose(lp.double(), torch.log_softmax(z.double(), -1).gather(1, ids), rtol=1e-5, atol=1e-4)
    lq, Q = teacher_q(lp, lse, [1.0, 2.0].index(T), T)
    loss, sums = kd_loss(h, W, targets, m * (1 - alpha) / n_norm, m * alpha * T * T / n_norm, (ids, lq, Q), T,
                         "tail", 7, impl)
    gh, gW = torch.autograd.grad(loss, [h, W])
    assert torch.isfinite(sums).all()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(gh, gh_ref.float(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(gW, gW_ref.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "plain"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_underflowing_tails_stay_finite(T, impl):
    """Rows so peaked that the student's whole tail underflows in fp32: loss, statistics and gradients stay finite
    (before the exp clamp, the gradients at T = 1 held inf or nan here)."""
    torch.manual_seed(2)
    R, C, V, k = 24, 16, 300, 64
    h, W = (torch.randn(R, C) * 25).requires_grad_(True), torch.randn(V, C).requires_grad_(True)
    z = torch.randn(R, V) * 100
    targets, m = torch.randint(0, V, (R,)), torch.ones(R)
    ids, lp, lse = cached_teacher(z, k, fp16=False)
    lq, Q = teacher_q(lp, lse, [1.0, 2.0].index(T), T)
    loss, sums = kd_loss(h, W, targets, m * 0.55 / R, m * 0.45 * T * T / R, (ids, lq, Q), T, "tail", 7, impl)
    gh, gW = torch.autograd.grad(loss, [h, W])
    for t in (loss, sums, gh, gW):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("impl", ["fused", "plain"])
def test_t_squared_factor_and_alpha(impl):
    """alpha = 1 leaves T^2 x KL only; alpha = 0 leaves CE only (independent of the teacher)."""
    torch.manual_seed(1)
    R, C, V, k = 20, 8, 200, 64
    h, W, z = torch.randn(R, C), torch.randn(V, C), torch.randn(R, V) * 2
    targets = torch.randint(0, V, (R,))
    ids, lp, lse = cached_teacher(z, k)
    lq, Q = teacher_q(lp, lse, 1, 2.0)
    one = torch.ones(R)
    kd, sums = kd_loss(h, W, targets, 0 * one, 4.0 * one, (ids, lq, Q), 2.0, "tail", 64, impl)
    assert kd.item() == pytest.approx(4.0 * sums[1].item(), rel=1e-5)  # T^2 = 4 times the summed KL
    ce, sums = kd_loss(h, W, targets, one, 0 * one, (ids, lq + 5, Q), 2.0, "tail", 64, impl)
    ref = torch.nn.functional.cross_entropy(h @ W.t(), targets, reduction="sum")
    assert ce.item() == pytest.approx(ref.item(), rel=1e-5)


# --- the fused path against the plain one --------------------------------------------------------------------


def loss_and_grads(h, W, targets, w_ce, w_kd, teacher, T, mode, impl, autocast=False):
    h, W = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, sums = kd_loss(h, W, targets, w_ce, w_kd, teacher, T, mode, 16, impl)
    return (loss, sums, *torch.autograd.grad(loss, [h, W]))


@pytest.mark.parametrize("mode", FUSED)
@pytest.mark.parametrize("T", [1.0, 2.0, 1.5])
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_equals_plain(mode, T, autocast):
    """For every built-in mode and temperature, fp32 and under BF16 autocast (the training dtype): the fused path's
    loss, summed statistics and both gradients equal the plain path's (autograd through the bucket log-probs)."""
    torch.manual_seed(3)
    R, C, V, k = 45, 24, 400, 32
    h, W = torch.randn(R, C), torch.randn(V, C) * 0.4
    targets = torch.randint(0, V, (R,))
    ids, lp, lse = cached_teacher(torch.randn(R, V) * 3, k, temperatures=(1.0, T))
    teacher = (ids, *teacher_q(lp, lse, 1, T))
    w_ce, w_kd = torch.rand(R), torch.rand(R) * T * T
    fused = loss_and_grads(h, W, targets, w_ce, w_kd, teacher, T, mode, "fused", autocast)
    plain = loss_and_grads(h, W, targets, w_ce, w_kd, teacher, T, mode, "plain", autocast)
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-4, atol=1e-6)  # bf16 logits round differently
    for name, f, p in zip(["loss", "sums", "grad h", "grad W"], fused, plain):
        assert torch.allclose(f.double(), p.double(), **tol), (name, f, p)
    # and without a teacher (plain language-model training): CE only, the same on both paths
    fused = loss_and_grads(h, W, targets, w_ce, 0 * w_kd, None, T, mode, "fused")
    plain = loss_and_grads(h, W, targets, w_ce, 0 * w_kd, None, T, mode, "plain")
    assert all(torch.allclose(f, p, rtol=1e-5, atol=1e-7, equal_nan=True) for f, p in zip(fused, plain))


def test_a_new_divergence_is_one_function(monkeypatch):
    """The hack path: a divergence added to DIVERGENCES alone (reverse KL here) trains through the plain path, with
    the gradient of a dense brute force; the fused path refuses it with one clear message."""
    def reverse_kl(ls, lt):
        return (ls.exp() * (ls - lt)).sum(-1)

    monkeypatch.setitem(DIVERGENCES, "example_reverse", reverse_kl)
    torch.manual_seed(4)
    R, C, V, k, T = 30, 16, 200, 16, 2.0
    h, W = torch.randn(R, C, requires_grad=True), (torch.randn(V, C) * 0.5).requires_grad_(True)
    z, targets = torch.randn(R, V) * 3, torch.randint(0, V, (R,))
    ids, lp, lse = cached_teacher(z, k, fp16=False)
    teacher = (ids, *teacher_q(lp, lse, 1, T))
    impl = check_impl("example_reverse", None)  # plain: no fused version
    loss, _ = kd_loss(h, W, targets, torch.zeros(R), torch.ones(R), teacher, T, "example_reverse", 7, impl)
    # brute force: both full distributions at T, coarsened to the k ids + the tail, then sum p (log p - log q)
    p, q = torch.softmax((h @ W.t()).double() / T, -1), torch.softmax(z.double() / T, -1)
    pb = torch.cat([p.gather(1, ids), 1 - p.gather(1, ids).sum(-1, keepdim=True)], 1)
    qb = torch.cat([q.gather(1, ids), 1 - q.gather(1, ids).sum(-1, keepdim=True)], 1)
    ref = (pb * (pb.log() - qb.log())).sum()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for g, g_ref in zip(torch.autograd.grad(loss, [h, W]), torch.autograd.grad(ref, [h, W])):
        assert torch.allclose(g, g_ref.float(), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="--kd_mode example_reverse has no fused version"):
        check_impl("example_reverse", "fused")


def test_evaluation_statistics_agree():
    """kd_stats, the evaluation's per-row statistics, agree between the two paths (CE, KL, top-1, tail gap)."""
    torch.manual_seed(5)
    R, C, V, k, T = 40, 16, 300, 16, 2.0
    h, W, targets = torch.randn(R, C), torch.randn(V, C) * 0.5, torch.randint(0, V, (R,))
    ids, lp, lse = cached_teacher(torch.randn(R, V) * 3, k)
    teacher = (ids, *teacher_q(lp, lse, 1, T))
    for mode in FUSED:
        rows = {impl: {n: torch.cat([st[n] for _, st in kd_stats(h, W, targets, teacher, T, mode, 16, impl)])
                       for n in kd.ROW_STATS} for impl in ("fused", "plain")}
        for n in kd.ROW_STATS:
            assert torch.allclose(rows["fused"][n], rows["plain"][n], rtol=1e-4, atol=1e-6), (mode, n)
