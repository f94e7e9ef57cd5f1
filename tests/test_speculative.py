"""Speculative decoding (minqwen/text/speculative.py) gives plain decoding's tokens: greedy token for token,
sampling with a seed token for token (and in distribution: a chi-square test), for every drafter on every
family, with stop strings, max_new_tokens and the context's end; a rejected draft leaves a hybrid model's
DeltaNet state as if never seen."""
from __future__ import annotations

import numpy as np
import pytest
from test_mtp import FAMILIES as MTP_FAMILIES
from test_parity_dense import QWEN3
from test_parity_hybrid import QWEN3_5, QWEN3_5_MOE, QWEN3_NEXT
from test_parity_moe import QWEN2_MOE

import minqwen
from checkpoints import add_mtp_head, build_checkpoint, chat_checkpoint
from minqwen.errors import ConfigError, SamplingError
from minqwen.network.mtp import MtpHead
from minqwen.text.generation import GenerationOptions, Stats, stream_tokens
from minqwen.text.speculative import PAUSE_ROUNDS, DraftLength, NgramDrafter, SequenceDrafter

FAMILIES = {"qwen3": QWEN3, "qwen2_moe": QWEN2_MOE, "qwen3_5": QWEN3_5, "qwen3_5_moe": QWEN3_5_MOE,
            "qwen3_next": QWEN3_NEXT}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request, tmp_path_factory):
    folder = build_checkpoint(tmp_path_factory.mktemp(request.param), FAMILIES[request.param], "fp32")
    return minqwen.load(folder)


class Oracle:
    """Drafts what the answer says follows, with every `wrong`-th drafted token changed: each round then
    meets accepted drafts, a rejection at every place, and full acceptance."""

    def __init__(self, prompt: list[int], answer: list[int], vocab: int, wrong: int):
        self.prompt, self.answer, self.vocab, self.wrong, self.count = len(prompt), answer, vocab, wrong, 0

    def draft(self, context, k):
        done = len(context) - self.prompt  # answer tokens in the context
        drafts = list(self.answer[done:done + k])
        for j in range(len(drafts)):
            self.count += 1
            if self.count % self.wrong == 0:
                drafts[j] = (drafts[j] + 1) % self.vocab
        return drafts

    def observe(self, start, hidden):
        pass


def run(model, prompt, n, drafter, most=4, **options):
    stats = Stats()
    steps = stream_tokens(model.sequence(), prompt, n, GenerationOptions(**options), model.eos_token_ids,
                          None, stats, drafter=drafter, most_drafts=most)
    return [token for token, _ in steps], stats


def prompt_of(model, n, seed=0):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, n).tolist()


@pytest.mark.parametrize("wrong", [2, 3, 7, 10**9])
def test_greedy_speculation_is_plain_greedy(model, wrong):
    prompt = prompt_of(model, 23)
    plain = model.generate(prompt, 40)
    ours, stats = run(model, prompt, 40, Oracle(prompt, plain, model.config.vocab_size, wrong))
    assert ours == plain
    assert stats.drafted > 0 and (stats.accepted == stats.drafted) == (wrong > 100)


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9),
                                     dict(temperature=1.2, min_p=0.05, repetition_penalty=1.3,
                                          frequency_penalty=0.5, presence_penalty=0.3)])
def test_seeded_sampling_is_plain_sampling_token_for_token(model, options):
    """Each position draws the next coin of the sampler's generator, as plain sampling does."""
    prompt = prompt_of(model, 17, seed=1)
    for seed in range(3):
        plain = model.generate(prompt, 30, seed=seed, **options)
        ours, stats = run(model, prompt, 30, Oracle(prompt, plain, model.config.vocab_size, 4), most=3,
                          seed=seed, **options)
        assert ours == plain and stats.accepted > 0


def test_ngram_and_draft_model_drafters_give_plain_greedy(model, tmp_path):
    prompt = prompt_of(model, 12) * 3  # random weights rarely repeat themselves: see the SmolLM2 test too
    plain = model.generate(prompt, 30)
    assert model.generate(prompt, 30, speculative="ngram") == plain
    # a draft model with the same vocabulary: the model itself (every draft right), then another one
    other = minqwen.load(build_checkpoint(tmp_path, QWEN3, seed=5))
    for draft, everything in ((model, True), (other, False)):
        drafter = SequenceDrafter(draft.sequence(), model.config.vocab_size)
        ours, stats = run(model, prompt, 30, drafter, most=5)
        assert ours == plain and (stats.accepted == stats.drafted) == everything


@pytest.fixture(scope="module", params=sorted(MTP_FAMILIES))
def mtp_model(request, tmp_path_factory):
    folder = build_checkpoint(tmp_path_factory.mktemp(f"mtp-{request.param}"), MTP_FAMILIES[request.param])
    add_mtp_head(folder)
    return minqwen.load(folder)


class Recorder:
    """A drafter's drafts, with the context of each round."""

    def __init__(self, drafter):
        self.drafter, self.rounds = drafter, []

    def draft(self, context, k):
        drafts = self.drafter.draft(context, k)
        self.rounds.append((list(context), drafts))
        return drafts

    def observe(self, start, hidden):
        self.drafter.observe(start, hidden)


def test_the_mtp_drafter_gives_plain_output_and_drafts_what_the_head_predicts(mtp_model):
    """Greedy and seeded sampling stay plain decoding's; each round's first draft is what a fresh head,
    run over the whole context at once, predicts after it: the head's cache follows the model's accepted
    tokens through every round (the prompt's states, the accepted rows, its own rejected drafts undone)."""
    model, prompt = mtp_model, prompt_of(mtp_model, 14)
    plain = model.generate(prompt, 30)
    drafter = Recorder(model.drafter("mtp"))
    ours, stats = run(model, prompt, 30, drafter, most=3)
    assert ours == plain and stats.drafted > 0
    for context, drafts in drafter.rounds:
        if drafts:
            model.sequence().extend(context[:-1])
            head = MtpHead(model.config, model.weights)
            logits = head.extend(head.cache(256), model.decoder.hidden.copy(), np.asarray(context[1:]))
            assert int(np.argmax(logits)) == drafts[0]
    sampled = model.generate(prompt, 30, temperature=1.0, seed=4)
    assert model.generate(prompt, 30, temperature=1.0, seed=4, speculative="mtp",
                          speculative_tokens=2) == sampled


CODE = "def area(width, height):\n    if width < 0 or height < 0:\n        raise ValueError('negative')\n" \
       "    result = width * height\n    print('area of', width, 'by', height, 'is', result)\n" \
       "    return result\n"


def test_prompt_lookup_drafts_a_code_edit_on_the_real_model(smollm2_gguf):
    """The trained SmolLM2-135M, asked to rename a parameter and return the whole code: the answer repeats
    the prompt, so prompt lookup drafts most of it, and the tokens stay plain greedy's."""
    model = minqwen.load(smollm2_gguf)
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "Rename the parameter width to w "
                                                "in this function and return the whole code.\n\n" + CODE}])
    plain = model.generate(ids, 60)
    ours, stats = run(model, ids, 60, NgramDrafter(), most=8)
    assert ours == plain
    assert stats.accepted > 20, stats.line()


def test_short_outputs_and_the_context_end(model, tmp_path):
    prompt = prompt_of(model, 9)
    plain = model.generate(prompt, 25)
    for n in (1, 2, 3, 25):
        ours, stats = run(model, prompt, n, Oracle(prompt, plain, model.config.vocab_size, 10**9), most=8)
        assert ours == plain[:n] and stats.generated_tokens == n
    # the context window ends right after the last new token: drafts never run past it
    short = minqwen.load(model.path, context_length=len(prompt) + 25)
    ours, _ = run(short, prompt, 25, Oracle(prompt, plain, model.config.vocab_size, 10**9), most=8)
    assert ours == plain


def test_a_rejected_draft_leaves_no_trace_in_the_deltanet_state(tmp_path):
    model = minqwen.load(build_checkpoint(tmp_path, QWEN3_5_MOE, "fp32"))
    prompt, drafts = prompt_of(model, 11), prompt_of(model, 5, seed=2)
    sequence = model.sequence()
    sequence.extend(prompt)
    cache = sequence.cache
    before = [{i: state.copy() for i, state in states.items()} for states in (cache.conv, cache.recurrent)]
    cache.keep_states()
    sequence.extend(drafts, every_token=True)
    sequence.truncate(len(prompt))  # every draft rejected
    for saved, now in zip(before, (cache.conv, cache.recurrent)):
        assert all(np.array_equal(saved[i], now[i]) for i in saved)  # bit for bit
    assert sequence.tokens == prompt and cache.length == len(prompt)
    # two accepted: the state and the logits that follow are those of the two tokens run alone
    cache.keep_states()
    sequence.extend(drafts, every_token=True)
    sequence.truncate(len(prompt) + 2)
    alone = model.sequence()
    alone.extend(prompt)
    alone.extend(drafts[:2])
    for ours, theirs in ((cache.conv, alone.cache.conv), (cache.recurrent, alone.cache.recurrent)):
        for i in ours:
            np.testing.assert_allclose(ours[i], theirs[i], rtol=0, atol=1e-5 * np.abs(theirs[i]).max())
    np.testing.assert_allclose(sequence.extend(drafts[2:], every_token=True),
                               alone.extend(drafts[2:], every_token=True), rtol=0, atol=1e-4)


def test_stop_strings_end_speculation_where_they_end_plain_decoding(tmp_path):
    model = minqwen.load(chat_checkpoint(tmp_path, "qwen3"))
    prompt = model.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    plain = model.generate(prompt, 30)
    stop = model.tokenizer.decode(plain[10:12])  # text the plain output reaches at its 12th token
    expected = model.generate(prompt, 30, stop=stop)
    assert expected and len(expected) <= 12
    assert model.generate(prompt, 30, stop=stop, speculative="ngram") == expected
    for wrong in (2, 10**9):
        drafter = Oracle(prompt, plain, model.config.vocab_size, wrong)
        ours = [token for token, _ in stream_tokens(
            model.sequence(), prompt, 30, GenerationOptions(stop=[stop]), model.eos_token_ids,
            _reply(model, prompt, stop), drafter=drafter)]
        assert ours == expected


def _reply(model, prompt, stop):
    from minqwen.text.reply import Reply

    return Reply(model.tokenizer, prompt, [stop], chat=False)


def test_sampling_with_drafts_has_plain_sampling_distribution(tmp_path):
    """Two tokens from a 6-token vocabulary: the frequency of each of the 36 pairs over 3000 seeds against
    the exact probabilities p(a) p(b | a) from the model's logits (chi-square, 35 degrees of freedom)."""
    config = dict(QWEN3, vocab_size=6, hidden_size=32, intermediate_size=32, head_dim=8)
    model = minqwen.load(build_checkpoint(tmp_path, config, "fp32", seed=3))
    prompt = [1, 4, 2]

    def probabilities(logits):
        p = np.exp(logits.astype(np.float64) - logits.max())
        return p / p.sum()

    first = probabilities(model.logits(prompt)[-1])
    exact = np.array([[first[a] * probabilities(model.logits([*prompt, a])[-1])[b] for b in range(6)]
                      for a in range(6)]).ravel()
    counts = np.zeros(36)
    greedy = model.generate(prompt, 2)
    for seed in range(3000):  # the drafter proposes the greedy pair: accepted as often as p says
        ours, _ = run(model, prompt, 2, Oracle(prompt, greedy, 6, 10**9), seed=seed, temperature=1.0)
        counts[ours[0] * 6 + ours[1]] += 1
    expected = exact * counts.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 66.6  # the 0.999 quantile of chi-square with 35 degrees of freedom


def test_draft_length_adapts_and_pauses():
    length = DraftLength(4)
    assert length.next() == 4
    length.update(4, 4)
    assert length.next() == 4
    length.update(4, 2)
    assert length.next() == 3  # one more than the accepted ones, no pause: half were kept
    length.update(3, 1)  # fewer than half: a miss, a pause of one round
    assert length.next() == 0 and length.next() == 2
    length.update(2, 2)
    misses = []
    for _ in range(6):  # rejected from the first token, round after round: pauses of 1, 3, 7, 15, 16
        length.update(length.next(), 0)
        pause = 0
        while length.next() == 0:
            pause += 1
        misses.append(pause)
    assert misses == [1, 3, 7, 15, PAUSE_ROUNDS, PAUSE_ROUNDS]
    length.update(1, 1)  # taken whole: twice the drafts, one miss earned back (the next miss pauses 16)
    assert length.next() == 2
    length.update(2, 2)
    assert length.next() == 4
    for _ in range(4):  # four more rounds taken whole: six misses earned back in all
        length.update(4, 4)
    length.update(length.next(), 0)
    assert [length.next() for _ in range(2)] == [0, 1]  # a first miss again: a pause of one round


def test_ngram_drafter_proposes_what_followed_the_latest_occurrence():
    drafter = NgramDrafter(longest=3, shortest=2)
    assert drafter.draft([5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 6, 7], 3) == [1, 2, 6]  # [6, 7] last before: at 6
    assert drafter.draft([5, 6, 7, 8, 9, 5, 6, 7], 4) == [8, 9, 5, 6]  # the trigram [5, 6, 7]
    assert drafter.draft([1, 2, 3, 4], 3) == []  # no n-gram repeats
    assert drafter.draft([1, 2, 1, 2], 5) == [1, 2]  # only what the context holds
    assert drafter.draft([1, 2, 1, 2], 0) == []


def test_bad_speculative_requests_are_typed_errors(model, tmp_path):
    prompt = prompt_of(model, 5)
    with pytest.raises(ConfigError, match="ngram, mtp or model:PATH"):
        model.generate(prompt, 3, speculative="lookahead")
    if model.weights.mtp is None:
        with pytest.raises(ConfigError, match="no MTP head"):
            model.generate(prompt, 3, speculative="mtp")
    with pytest.raises(SamplingError, match="draft"):
        model.generate(prompt, 3, speculative="ngram", speculative_tokens=0)


def test_a_draft_model_must_share_the_tokenizer(tmp_path):
    qwen3 = minqwen.load(chat_checkpoint(tmp_path / "qwen3", "qwen3"))
    other = chat_checkpoint(tmp_path / "qwen2.5", "qwen2.5")
    with pytest.raises(ConfigError, match="does not share this model's tokenizer"):
        qwen3.drafter(f"model:{other}")
    same = chat_checkpoint(tmp_path / "qwen3-copy", "qwen3")
    prompt = qwen3.tokenizer.encode("one two three one two three one two")
    assert qwen3.generate(prompt, 12, speculative=f"model:{same}") == qwen3.generate(prompt, 12)
