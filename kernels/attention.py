"""Causal grouped-query attention over a KV cache, with an optional sliding window, in two forms of the
same computation: `attention_decode` for one token or a few (the decoder's FEW_QUERIES / FEW_SCORES) and
`attention_prefill` for more, on gemm.py's register tiles (docs/performance.md measures both).
"""
import numpy as np
from numba import prange

from .dtypes import to_float32, widen
from .exp import expf
from .isa import ISA
from .jit import pjit

if ISA != "generic":
    from .gemm import LANES, TILE_TOKENS, by_k, tile_floats


@pjit
def attention_decode(out, q, k_cache, v_cache, start, window, scale):
    # out, q: [T, Hq, hd] float32; k_cache, v_cache: [Hkv, capacity, hd] float32 or bf16/fp16 bits
    """For the query of token t at position p = start + t, in head h (kv head g = h // (Hq/Hkv)):

        s_j = scale * q[t,h] . k[g,j]       for lo <= j <= p,  lo = max(0, p - window + 1)
        out[t,h] = sum_j softmax(s)_j v[g,j]                   (window <= 0: lo = 0)

    Per (kv head, token) pair, three passes over the keys (scores, softmax, sums of values) serve the query
    heads sharing that kv head, each key and value row read once for them all. Storing the scores (T x Hq x L
    floats) lets the exponentials vectorise (exp.py's expf), unlike FlashAttention's "online softmax"."""
    (T, Hq, hd), Hkv = q.shape, k_cache.shape[0]
    group = Hq // Hkv  # query heads sharing one kv head
    scores = np.empty((Hkv * T, group, start + T), np.float32)
    for gt in prange(Hkv * T):  # decoding (T = 1) splits over kv heads
        g, t = gt // T, gt % T
        p = start + t
        lo = max(0, p - window + 1) if window > 0 else 0
        n = p + 1 - lo  # keys lo..p
        s, queries, acc = scores[gt], q[t, g * group:(g + 1) * group], out[t, g * group:(g + 1) * group]
        for j in range(n):
            key = k_cache[g, lo + j]
            for h in range(group):
                dot = np.float32(0.0)
                for d in range(hd):  # vectorises (fastmath reassociates the sum)
                    dot += queries[h, d] * widen(key[d])
                s[h, j] = dot * scale
        for h in range(group):
            m = s[h, :n].max()
            for j in range(n):  # expf vectorises
                s[h, j] = expf(s[h, j] - m)
            s[h, :n] /= s[h, :n].sum()
        acc[:] = 0.0
        for j in range(n):
            value = v_cache[g, lo + j]
            for h in range(group):
                for d in range(hd):
                    acc[h, d] += s[h, j] * widen(value[d])


@pjit
def attention_prefill(out, q, k_cache, v_cache, start, window, scale):
    """The same as `attention_decode`, for more tokens: per kv head g, on gemm.py's register tiles,
        S = scale Q_g K_g^T   (masked: j <= p, and j > p - window with a window)
        out = softmax_rows(S) V_g
    Row r of Q_g is token r // G's query in head g G + r % G (G = Hq / Hkv). K_g is laid out in panels of
    LANES keys (kt[c][d LANES + i] = k[LANES c + i, d]), V_g in panels of LANES dims (vt[c][j LANES + i] =
    v[j, LANES c + i]), hd padded with zeros; a tile of TILE_TOKENS rows takes its scores from the key
    panels up to its last row's position (tile_floats), their softmax, then its sums of values."""
    (T, Hq, hd), Hkv = q.shape, k_cache.shape[0]
    G, L, R = Hq // Hkv, start + T, T * Hq // Hkv
    D, panels, tiles = -(-hd // LANES) * LANES, -(-L // LANES), -(-R // TILE_TOKENS)
    kt = np.empty((Hkv, panels, D * LANES), np.float32)
    vt = np.zeros((Hkv, D // LANES, panels * LANES * LANES), np.float32)
    queries = np.zeros((Hkv, tiles * TILE_TOKENS, D), np.float32)
    for gc in prange(Hkv * panels):  # key panel c of kv head g, transposed in registers (by_k)
        g, c = gc // panels, gc % panels
        block = np.zeros((LANES, D), np.float32)
        for i in range(min(LANES, L - LANES * c)):
            for d in range(hd):
                block[i, d] = widen(k_cache[g, LANES * c + i, d])
                vt[g, d // LANES, (LANES * c + i) * LANES + d % LANES] = widen(v_cache[g, LANES * c + i, d])
        by_k(kt[g, c].view(np.uint32), block.reshape(-1).view(np.uint32), D)
    for gr in prange(Hkv * R):  # row r of Q_g, scaled
        g, r = gr // R, gr % R
        queries[g, r, :hd] = q[r // G, g * G + r % G] * np.float32(scale)
    for item in prange(Hkv * tiles):  # tiles 0, n - 1, 1, n - 2, ...: the causal work evenly between threads
        g, b = item % Hkv, item // Hkv
        r0 = TILE_TOKENS * (b // 2 if b % 2 == 0 else tiles - 1 - b // 2)
        last = min(r0 + TILE_TOKENS, R) - 1  # the tile's last row, whose keys are the most
        lo = max(0, start + r0 // G - window + 1) if window > 0 else 0  # the first row's first key
        c0, c1 = lo // LANES, (start + last // G) // LANES + 1  # the key panels the tile sees
        scores = np.empty((TILE_TOKENS, (c1 - c0) * LANES), np.float32)
        result = np.empty((TILE_TOKENS, LANES), np.float32)
        for c in range(c0, c1):
            tile_floats(result, kt[g, c], queries[g], r0)
            scores[:, (c - c0) * LANES:(c - c0 + 1) * LANES] = result
        for i in range(TILE_TOKENS):  # each row's softmax over its keys first..p (rows past R: the last's)
            p = start + min(r0 + i, last) // G
            first, row = max(0, p - window + 1) if window > 0 else 0, scores[i]
            m = row[first - LANES * c0:p + 1 - LANES * c0].max()
            for j in range(row.shape[0]):  # expf vectorises; keys outside first..p weigh 0
                row[j] = expf(row[j] - m) if first <= LANES * c0 + j <= p else np.float32(0.0)
            row *= np.float32(1.0) / row.sum()
        for c in range(D // LANES):
            tile_floats(result, vt[g, c, LANES * LANES * c0:], scores, 0)
            for r in range(r0, last + 1):  # (the last panel's dims past hd are padding)
                out[r // G, g * G + r % G, LANES * c:LANES * c + LANES] = result[r - r0, :hd - LANES * c]


if ISA == "generic":  # no vector layer for the tiles: the decode form serves every T
    attention_prefill = attention_decode  # noqa: F811


def attention_reference(q, k_cache, v_cache, start, window, scale):  # -> [T, Hq, hd] float64
    (T, Hq, _), Hkv = q.shape, k_cache.shape[0]
    L = start + T
    k, v = (np.repeat(to_float32(c[:, :L]).astype(np.float64), Hq // Hkv, axis=0) for c in (k_cache, v_cache))
    scores = scale * np.einsum("thd,hjd->htj", q.astype(np.float64), k)  # [Hq, T, L]
    pos, j = start + np.arange(T)[:, None], np.arange(L)[None, :]
    visible = (j <= pos) & (j > pos - window if window > 0 else True)
    scores = np.where(visible[None], scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("htj,hjd->thd", weights, v)
