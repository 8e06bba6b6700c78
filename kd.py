"""
The distillation loss of Phase 4, in one place: the math, a plain reference implementation, and the fused fast path.

At a trainable row with loss multiplier m, the student's logits u (V,), the teacher's cached top-k ids K and a
temperature T:
    loss = m * ((1 - alpha) * CE(u, target) + alpha * T^2 * D(p_T || q_T))
where p_T and q_T are the student's and the teacher's distributions at T coarsened to k + 1 buckets: the k cached
ids and one tail bucket for the rest of the vocabulary (the teacher's tail mass Q_T comes from the cached logsumexp).
D is a divergence of the two bucket distributions:
    tail    KL_{k+1}(q || p) = sum_b q_b (log q_b - log p_b)                      (the card's KD, the default)
    renorm  KL(q~ || p~), both renormalised over the k ids, tail dropped            (the usual top-k KD, an ablation)
train.py passes w_ce = m (1 - alpha) / n and w_kd = m alpha T^2 / n per row, n = the step's trainable rows.

Both paths apply the lm_head `chunk` rows at a time, so a micro-batch's (rows, vocabulary) logits never exist at once.
  plain   kd_plain: bucket log-probs, D from DIVERGENCES, autograd (each chunk checkpointed). The reference, and the
          place to add a divergence (train.py --kd_mode NAME --kd_impl plain).
  fused   ChunkedKDLoss: the logits' gradient in closed form in the forward (Liger-style), in fp32 row blocks that
          stay in a CPU's cache, one exp per element; the built-in modes only (FUSED).
"""

import torch
from torch.utils.checkpoint import checkpoint

from cache_teacher import EXP_FLOOR, teacher_log_q

ROW_STATS = ("ce", "kl", "agree", "tail_gap")  # per-row statistics both paths return, summed per step
LOSS_CHUNK = 1024  # rows per lm_head matmul in the loss (2 x 512): smaller chunks run the matmuls below the peak
BLOCK_ELEMENTS = 1 << 20  # fp32 logits worked out together by the fused path: 4 MiB, which stays in a CPU's cache


def teacher_q(topk_logprobs, lse, t_index, T):
    """The teacher's side from the cache: log q_T over its k ids (R, k) and the tail mass Q_T (R,).
    topk_logprobs (R, k) at T=1, lse (R, nT), fp32."""
    lq = teacher_log_q(topk_logprobs, lse, t_index, T)
    return lq, (1.0 - lq.exp().sum(-1)).clamp_min(0.0)  # clamp: fp16 log-probs may sum a hair above 1


# -----------------------------------------------------------------------------
# The divergences: (student, teacher) bucket log-probs (R, k + 1), the tail bucket last -> (R,). The teacher's tail
# log-prob is -inf where its top-k holds all the mass (Q = 0): a divergence must stay finite there


def kl_tail(ls, lt):
    """KL_{k+1}(q || p) over the k cached ids and the tail bucket (the card's)."""
    q = lt.exp()
    return (torch.xlogy(q, q) - q * ls).sum(-1)  # xlogy: a bucket with q = 0 adds 0, also where log q = -inf


def kl_renorm(ls, lt):
    """KL(q~ || p~) with both sides renormalised over the k ids, the tail dropped (the usual top-k KD)."""
    ls, lt = ls[:, :-1], lt[:, :-1]  # (R, k) each
    ls = ls - torch.logsumexp(ls, -1, keepdim=True)
    lt = lt - torch.logsumexp(lt, -1, keepdim=True)
    return (lt.exp() * (lt - ls)).sum(-1)


DIVERGENCES = {"tail": kl_tail, "renorm": kl_renorm}  # train.py --kd_mode choices
FUSED = ("tail", "renorm")  # the modes the fused path implements (kd_rows below)


# -----------------------------------------------------------------------------
# The plain path: bucket log-probs and autograd


def plain_rows(z, targets, teacher, T, mode):
    """Per-row statistics (ROW_STATS, each (r,)) of one chunk of logits z (r, V), differentiable in z.
    teacher None (CE only) or (ids (r, k), lq (r, k), Q (r,)) as teacher_q gives them."""
    u = z.float()  # (r, V) fp32 for the softmax statistics
    ce = torch.logsumexp(u, -1) - u.gather(1, targets[:, None])[:, 0]
    if teacher is None:  # no teacher (plain language-model training): CE only
        nan = torch.full_like(ce, float("nan"))
        return dict(ce=ce, kl=torch.zeros_like(ce), agree=nan, tail_gap=nan)
    ids, lq, Q = teacher
    lp = torch.log_softmax(u / T, -1)  # (r, V) student log p_T
    lp_tail = lp.scatter(1, ids, float("-inf")).logsumexp(-1)  # (r,) log P_T: the mass outside the k ids
    ls = torch.cat([lp.gather(1, ids), lp_tail[:, None]], 1)  # (r, k + 1) student buckets
    lt = torch.cat([lq, Q.log()[:, None]], 1)  # (r, k + 1) teacher buckets
    agree = (u.argmax(-1) == ids[:, 0]).float()  # the student's top-1 is the teacher's
    return dict(ce=ce, kl=DIVERGENCES[mode](ls, lt), agree=agree, tail_gap=lp_tail.exp() - Q)


def plain_chunk_loss(h, W, targets, w_ce, w_kd, teacher, T, mode):
    """(sum of w_ce CE + w_kd D, sums (4,) of ROW_STATS) over one chunk of rows h (c, C)."""
    st = plain_rows(h @ W.t(), targets, teacher, T, mode)  # (c, V) logits in the autocast dtype
    loss = (w_ce * st["ce"] + w_kd * st["kl"]).sum()
    return loss, torch.stack([st[n].detach().sum() for n in ROW_STATS]).double()


def kd_plain(h, W, targets, w_ce, w_kd, teacher, T, mode, chunk):
    """sum over rows of w_ce CE + w_kd D, the gradient by autograd; one chunk's logits exist at a time (each chunk
    is checkpointed, so its backward recomputes them). Returns (loss, sums (4,) of ROW_STATS)."""
    loss, sums = 0.0, torch.zeros(len(ROW_STATS), dtype=torch.float64, device=h.device)
    for s in range(0, len(h), chunk):
        rows = slice(s, s + chunk)
        t = None if teacher is None else tuple(x[rows] for x in teacher)
        part, st = checkpoint(plain_chunk_loss, h[rows], W, targets[rows], w_ce[rows], w_kd[rows], t, T, mode,
                              use_reentrant=False)
        loss = loss + part
        sums += st
    return loss.float(), sums


# -----------------------------------------------------------------------------
# The fused path: the gradient of the logits formed in the forward


def kd_rows(u, targets, ids, lq, Q, T, mode, w_ce, w_kd, work):
    """Per-row ROW_STATS from student logits u (r, V) fp32 (overwritten); with w_ce/w_kd (r,) also
    G = d(sum w_ce CE + w_kd KL)/du (r, V) in u's buffer. `work`: a second (r, V) fp32 buffer, for e_T.
    With p the student and q the teacher at temperature T, and P, Q their masses outside the k cached ids:
      KL_{k+1} = sum_K q (log q - log p) + Q (log Q - log P)
      dKL/du_j = (p_j - q_j) / T on the k ids,  p_j (1 - Q/P) / T elsewhere (the tail bucket shared in proportion)
    renorm: gradient (p~_j - q~_j) / T on the ids, 0 elsewhere. CE at T=1: gradient p_1 - onehot(target).
    One exp per element (e = e_T^2 at T=2) and about eight passes over the row:
      p_1 = e / s_1,  p_T = e_T / s_T  (s = the row sums),  log p_T(j) = (u_j - max) / T - log s_T.
    """
    m, top1 = u.max(-1)  # (r,) row max and the student's top-1 id, in one pass
    u_t = u.gather(1, targets[:, None])[:, 0]  # (r,) logit of the real next token
    uK = None if ids is None else u.gather(1, ids)  # (r, k) logits on the teacher's ids
    u.sub_(m[:, None])  # u - max <= 0
    # exp inputs are clamped at EXP_FLOOR (cache_teacher.py says why)
    eT = None
    if ids is not None and T == 2.0:  # one exp: e_T = exp((u - max) / 2), and e = e_T^2 is a multiply
        eT = torch.mul(u, 0.5, out=work).clamp_min_(EXP_FLOOR).exp_()  # (r, V), in `work`
        e = torch.mul(eT, eT, out=u)  # (r, V) e = exp(u - max), in u's buffer
    else:
        if ids is not None and T != 1.0:
            eT = torch.div(u, T).clamp_min_(EXP_FLOOR).exp_()  # (r, V) a general temperature needs its own exp
        e = u.clamp_min_(EXP_FLOOR).exp_()  # (r, V) e = exp(u - max), in u's buffer
    s1 = e.sum(-1)
    ce = m + s1.log() - u_t  # logsumexp(u) - u_t
    if ids is None:  # no teacher (plain language-model training): CE only
        nan = torch.full_like(ce, float("nan"))
        stats = dict(ce=ce, kl=torch.zeros_like(ce), agree=nan, tail_gap=nan)
        if w_ce is None:
            return stats, None
        G = e.mul_((w_ce / s1)[:, None])  # w_ce p_1 ...
        return stats, G.scatter_add_(1, targets[:, None], -w_ce[:, None])  # ... minus w_ce at the target
    t_is_1 = eT is None  # at T = 1 the student's p_T is p_1: e_T and e are one buffer, and G is built in it
    if t_is_1:
        eT = e
    # the student's tail mass as a sum over the ids outside the top-k, not as 1 - sum (no cancellation)
    eTK = eT.gather(1, ids)  # (r, k)
    if t_is_1:
        tail_sum = eT.scatter(1, ids, 0.0).sum(-1)  # (r,) on a copy: e is needed whole below
    else:
        tail_sum = eT.scatter_(1, ids, 0.0).sum(-1)  # (r,) in place, then the k entries restored
        eT.scatter_(1, ids, eTK)
    sT = tail_sum + eTK.sum(-1)  # (r,) the row sum of e_T
    log_sT = sT.log()
    lpK = (uK - m[:, None]) / T - log_sT[:, None]  # (r, k) student log p_T on the teacher's ids
    logP = tail_sum.log() - log_sT  # (r,) log P_T
    agree = (top1 == ids[:, 0]).float()  # the student's top-1 is the teacher's
    qK = lq.exp()  # (r, k) teacher q_T on its ids
    if mode == "tail":
        kl = (qK * (lq - lpK)).sum(-1) + torch.xlogy(Q, Q) - Q * logP  # k terms + the tail bucket
    else:  # renorm
        lq_n = lq - torch.logsumexp(lq, -1, keepdim=True)
        lp_n = lpK - torch.logsumexp(lpK, -1, keepdim=True)
        kl = (lq_n.exp() * (lq_n - lp_n)).sum(-1)
    stats = dict(ce=ce, kl=kl, agree=agree, tail_gap=logP.exp() - Q)
    if w_ce is None:
        return stats, None
    # G = w_ce p_1 + the KD part. The KD part is tail_coef e_T on every id (for tail: p_T,j (1 - Q/P) / T, written
    # as a multiple of e_T), plus k sparse corrections on the ids; renorm has no tail part
    if mode == "tail":
        q_over_p = Q * torch.exp(-logP)  # (r,) Q / P
        tail_coef = w_kd * (1.0 - q_over_p) / (T * sT)  # (r,)
        on_ids = (w_kd / T)[:, None] * (eTK / sT[:, None] * q_over_p[:, None] - qK)  # (r, k): to (p_T,j - q_j) / T
    else:
        tail_coef = torch.zeros_like(s1)
        on_ids = (w_kd / T)[:, None] * (lp_n.exp() - lq_n.exp())  # (r, k)
    # two passes over the row: at T = 1 one multiply of e by (w_ce / s1 + tail_coef), else e and e_T apart
    coef = w_ce / s1 + tail_coef if t_is_1 else w_ce / s1  # (r,)
    G = e.mul_(coef[:, None])
    if not t_is_1 and mode == "tail":
        G.addcmul_(eT, tail_coef[:, None])
    G.scatter_add_(1, ids, on_ids)
    G.scatter_add_(1, targets[:, None], -w_ce[:, None])  # CE: minus w_ce at the target
    return stats, G


def kd_chunks(h, W, targets, teacher, T, mode, chunk, w_ce=None, w_kd=None):
    """The fused path's chunk loop: per `chunk` rows the logits z = h W^T (c, V), their statistics in fp32 row blocks
    that stay in a CPU's cache and, with weights, G written into z. Yields (row slice, per-row stats, z)."""
    block = chunk if h.is_cuda else max(1, BLOCK_ELEMENTS // W.shape[0])  # rows worked out together
    bufs = None
    for s in range(0, h.shape[0], chunk):
        z = h[s:s + chunk] @ W.t()  # (c, V) logits in the autocast dtype
        parts = []
        for b in range(0, len(z), block):
            rows = slice(s + b, s + min(b + block, len(z)))  # rows of h
            zb = z[b:b + block]
            r = len(zb)
            # u (r, V) fp32: z itself when z is fp32 (kd_rows overwrites it), else a copy into a buffer reused by
            # every block, as is e_T's: fresh multi-MB tensors per block would cost page faults on a CPU
            if bufs is None:
                bufs = torch.empty(1 if zb.dtype == torch.float32 else 2, min(block, len(z)), z.shape[1],
                                   device=z.device)
            u = zb if zb.dtype == torch.float32 else bufs[1, :r].copy_(zb)
            ids, lq, Q = (None, None, None) if teacher is None else (t[rows] for t in teacher)
            st, G = kd_rows(u, targets[rows], ids, lq, Q, T, mode, None if w_ce is None else w_ce[rows],
                            None if w_kd is None else w_kd[rows], work=bufs[0, :r])
            if G is not None and G.data_ptr() != zb.data_ptr():
                zb.copy_(G)  # the gradient of the logits, back in z's dtype
            parts.append(st)
        yield slice(s, s + len(z)), {n: torch.cat([p[n] for p in parts]) for n in parts[0]}, z


class ChunkedKDLoss(torch.autograd.Function):
    """sum over rows of w_ce CE + w_kd KL, the lm_head applied `chunk` rows at a time, the gradient in h and W formed
    chunk by chunk in the forward (no (R, V) tensor is kept for the backward). Returns (loss, sums (4,))."""

    @staticmethod
    def forward(ctx, h, W, targets, w_ce, w_kd, teacher, T, mode, chunk):
        # h (R, C), W (V, C); targets (R,); w_ce, w_kd (R,) fp32; teacher None or (ids (R, k), lq (R, k), Q (R,))
        dev = h.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else W.dtype
        grad_h, grad_W = torch.empty_like(h), None
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        sums = torch.zeros(len(ROW_STATS), dtype=torch.float64, device=h.device)
        with torch.autocast(dev, enabled=False):
            # the matmuls run in the autocast dtype, like autograd's h @ W.t() would, with the (V, C) head cast once
            # per call (autocast would cast it again for every chunk and matmul: a pass over 78M weights each time)
            hc, Wc = h.to(dt), W.to(dt)
            for sl, st, G in kd_chunks(hc, Wc, targets, teacher, T, mode, chunk, w_ce, w_kd):
                total += (w_ce[sl] * st["ce"] + w_kd[sl] * st["kl"]).sum()
                sums += torch.stack([st[n].sum() for n in ROW_STATS]).double()
                grad_h[sl] = G @ Wc  # (c, C)
                gW = G.t() @ hc[sl]  # (V, C), accumulated in fp32
                grad_W = gW.float() if grad_W is None else grad_W.add_(gW)
        ctx.save_for_backward(grad_h, grad_W)
        ctx.mark_non_differentiable(sums)
        return total.float(), sums

    @staticmethod
    def backward(ctx, grad_total, _):
        grad_h, grad_W = ctx.saved_tensors
        # in place: a (V, C) fp32 gradient is 0.6 GB at Qwen3's vocabulary, and nothing else reads these
        no_grad = [None] * (len(ctx.needs_input_grad) - 2)  # targets, weights, teacher, T, mode, chunk
        return grad_h.mul_(grad_total), grad_W.mul_(grad_total), *no_grad


# -----------------------------------------------------------------------------
# The entry points train.py uses


def kd_loss(h, W, targets, w_ce, w_kd, teacher, T, mode, chunk, impl="fused"):
    """sum over rows of w_ce CE + w_kd D(mode), by the fused path or the plain one. h (R, C) hidden states of the
    trainable rows, W (V, C) the lm_head. Returns (loss, sums (4,) float64 of ROW_STATS over the rows)."""
    if impl == "fused":
        return ChunkedKDLoss.apply(h, W, targets, w_ce, w_kd, teacher, T, mode, chunk)
    return kd_plain(h, W, targets, w_ce, w_kd, teacher, T, mode, chunk)


def kd_stats(h, W, targets, teacher, T, mode, chunk, impl="fused"):
    """Yields (row slice, per-row stats) chunk by chunk, without gradients (the evaluation)."""
    if impl == "fused":
        for sl, st, _ in kd_chunks(h, W, targets, teacher, T, mode, chunk):
            yield sl, st
        return
    for s in range(0, len(h), chunk):
        rows = slice(s, s + chunk)
        t = None if teacher is None else tuple(x[rows] for x in teacher)
        yield slice(s, s + len(h[rows])), plain_rows(h[rows] @ W.t(), targets[rows], t, T, mode)


def check_impl(mode, impl):
    """The implementation to use: `impl`, or fused where the mode has one. A ValueError for fused without one."""
    impl = impl or ("fused" if mode in FUSED else "plain")
    if impl == "fused" and mode not in FUSED:
        raise ValueError(f"--kd_impl fused: --kd_mode {mode} has no fused version (use --kd_impl plain)")
    return impl
