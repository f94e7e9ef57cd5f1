"""Speculative decoding: draft a few tokens cheaply, verify them in one pass, keep what the model agrees with.

    each round, with t the last chosen token (not yet run through the model):
        d_1 .. d_k = drafter.draft(context + [t], k)     a guess at what follows, made greedily
        logits     = model([t, d_1, ..., d_k])           one pass over k + 1 positions: each weight is
                                                         read once for all of them
        for j = 0 .. k:
            token_j = sampler.next(logits_j)             the choice plain decoding makes there
            stop at the first token_j != d_(j+1)          (token_j is then the next round's t)
        forget the rejected drafts                       Sequence.truncate; DeltaNet: Cache.keep_states

It is exact. The drafts are greedy, so the draft distribution q puts all its mass on d, and the
rejection rule of speculative sampling (Leviathan et al. 2023) -- accept d with probability
min(1, p(d) / q(d)) = p(d), else draw from (p - q)+ renormalised, which is p without d -- gives the same
tokens as drawing token_j from p and accepting d iff token_j = d. Every position draws one coin from the
sampler's generator, in order, as plain decoding does: with a seed the output is plain sampling's token for
token, greedy output plain greedy's, up to the rounding of a (k + 1)-row pass against a 1-row one.
Penalties, top-k/p, min-p, stop strings, end-of-turn ids and max_new_tokens act per position as without it.

The loop is text/generation.py's decode loop; without a drafter it drafts nothing and each round is one
plain decode step. Drafters here (`draft(context, k)`, and `observe(start, hidden)`: the model's final
normed states at positions start.., which only the MTP head reads):
    NgramDrafter      prompt lookup: what followed the latest earlier occurrence of the context's last n-gram
    SequenceDrafter   a smaller model with the same tokenizer, on its own cache
    MtpDrafter        the checkpoint's own multi-token-prediction head (network/mtp.py), chained for k > 1
"""
from __future__ import annotations

import numpy as np

DRAFT_TOKENS = 4  # the most tokens a round drafts unless told (`--speculative-tokens`)
PAUSE_ROUNDS = 16  # the longest a drafter that keeps missing sits out, in rounds


class DraftLength:
    """How many tokens to draft next: the most allowed while drafts are taken whole, one more than the
    accepted ones when they are not, twice as many again after a round taken whole. A pass over k + 1 rows
    costs more than a decode step (1.2-2.5x at k = 3 today, bench/speculative.py), so a round that keeps
    fewer than half its drafts is a miss: after the m-th miss (less one for each round taken whole),
    drafting pauses for 2^m - 1 rounds (at most PAUSE_ROUNDS), and a drafter that rarely helps (a plain
    question, where a lucky round must not restart it at full length) costs a few percent at most."""

    def __init__(self, most: int):
        self.most, self.k, self.misses, self.pause = most, most, 0, 0

    def next(self) -> int:
        if self.pause:
            self.pause -= 1
            return 0
        return self.k

    def update(self, drafted: int, accepted: int):
        if not drafted:
            return
        if accepted == drafted:  # one round taken whole earns back one miss and twice the drafts
            self.misses = max(0, self.misses - 1)
            self.k = min(self.most, 2 * self.k)
        else:
            self.k = accepted + 1
        if 2 * accepted < drafted:
            self.misses += 1
            self.pause = min(2 ** self.misses - 1, PAUSE_ROUNDS)


def settle(sequence, length: DraftLength, tally, drafted: int, accepted: int, start: int):
    """After a verify pass that ran the last token and `drafted` drafts from position `start`, of which the
    first `accepted` were kept: count them in `tally` (its .drafted and .accepted: the stats line's, a
    server job's), adapt the draft length, and forget the rejected drafts (Sequence.truncate)."""
    tally.drafted, tally.accepted = tally.drafted + drafted, tally.accepted + accepted
    length.update(drafted, accepted)
    sequence.truncate(start + 1 + accepted)


class NgramDrafter:
    """Prompt lookup: find the longest n-gram (n from `longest` down to `shortest`) that ends the context
    and occurred before in it; propose the tokens that followed its latest earlier occurrence. No model;
    a few vector compares per round. It shines where the answer repeats the prompt (edits, quotes, RAG)."""

    def __init__(self, longest: int = 4, shortest: int = 2):
        self.longest, self.shortest = longest, shortest

    def draft(self, context: list[int], k: int) -> list[int]:
        if not k:
            return []
        ids = np.asarray(context)
        for n in range(min(self.longest, len(ids) - 1), self.shortest - 1, -1):
            hits = np.ones(len(ids) - n, dtype=bool)  # hits[i]: ids[i:i+n] is the last n-gram, i + n < len
            for j in range(n):
                hits &= ids[j:len(ids) - n + j] == ids[len(ids) - n + j]
            found = np.flatnonzero(hits)
            if found.size:
                return ids[found[-1] + n:found[-1] + n + k].tolist()
        return []

    def observe(self, start: int, hidden: np.ndarray):
        pass


class SequenceDrafter:
    """A smaller model with the same tokenizer drafts greedily on its own sequence (draft model). Its cache
    keeps its states since the round began, so it rewinds past its own rejected drafts even when hybrid."""

    def __init__(self, sequence, vocab_size: int):
        self.sequence, self.vocab_size = sequence, vocab_size  # the verifying model's vocabulary

    def draft(self, context: list[int], k: int) -> list[int]:
        if not k or len(context) + k > self.sequence.cache.context_length:
            return []
        logits = self.sequence.reset_to(context)
        self.sequence.cache.keep_states()
        drafts: list[int] = []
        while (token := int(np.argmax(logits))) < self.vocab_size:  # past it: a token the model cannot verify
            drafts.append(token)
            if len(drafts) == k:
                break
            logits = self.sequence.extend([token])
        return drafts

    def observe(self, start: int, hidden: np.ndarray):
        pass


class MtpDrafter:
    """The checkpoint's multi-token-prediction head (network/mtp.py) on its own KV cache: at position i it
    reads the model's final state h_i and the token at i + 1 and predicts the one after. The model's states
    wait in `pending` until the token after the last of them is known (the one the next round starts with);
    then the head runs over them, and, for k > 1, on its own output with its own draft, a position further
    each time."""

    def __init__(self, head, cache):
        self.head, self.cache = head, cache
        self.pending: tuple[int, np.ndarray] | None = None  # (first position, final states) not yet read

    def observe(self, start: int, hidden: np.ndarray):
        if self.pending is not None and self.pending[0] + len(self.pending[1]) == start:
            hidden = np.concatenate([self.pending[1], hidden])
            start = self.pending[0]
        self.pending = (start, hidden.copy())

    def draft(self, context: list[int], k: int) -> list[int]:
        start, hidden = self.pending
        self.pending = None
        if self.cache.rewind(start) < start:  # the head missed positions before (a reused prompt prefix)
            return []
        logits = self.head.extend(self.cache, hidden, np.asarray(context[start + 1:], np.int64))
        drafts = [int(np.argmax(logits))] if k else []
        while 0 < len(drafts) < k and self.cache.length < self.cache.context_length:
            logits = self.head.extend(self.cache, self.head.hidden[-1:], np.asarray(drafts[-1:], np.int64))
            drafts.append(int(np.argmax(logits)))
        return drafts
