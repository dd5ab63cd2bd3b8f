"""Lane-level numpy emulation of the tensor-core temporal attention kernels (fwd and bwd).

A development check, not a test of the kernels: it re-implements, lane by lane, the loops of
temporal_attn_fwd.cu / temporal_attn_bwd.cu with the same fragment index formulas (mma.sync
m16n8k16 layouts as in the PTX ISA and CUTLASS's SM80_16x8x16 traits), 16-bit rounding of
the packed P and dS operands, masks, causal tile bounds and online softmax, and compares one
(b, n, h) sequence against exact float64 attention and its autograd gradients. It was written
when no GPU was available to catch bookkeeping errors in the fragment mapping; keep it in
step with the kernels if their loops change. Run: python emulate_tc_attention.py (CPU, ~1 min).
"""
import math

import numpy as np
import torch

L = np.arange(32)
G, TQ = L // 4, L % 4


def rnd(x):  # bf16-ish rounding of values packed into 16-bit registers (use fp16 here)
    return np.asarray(x, np.float16).astype(np.float64)


def load_a(M, m0, k0):
    a = np.zeros((32, 4, 2))
    for j in range(2):
        a[:, 0, j] = M[m0 + G, k0 + 2 * TQ + j]
        a[:, 1, j] = M[m0 + G + 8, k0 + 2 * TQ + j]
        a[:, 2, j] = M[m0 + G, k0 + 2 * TQ + 8 + j]
        a[:, 3, j] = M[m0 + G + 8, k0 + 2 * TQ + 8 + j]
    return a


def load_b_rows_n(M, n0, k0):
    b = np.zeros((32, 2, 2))
    for j in range(2):
        b[:, 0, j] = M[n0 + G, k0 + 2 * TQ + j]
        b[:, 1, j] = M[n0 + G, k0 + 2 * TQ + 8 + j]
    return b


def load_b_rows_k(M, k0, n0):
    b = np.zeros((32, 2, 2))
    for j in range(2):
        b[:, 0, j] = M[k0 + 2 * TQ + j, n0 + G]
        b[:, 1, j] = M[k0 + 2 * TQ + 8 + j, n0 + G]
    return b


def mma(d, a, b):
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for j in range(2):
        A[G, 2 * TQ + j] = a[:, 0, j]
        A[G + 8, 2 * TQ + j] = a[:, 1, j]
        A[G, 2 * TQ + 8 + j] = a[:, 2, j]
        A[G + 8, 2 * TQ + 8 + j] = a[:, 3, j]
        B[2 * TQ + j, G] = b[:, 0, j]
        B[2 * TQ + 8 + j, G] = b[:, 1, j]
    C = A @ B
    for j in range(2):
        d[:, j] += C[G, 2 * TQ + j]
        d[:, 2 + j] += C[G + 8, 2 * TQ + j]


def c_to_a(c):
    a = np.zeros((32, 4, 2))
    a[:, 0] = rnd(c[0][:, 0:2])
    a[:, 1] = rnd(c[0][:, 2:4])
    a[:, 2] = rnd(c[1][:, 0:2])
    a[:, 3] = rnd(c[1][:, 2:4])
    return a


def shfl_xor(x, m):
    return x[L ^ m]


def tiles(x, F, Fp, dh, ldk):
    T = np.zeros((Fp, ldk))
    T[:F, :dh] = x
    return T


def fwd_token(q, k, v, allow_key, causal, scale):
    """q, k, v: (F, Dh) of one (b, n, h). Returns out (F, Dh), lse (F,)."""
    F, dh = q.shape
    Fp = (F + 15) // 16 * 16
    dhk = (dh + 15) // 16 * 16
    ld = dhk + 8
    Qs, Ks, Vs = (tiles(rnd(t), F, Fp, dh, ld) for t in (q, k, v))
    kallow = np.zeros(Fp, bool)
    kallow[:F] = allow_key
    QT = Fp // 16
    out = np.zeros((F, dh))
    lse = np.zeros(F)
    sl2 = scale * 1.4426950408889634
    for qt in range(QT):
        rows = [qt * 16 + G, qt * 16 + G + 8]
        qa = [load_a(Qs, qt * 16, ks * 16) for ks in range(dhk // 16)]
        o = np.zeros((dh // 8, 32, 4))
        m = [np.full(32, -np.inf), np.full(32, -np.inf)]
        l = [np.zeros(32), np.zeros(32)]
        for kt in range(qt + 1 if causal else QT):
            s = [np.zeros((32, 4)), np.zeros((32, 4))]
            for nt in range(2):
                for ks in range(dhk // 16):
                    mma(s[nt], qa[ks], load_b_rows_n(Ks, kt * 16 + nt * 8, ks * 16))
            mx = [np.full(32, -np.inf), np.full(32, -np.inf)]
            for nt in range(2):
                for e in range(4):
                    row = rows[e // 2]
                    col = kt * 16 + nt * 8 + 2 * TQ + (e & 1)
                    ok = kallow[col] & ((not causal) | (col <= row))
                    s[nt][:, e] = np.where(ok, s[nt][:, e] * sl2, -np.inf)
                    mx[e // 2] = np.maximum(mx[e // 2], s[nt][:, e])
            alpha, muse = [None, None], [None, None]
            for i in range(2):
                mx[i] = np.maximum(mx[i], shfl_xor(mx[i], 1))
                mx[i] = np.maximum(mx[i], shfl_xor(mx[i], 2))
                mnew = np.maximum(m[i], mx[i])
                muse[i] = np.where(mnew == -np.inf, 0.0, mnew)
                with np.errstate(invalid="ignore"):
                    alpha[i] = np.exp2(m[i] - muse[i])
                m[i] = mnew
                l[i] = l[i] * alpha[i]
            for nt in range(2):
                for e in range(4):
                    s[nt][:, e] = np.exp2(s[nt][:, e] - muse[e // 2])
                    l[e // 2] = l[e // 2] + s[nt][:, e]
            for dn in range(dh // 8):
                o[dn][:, 0:2] *= alpha[0][:, None]
                o[dn][:, 2:4] *= alpha[1][:, None]
            pa = c_to_a(s)
            for dn in range(dh // 8):
                mma(o[dn], pa, load_b_rows_k(Vs, kt * 16, dn * 8))
        for i in range(2):
            l[i] = l[i] + shfl_xor(l[i], 1)
            l[i] = l[i] + shfl_xor(l[i], 2)
            for lane in range(32):
                row = rows[i][lane]
                if row >= F:
                    continue
                inv = 1 / l[i][lane] if l[i][lane] > 0 else 0.0
                for dn in range(dh // 8):
                    d = dn * 8 + 2 * TQ[lane]
                    out[row, d : d + 2] = o[dn][lane, 2 * i : 2 * i + 2] * inv
                if TQ[lane] == 0:
                    lse[row] = (m[i][lane] + math.log2(l[i][lane])) * math.log(2) if l[i][lane] > 0 else -np.inf
    return out, lse


def bwd_token(q, k, v, do, o, lse, allow_key, causal, scale):
    F, dh = q.shape
    Fp = (F + 15) // 16 * 16
    dhk = (dh + 15) // 16 * 16
    ld = dhk + 8
    Qs, Ks, Vs, dOs = (tiles(rnd(t), F, Fp, dh, ld) for t in (q, k, v, do))
    kallow = np.zeros(Fp, bool)
    kallow[:F] = allow_key
    lse2 = np.full(Fp, -np.inf)
    lse2[:F] = lse * 1.4426950408889634
    dsum = np.zeros(Fp)
    dsum[:F] = (rnd(do) * rnd(o)).sum(-1)
    QT = Fp // 16
    sl2 = scale * 1.4426950408889634
    dq = np.zeros((F, dh))
    dk = np.zeros((F, dh))
    dv = np.zeros((F, dh))
    for kt in range(QT):
        keys = [kt * 16 + G, kt * 16 + G + 8]
        acc_k = np.zeros((dh // 8, 32, 4))
        acc_v = np.zeros((dh // 8, 32, 4))
        for qt in range(kt if causal else 0, QT):
            st = [np.zeros((32, 4)), np.zeros((32, 4))]
            dpt = [np.zeros((32, 4)), np.zeros((32, 4))]
            for ks in range(dhk // 16):
                ka, va = load_a(Ks, kt * 16, ks * 16), load_a(Vs, kt * 16, ks * 16)
                for nt in range(2):
                    mma(st[nt], ka, load_b_rows_n(Qs, qt * 16 + nt * 8, ks * 16))
                    mma(dpt[nt], va, load_b_rows_n(dOs, qt * 16 + nt * 8, ks * 16))
            for nt in range(2):
                for e in range(4):
                    key = keys[e // 2]
                    qi = qt * 16 + nt * 8 + 2 * TQ + (e & 1)
                    l2 = lse2[qi]
                    ok = (qi < F) & kallow[key] & ((not causal) | (key <= qi)) & (l2 != -np.inf)
                    with np.errstate(invalid="ignore", over="ignore"):
                        pr = np.where(ok, np.exp2(st[nt][:, e] * sl2 - l2), 0.0)
                    st[nt][:, e] = pr
                    dpt[nt][:, e] = pr * (dpt[nt][:, e] - dsum[qi])
            pa, dsa = c_to_a(st), c_to_a(dpt)
            for dn in range(dh // 8):
                mma(acc_v[dn], pa, load_b_rows_k(dOs, qt * 16, dn * 8))
                mma(acc_k[dn], dsa, load_b_rows_k(Qs, qt * 16, dn * 8))
        for i in range(2):
            for lane in range(32):
                key = keys[i][lane]
                if key >= F:
                    continue
                for dn in range(dh // 8):
                    d = dn * 8 + 2 * TQ[lane]
                    dk[key, d : d + 2] = acc_k[dn][lane, 2 * i : 2 * i + 2] * scale
                    dv[key, d : d + 2] = acc_v[dn][lane, 2 * i : 2 * i + 2]
    for qt in range(QT):
        rows = [qt * 16 + G, qt * 16 + G + 8]
        acc = np.zeros((dh // 8, 32, 4))
        for kt in range(qt + 1 if causal else QT):
            s = [np.zeros((32, 4)), np.zeros((32, 4))]
            dp = [np.zeros((32, 4)), np.zeros((32, 4))]
            for ks in range(dhk // 16):
                qa, doa = load_a(Qs, qt * 16, ks * 16), load_a(dOs, qt * 16, ks * 16)
                for nt in range(2):
                    mma(s[nt], qa, load_b_rows_n(Ks, kt * 16 + nt * 8, ks * 16))
                    mma(dp[nt], doa, load_b_rows_n(Vs, kt * 16 + nt * 8, ks * 16))
            for nt in range(2):
                for e in range(4):
                    row = rows[e // 2]
                    col = kt * 16 + nt * 8 + 2 * TQ + (e & 1)
                    l2 = lse2[row]
                    ok = (row < F) & kallow[col] & ((not causal) | (col <= row)) & (l2 != -np.inf)
                    with np.errstate(invalid="ignore", over="ignore"):
                        pr = np.where(ok, np.exp2(s[nt][:, e] * sl2 - l2), 0.0)
                    dp[nt][:, e] = pr * (dp[nt][:, e] - dsum[row])
            dsa = c_to_a(dp)
            for dn in range(dh // 8):
                mma(acc[dn], dsa, load_b_rows_k(Ks, kt * 16, dn * 8))
        for i in range(2):
            for lane in range(32):
                row = rows[i][lane]
                if row >= F:
                    continue
                for dn in range(dh // 8):
                    d = dn * 8 + 2 * TQ[lane]
                    dq[row, d : d + 2] = acc[dn][lane, 2 * i : 2 * i + 2] * scale
    return dq, dk, dv


def check(F, dh, causal, mask_kind, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(F, dh, generator=g, dtype=torch.float64) for _ in range(4))
    q, k, v, do = (t.half().double() for t in (q, k, v, do))
    allow = np.ones(F, bool)
    if mask_kind == "random":
        allow = (torch.rand(F, generator=g) < 0.7).numpy()
    elif mask_kind == "empty":
        allow[:] = False
    scale = 1 / math.sqrt(dh)
    # exact
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    s = qq @ kk.T * scale
    allowed = torch.tensor(allow)[None, :].expand(F, F).clone()
    if causal:
        allowed &= torch.ones(F, F, dtype=torch.bool).tril()
    row_any = allowed.any(-1, keepdim=True)
    s = torch.where(row_any, s.masked_fill(~allowed, -math.inf), torch.zeros_like(s))
    p = torch.softmax(s, -1) * row_any
    o_ex = p @ vv
    lse_ex = torch.logsumexp(s, -1).masked_fill(~row_any[:, 0], -math.inf).detach()
    o_ex.backward(do)
    out, lse = fwd_token(q.numpy(), k.numpy(), v.numpy(), allow, causal, scale)
    e_o = np.abs(out - o_ex.detach().numpy()).max()
    fin = np.isfinite(lse_ex.numpy())
    assert (np.isfinite(lse) == fin).all()
    e_l = np.abs(lse[fin] - lse_ex.numpy()[fin]).max() if fin.any() else 0
    dq, dk, dv = bwd_token(q.numpy(), k.numpy(), v.numpy(), do.numpy(), out, lse, allow, causal, scale)
    errs = [np.abs(a - b.numpy()).max() for a, b in zip((dq, dk, dv), (qq.grad, kk.grad, vv.grad))]
    mags = [max(1, np.abs(b.numpy()).max()) for b in (qq.grad, kk.grad, vv.grad)]
    ok = e_o < 1e-2 and e_l < 1e-6 and all(e < 2e-2 * m for e, m in zip(errs, mags))
    print(f"F={F:3d} Dh={dh:3d} causal={causal!s:5} mask={mask_kind:6} out {e_o:.1e} lse {e_l:.1e} "
          f"dq {errs[0]:.1e} dk {errs[1]:.1e} dv {errs[2]:.1e} {'OK' if ok else 'FAIL'}")
    return ok


if __name__ == "__main__":
    allok = True
    for F, dh in [(16, 64), (5, 72), (17, 72), (33, 128), (48, 64)]:
        for causal in (False, True):
            for mk in ("none", "random", "empty"):
                allok &= check(F, dh, causal, mk, seed=F * 7 + dh + causal)
    print("ALL OK" if allok else "SOME FAILED")
