"""Choosing the next token from the logits, with the semantics of Hugging Face transformers.

transformers applies, in this order (generation/utils.py, logits_process.py):

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> softmax -> multinomial draw

`apply_penalties` is the first step (plus the OpenAI API's frequency and presence penalties), `sample`
the rest. The random draw is a number `coin` in [0, 1) made by the caller's seeded NumPy generator (as in
llama2.c): Numba has its own generator that Python-side seeding does not reach, and a coin makes the
kernel a pure function, so the same seed gives the same tokens.

top-k, top-p and min-p each keep a *prefix* of the tokens sorted by decreasing probability, so
`sample` never sorts the whole vocabulary unless top-p really needs it: top-k is a partial
selection (a k-element heap), min-p is a threshold on exp(z - z_max), and top-p sorts only the
tokens that can be in the nucleus. Logits are assumed finite (fastmath assumes no inf or NaN).
"""
import math

import numpy as np

from .jit import jit


@jit
def apply_penalties(logits, seen_ids, counts, repetition_penalty, frequency_penalty, presence_penalty):
    # logits: [V] float32, in place; seen_ids: [S] int64, each id of the prompt or the output once;
    # counts: [V] int32, how many times each id was generated (0 for prompt-only ids)
    """For every seen token i, with c_i its count among the *generated* tokens:

        z_i = z_i / repetition_penalty   if z_i > 0   else   z_i * repetition_penalty
        z_i = z_i - frequency_penalty * c_i - presence_penalty * (c_i > 0)

    Repetition is CTRL's / transformers' (over prompt and output), frequency and presence the OpenAI API's
    (over the output only, as vLLM applies them: a token only the prompt holds is not pushed down)."""
    V = logits.shape[0]
    for i in seen_ids:
        if i < 0 or i >= V:  # an id the output layer cannot produce (as transformers, skip it)
            continue
        z = logits[i]
        # Dividing a negative logit would make the token *more* likely: multiply it instead.
        z = z / repetition_penalty if z > 0 else z * repetition_penalty
        logits[i] = z - (frequency_penalty * counts[i] + presence_penalty * (counts[i] > 0))


@jit
def sample(probs, order, logits, temperature, top_k, top_p, min_p, coin):
    # probs: [V] float32 scratch, order: [V] int64 scratch, logits: [V] float32 (read only)
    """temperature == 0: the first index of max(logits). Otherwise, with z = logits / temperature
    and p = softmax(z):

        top-k  keep z_i >= the k-th largest z (ties with it are kept too)      (top_k <= 0: off)
        top-p  keep i unless the mass of the kept tokens more probable than i
               (ties: of lower index) is already >= top_p                      (top_p >= 1: off)
        min-p  keep p_i >= min_p * max p                                      (min_p <= 0: off)

    each rule seeing the distribution renormalised over the survivors of the previous ones.
    On return probs holds the final distribution q (0 for removed tokens) and the result is the
    first token, in vocabulary order, with q_0 + ... + q_i > coin."""
    V = logits.shape[0]
    if temperature <= 0.0:
        return np.argmax(logits)
    # float32 like the logits: expf is twice as fast as exp, and it runs V times without top-k
    inv_t = np.float32(1.0 / temperature)

    # top-k: the k-th largest logit (temperature > 0 does not change the order). probs[:k] is
    # the heap's scratch space, holding the k largest logits; it is overwritten below.
    use_top_k = 0 < top_k < V
    kth = _kth_largest(logits, top_k, probs) if use_top_k else np.float32(0.0)  # unused without top-k
    lmax = probs[:top_k].max() if use_top_k else logits.max()

    # One pass over the vocabulary: e_i = exp(z_i - z_max) = p_i / max p, its total over the
    # top-k survivors (top-p's normaliser), and the ids that also pass min-p (e_i >= min_p)
    # collected into order[:m] in vocabulary order, with e_i in probs[i].
    min_e = min(min_p, 1.0)  # e <= 1, so min_p > 1 would remove even the most likely token
    Z, m = 0.0, 0
    for i in range(V):
        probs[i] = 0.0
        if use_top_k and logits[i] < kth:
            continue
        e = math.exp((logits[i] - lmax) * inv_t)
        Z += e
        if e >= min_e:
            probs[i] = e
            order[m] = i
            m += 1

    if top_p < 1.0:
        m = _top_p_prefix(probs, order, m, top_p * Z)

    # Renormalise over the survivors and walk the cumulative sum up to the coin.
    S = 0.0
    for j in range(m):
        S += probs[order[j]]
    inv_S, cum, chosen = 1.0 / S, 0.0, -1
    for j in range(m):
        i = order[j]
        q = probs[i] * inv_S
        probs[i] = q
        cum += q
        if chosen < 0 and cum > coin:
            chosen = i
    if chosen < 0:  # coin within rounding of 1: the last token that has any probability
        for j in range(m - 1, -1, -1):
            if probs[order[j]] > 0.0:
                return order[j]
    return chosen


@jit
def _top_p_prefix(e, order, m, target):
    """Cut order[:m] (ids in vocabulary order, weights e) to the nucleus, returned in vocabulary
    order: sorted by decreasing e, token j is kept while the weight before it is < target."""
    # Only tokens with e >= r can be in the nucleus once those alone weigh >= target (everything
    # else comes after them in the sort), so try ever lower r before sorting everything.
    r = 1e-2
    while r > 0.0:
        mass = 0.0
        for j in range(m):
            if e[order[j]] >= r:
                mass += e[order[j]]
        if mass >= target:
            break
        r = r * 1e-3 if r > 1e-12 else 0.0
    n = 0
    for j in range(m):
        i = order[j]
        if e[i] >= r:
            order[n] = i
            n += 1
        else:
            e[i] = 0.0
    # by decreasing e, the lower id first among equals: order[:n] is in vocabulary order, the sort stable
    order[:n] = order[:n][np.argsort(-e[order[:n]], kind="mergesort")]
    keep, before = n, 0.0
    for j in range(1, n):  # order[0] always stays (transformers' min_tokens_to_keep = 1)
        before += e[order[j - 1]]
        if before >= target:
            keep = j
            break
    e[order[keep:n]] = 0.0
    order[:keep].sort()  # back to vocabulary order for the draw
    return keep


@jit
def _kth_largest(x, k, heap):  # x: [V], heap: [>= k] scratch
    """The k-th largest value of x, counting repeated values (torch.topk(x, k).values[-1])."""
    # A min-heap of the k largest values seen so far: most values lose against its root in one
    # comparison, so this is one pass over x, not a sort.
    heap[:k] = x[:k]
    for root in range(k // 2 - 1, -1, -1):
        _sift_down_min(heap, root, k)
    smallest = heap[0]  # a local, so the hot loop keeps it in a register
    for i in range(k, x.shape[0]):
        if x[i] > smallest:
            heap[0] = x[i]
            _sift_down_min(heap, 0, k)
            smallest = heap[0]
    return smallest


@jit
def _sift_down_min(heap, root, n):
    while True:
        child = 2 * root + 1
        if child >= n:
            return
        if child + 1 < n and heap[child + 1] < heap[child]:
            child += 1
        if heap[child] >= heap[root]:
            return
        heap[root], heap[child] = heap[child], heap[root]
        root = child


# ---- float64 references, straight from the transformers warpers ----

def apply_penalties_reference(logits, seen_ids, counts, repetition_penalty, frequency_penalty,
                              presence_penalty):  # -> [V] f64
    z = logits.astype(np.float64)
    s, c = z[seen_ids], counts[seen_ids].astype(np.float64)
    z[seen_ids] = (np.where(s < 0, s * repetition_penalty, s / repetition_penalty)
                   - frequency_penalty * c - presence_penalty * (c > 0))
    return z


def sample_reference(logits, temperature, top_k, top_p, min_p):  # [V] -> [V] float64 distribution
    """The distribution `sample` draws from (temperature > 0)."""
    z = logits.astype(np.float64) / temperature
    V = z.shape[0]
    keep = np.ones(V, dtype=bool)

    def masked_softmax():
        e = np.where(keep, np.exp(z - z[keep].max()), 0.0)
        return e / e.sum()

    if 0 < top_k < V:  # TopKLogitsWarper: remove scores < topk(scores, k).values[-1]
        keep &= z >= np.sort(z)[-top_k]
    if top_p < 1.0:  # TopPLogitsWarper: ascending sort, remove cumsum <= 1 - top_p, keep the last
        p = masked_softmax()
        ascending = np.lexsort((-np.arange(V), p))  # among equal p the lower id comes later
        remove = np.cumsum(p[ascending]) <= 1.0 - top_p
        remove[-1] = False
        keep[ascending[remove]] = False
    if min_p > 0.0:  # MinPLogitsWarper: remove p < min_p * max p, keep the most likely
        p = masked_softmax()
        remove = p < min_p * p.max()
        remove[np.argmax(p)] = False
        keep &= ~remove
    return masked_softmax()


def draw_reference(q, coin):  # distribution [V], coin in [0, 1) -> token id
    """The first i with q_0 + ... + q_i > coin (the last token with q_i > 0 if none)."""
    cum = np.cumsum(q)
    i = int(np.searchsorted(cum, coin, side="right"))
    return i if i < q.shape[0] and q[i] > 0 else int(np.flatnonzero(q)[-1])
