"""Run-ahead decode (``async_scheduling``): the engine queues the next decode step before it reads the last one's
tokens. On the CPU nothing overlaps, but the bookkeeping is the same as on CUDA, so every output must equal that of
the synchronous engine: tokens, text, logprobs, finish reasons, and the KV pool left empty."""

import pytest

from kiln.llm import LLM, SamplingParams


@pytest.fixture(scope="module")
def engines(checkpoints):
    path, _ = checkpoints["llama"]
    kw = dict(dtype="float32", max_num_seqs=16, block_size=4, max_num_batched_tokens=64,
              num_kv_blocks=1024)  # two engines share one GPU
    return LLM(str(path), async_scheduling=False, **kw), LLM(str(path), async_scheduling=True, **kw)


def _summary(out):
    """Exact fields, and the logprobs apart: a run-ahead step can carry a row that has finished meanwhile, and a
    different batch size may change fp32 matmul rounding."""
    exact = [(c.token_ids, c.text, c.finish_reason, c.stop_reason,
              None if c.logprobs is None else [[(t, lp.rank) for t, lp in e.items()] for e in c.logprobs])
             for c in out.outputs]
    values = [v for c in out.outputs if c.logprobs is not None
              for v in [c.cumulative_logprob] + [lp.logprob for e in c.logprobs for lp in e.values()]]
    return exact, values


def test_run_ahead_outputs_equal_synchronous_steps(engines):
    sync, ahead = engines
    prompt = [0, 5, 9, 33, 100, 7]
    greedy = sync.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    ids = greedy.outputs[0].token_ids
    text = greedy.outputs[0].text
    requests = [
        (prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)),
        ([0, 3, 200], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)),      # finishes early by length
        (prompt, SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[ids[9]])),  # by a token, mid-batch
        (prompt, SamplingParams(temperature=0, max_tokens=24, stop=[text[12:15]])),       # by a string
        (prompt, SamplingParams(temperature=0, max_tokens=24, min_tokens=12, stop_token_ids=[ids[9]])),
        ([0, 17, 17, 250], SamplingParams(temperature=1.5, top_p=0.9, top_k=50, max_tokens=20, seed=7,
                                          ignore_eos=True)),
        ([0, 44, 45], SamplingParams(n=2, temperature=2.0, max_tokens=16, seed=3, logprobs=2, ignore_eos=True)),
        (list(range(2, 40)), SamplingParams(temperature=0, max_tokens=9, logprobs=1, ignore_eos=True)),
    ]
    prompts, params = [r[0] for r in requests], [r[1] for r in requests]
    before = ahead.engine.stats["steps_ahead"]
    expected = [_summary(o) for o in sync.generate(prompts, params)]
    got = [_summary(o) for o in ahead.generate(prompts, params)]
    assert [g[0] for g in got] == [e[0] for e in expected]
    for g, e in zip(got, expected):
        assert g[1] == pytest.approx(e[1], rel=1e-5, abs=1e-5)
    assert ahead.engine.stats["steps_ahead"] > before, "the decode steps should have run ahead"
    assert expected[2][0][0][2] == "stop" and expected[3][0][0][2] == "stop", "the stop conditions must fire"
    for llm in engines:
        assert llm.engine.get_stats()["kv_blocks_used"] == 0
        assert not llm.engine.scheduler.has_work()


def test_streams_and_a_request_joining_mid_decode_match(engines):
    sync, ahead = engines
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    assert "".join(ahead.stream("To be, or not", p)) == "".join(sync.stream("To be, or not", p))
    # a request that arrives while others decode stops the run-ahead for one step (it must be admitted)
    results = []
    for llm in engines:
        eng = llm.engine
        eng.add_request("first", [0, 5, 6, 7], p)
        outs = {}
        for i in range(200):
            if i == 6:
                eng.add_request("late", [0, 9, 10], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
            for o in eng.step():
                if o.finished:
                    outs[o.request_id] = o.outputs[0].token_ids
            if len(outs) == 2:
                break
        results.append(outs)
    assert results[0] == results[1] and len(results[0]["late"]) == 7


def test_abort_while_a_step_is_in_flight(engines):
    sync, ahead = engines
    p = SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)
    eng = ahead.engine
    for rid, prompt in (("a", [0, 5, 6]), ("b", [0, 8, 9]), ("c", [0, 11, 12])):
        eng.add_request(rid, prompt, p)
    finished = {}
    aborted = False
    while eng.has_unfinished_requests():
        for o in eng.step():
            assert o.request_id != "b" or not aborted, "an aborted request must produce no more outputs"
            if o.finished:
                finished[o.request_id] = o.outputs[0].token_ids
        if not aborted and eng._in_flight is not None and eng.stats["steps_ahead"] > 0:
            assert eng.abort("b")
            aborted = True
    assert aborted and set(finished) == {"a", "c"}
    expected = sync.generate([[0, 5, 6], [0, 11, 12]], p)
    assert [finished["a"], finished["c"]] == [o.outputs[0].token_ids for o in expected]
    assert eng.get_stats()["kv_blocks_used"] == 0


def test_one_token_prompt_chunks_beside_decode_rows_do_not_sample(checkpoints):
    """A token budget of 2 splits a prompt into one-token chunks scheduled beside another sequence's decode row: an
    all-one-token batch, but only rows at their sequence's last token may sample (once, such a batch went to the
    decode path, which samples every row)."""
    path, _ = checkpoints["llama"]
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    # fixed small pools: three engines live in this process at once on a GPU
    alone = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=64).generate([[0, 9, 10, 11, 12, 13, 14]],
                                                                                   p)[0]
    for run_ahead in (False, True):
        llm = LLM(str(path), dtype="float32", block_size=4, max_num_batched_tokens=2, async_scheduling=run_ahead,
                  num_kv_blocks=64)
        outs = llm.generate([[0, 5, 6], [0, 9, 10, 11, 12, 13, 14]], p)
        assert outs[1].outputs[0].token_ids == alone.outputs[0].token_ids
        assert llm.engine.get_stats()["kv_blocks_used"] == 0


class _CountedGraph:
    def __init__(self, graph, counts):
        self.graph, self.counts = graph, counts

    def replay(self):
        self.counts["replays"] += 1
        self.graph.replay()


@pytest.mark.gpu
def test_greedy_decode_graphs_take_the_argmax_themselves(engines):
    """On CUDA every decode graph has a greedy twin that ends in the argmax, written into the next step's input ids.
    Plain-greedy requests must get the tokens that the sampler takes from the logits (``logprobs=0`` sends the
    same requests through it). The batch shrinks as requests finish, so replays are padded. Checked with and
    without run-ahead, and the twins must really have replayed."""
    prompts = [[0, 5, 9, 33], [0, 3, 200], list(range(2, 30))]
    lengths = (24, 5, 13)
    plain = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in lengths]
    via_logits = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=0) for m in lengths]
    for llm in engines:
        runner = llm.engine.runner
        assert runner.greedy_graphs and set(runner.greedy_graphs) == set(runner.graphs)
        counts = {"replays": 0}
        twins = runner.greedy_graphs
        runner.greedy_graphs = {b: _CountedGraph(g, counts) for b, g in twins.items()}
        try:
            fast = llm.generate(prompts, plain)
            replays = counts["replays"]
            slow = llm.generate(prompts, via_logits)
        finally:
            runner.greedy_graphs = twins
        assert [o.outputs[0].token_ids for o in fast] == [o.outputs[0].token_ids for o in slow]
        assert replays >= max(lengths) - 1 and counts["replays"] == replays
