"""Sampling: formulas of each logits processor, seeded reproducibility, stop handling, logprobs, n > 1."""

import math

import pytest
import torch

from kiln.llm import LLM, SamplingParams
from kiln.llm.sampler import Sampler, SeedStream, apply_min_p, apply_penalties, apply_top_k, apply_top_p
from kiln.ops.argmax import gumbel_argmax_reference
from tests.conftest import DEVICE


def test_plain_greedy_rows_take_given_tokens_and_others_need_logits():
    """``Sampler.plain_greedy``: greedy rows without logprobs, penalties or bans. Such a step may hand the sampler
    the argmax its decode graph took (no logits); any other step without logits is a clear error."""
    greedy, lp = SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=0)
    hot, pen = SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0, repetition_penalty=1.2)
    assert Sampler.plain_greedy([greedy, greedy], [[], []])
    assert not Sampler.plain_greedy([greedy, lp], [[], []])
    assert not Sampler.plain_greedy([greedy, hot], [[], []])
    assert not Sampler.plain_greedy([pen], [[]])
    assert not Sampler.plain_greedy([greedy], [[3]])
    sampler = Sampler(DEVICE)
    tokens = torch.tensor([4, 9], device=DEVICE)
    hist = [([1, 2], 2), ([1], 1)]
    assert sampler.sample(None, [greedy, greedy], hist, [None, None], [[], []], tokens).result().token_ids == [4, 9]
    logits = torch.randn(2, 16, device=DEVICE)
    assert sampler.sample(logits, [greedy, greedy], hist, [None, None], [[], []]).result().token_ids == \
        logits.argmax(-1).tolist()
    with pytest.raises(ValueError, match="needs the step's logits"):
        sampler.sample(None, [greedy, lp], hist, [None, None], [[], []], tokens)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.randn(5, 50)
    k = torch.tensor([1, 3, 50, 0, 7])
    out = apply_top_k(logits, k)
    for row, kk in enumerate(k.tolist()):
        kk = 50 if kk <= 0 else kk
        keep = set(logits[row].topk(kk).indices.tolist())
        assert {i for i in range(50) if out[row, i] > -math.inf} == keep
        assert torch.equal(out[row, list(keep)], logits[row, list(keep)])


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = torch.randn(4, 30)
    p = torch.tensor([0.1, 0.5, 0.9, 1.0])
    out = apply_top_p(logits, p)
    for row in range(4):
        probs = logits[row].softmax(-1)
        order = probs.argsort(descending=True)
        cum, keep = 0.0, []
        for i in order.tolist():
            keep.append(i)
            cum += probs[i].item()
            if cum >= p[row].item():
                break
        assert {i for i in range(30) if out[row, i] > -math.inf} == set(keep)


def test_min_p_drops_tokens_below_fraction_of_max():
    logits = torch.randn(3, 40) * 3
    mp = torch.tensor([0.0, 0.1, 0.5])
    out = apply_min_p(logits, mp)
    for row in range(3):
        probs = logits[row].softmax(-1)
        keep = probs >= mp[row] * probs.max()
        assert torch.equal(out[row] > -math.inf, keep)


def test_penalties_follow_their_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    prompt_mask = torch.tensor([[True, False, False, False, True]])
    counts = torch.tensor([[0, 2, 0, 1, 0]])
    out = apply_penalties(logits, prompt_mask, counts, torch.tensor([2.0]), torch.tensor([0.5]),
                          torch.tensor([0.25]))
    expected = torch.tensor([[2.0 / 2, -1.0 * 2 - 0.5 - 0.25 * 2, 0.5, 3.0 / 2 - 0.5 - 0.25, -2.0 * 2]])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_sampler_seeded_rows_follow_their_own_stream(backend, monkeypatch):
    """Both sampling paths (per-request torch generators; the Philox Gumbel kernel, under the interpreter without a
    GPU): a seeded row's token depends on its seed, draw number and logits only, and each call advances the draw."""
    if backend == "triton":
        pytest.importorskip("triton")
    if backend == "ref" or DEVICE.type == "cpu":
        monkeypatch.setenv("KILN_OPS", backend)
    logits = 2 * torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    hot = SamplingParams(temperature=2.0, seed=7)
    other = SamplingParams(temperature=1.0)

    def run(rows, streams, sampler_seed):
        return Sampler(DEVICE, sampler_seed)(logits[rows].to(DEVICE), [hot if s else other for s in streams],
                                             [([], 0)] * len(rows), streams, [[]] * len(rows))

    alone_streams = [SeedStream(7)]
    alone = [run([1], alone_streams, 0).token_ids[0] for _ in range(4)]
    assert alone_streams[0].draws == 4
    mixed_stream = SeedStream(7)
    mixed = [run([0, 1, 2], [None, mixed_stream, None], k).token_ids[1] for k in range(4)]
    assert mixed == alone and mixed_stream.draws == 4 and len(set(alone)) > 1
    if backend == "triton":  # the kernel's draw d of seed 7 is the reference's
        for d, tok in enumerate(alone):
            ref = gumbel_argmax_reference(logits[1:2] / 2.0, torch.tensor([7]), torch.tensor([d]))
            assert tok == ref.item()


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(checkpoints, request):
    """Every sampling test runs with decode steps synchronous and run ahead of the host (``async_scheduling``)."""
    path, _ = checkpoints["llama"]
    return LLM(str(path), dtype="float32", max_num_seqs=16, block_size=8, async_scheduling=request.param,
               num_kv_blocks=512)  # both engines fit on one GPU


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    p = SamplingParams(temperature=8.0, top_p=0.95, top_k=100, max_tokens=24, seed=1234, ignore_eos=True)
    alone = llm.generate("To be, or not", p)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    mixed = llm.generate(["whether 'tis", "To be, or not", "the slings"], [others, p, others])
    assert mixed[1].outputs[0].token_ids == alone
    different = llm.generate("To be, or not", SamplingParams(temperature=8.0, top_p=0.95, top_k=100, max_tokens=24, seed=99,
                                                             ignore_eos=True))[0].outputs[0].token_ids
    assert different != alone


def test_n_samples_logprobs_and_greedy_consistency(llm):
    out = llm.generate("To be", SamplingParams(n=3, temperature=8.0, max_tokens=8, seed=5, logprobs=3,
                                               ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids) == 8
        for tok, entry in zip(c.token_ids, c.logprobs):
            assert tok in entry and len(entry) >= 3
            assert all(lp.logprob <= 0 for lp in entry.values())
        assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)))
    greedy = llm.generate("To be", SamplingParams(temperature=0, max_tokens=6, logprobs=1, ignore_eos=True))[0]
    for tok, entry in zip(greedy.outputs[0].token_ids, greedy.outputs[0].logprobs):
        assert entry[tok].rank == 1


def test_stop_strings_cut_full_outputs_and_streams_identically(llm):
    base = llm.generate("To be, or not", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    text = base.outputs[0].text
    assert len(text) > 12
    stop = text[6:9]
    cut = llm.generate("To be, or not", SamplingParams(temperature=0, max_tokens=30, stop=[stop, "zzzz"]))[0]
    c = cut.outputs[0]
    assert c.text == text[: text.find(stop)] and c.finish_reason == "stop" and c.stop_reason == stop
    streamed = "".join(llm.stream("To be, or not", SamplingParams(temperature=0, max_tokens=30, stop=stop)))
    assert streamed == c.text, "a stream must never emit part of a stop string"
    kept = llm.generate("To be, or not", SamplingParams(temperature=0, max_tokens=30, stop=stop,
                                                        include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == text[: text.find(stop) + len(stop)]


def test_stop_token_ids_min_tokens_and_max_tokens(llm):
    base = llm.generate([[0, 5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    ids = base.outputs[0].token_ids
    target = ids[4]
    out = llm.generate([[0, 5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[target]))[0]
    assert out.outputs[0].token_ids == ids[: ids.index(target) + 1]
    assert out.outputs[0].stop_reason == target and out.outputs[0].finish_reason == "stop"
    late = llm.generate([[0, 5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, min_tokens=ids.index(target) + 2,
                                                       stop_token_ids=[target]))[0]
    assert target not in late.outputs[0].token_ids[: ids.index(target) + 1]
    assert len(late.outputs[0].token_ids) >= ids.index(target) + 2
    assert base.outputs[0].finish_reason == "length" and len(ids) == 12


def test_incremental_detokenisation_never_splits_a_character(llm):
    tok = llm.tokenizer
    from kiln.llm.tokenizer import detokenize_incrementally

    text = "café — 日本語 ✓ done"
    ids = tok.encode(text, add_special_tokens=False)
    out, prefix, read = "", 0, 0
    for i in range(1, len(ids) + 1):
        delta, prefix, read = detokenize_incrementally(tok, ids[:i], prefix, read)
        assert "\ufffd" not in delta
        out += delta
    assert out == text


def test_chat_uses_the_checkpoint_template(llm):
    msgs = [{"role": "user", "content": "To be"}]
    rendered = llm.tokenizer.apply_chat_template(msgs)
    assert rendered == "<|user|>\nTo be\n<|assistant|>\n"
    chat = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    direct = llm.generate({"prompt_token_ids": llm.tokenizer.encode(rendered, add_special_tokens=False)},
                          SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids


def test_tokenizer_matches_transformers(checkpoints):
    transformers = pytest.importorskip("transformers")
    path, _ = checkpoints["llama"]
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    from kiln.llm.tokenizer import Tokenizer

    ours = Tokenizer(path)
    for text in ["To be, or not", "émigré café 日本語", " leading space"]:
        assert ours.encode(text) == ref(text)["input_ids"]
        assert ours.decode(ours.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_prefill_steps_keep_linears_off_the_decode_gemv(llm, monkeypatch):
    """The runner runs prefill forwards (even a prefix-cache hit's few rows) under ``gemv.cublas_only()`` and
    decode forwards without it, so only decode steps can take the skinny-GEMM kernels."""
    from kiln.llm import context
    from kiln.llm.models import llama
    from kiln.ops import gemv

    seen = []
    real = llama._norm_proj

    def spy(norm, proj, x, residual):
        seen.append((context.get_context().is_decode, gemv._CUBLAS_ONLY.get()))
        return real(norm, proj, x, residual)

    monkeypatch.setattr(llama, "_norm_proj", spy)
    p = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate("To be, or not to be", p)
    llm.generate("To be, or not to be", p)  # the same prompt again: a prefix-cache hit, a short prefill
    # decode steps run eagerly on the CPU; on a GPU they replay a CUDA graph (captured outside cublas_only)
    assert False in {d for d, _ in seen} and (True in {d for d, _ in seen} or torch.cuda.is_available())
    assert all(off == (not decode) for decode, off in seen)
    assert not gemv._CUBLAS_ONLY.get()
