import json

from bench.common import Table


def test_table_ratio_render_and_json(tmp_path):
    t = Table("demo", anchor_name="hf")
    t.add("tok/s", 300.0, 100.0, "tok/s")
    t.add("latency", 2.0, 8.0, "ms", higher_is_better=False)
    t.add("no anchor", 5.0, None, "x")
    assert [r.ratio for r in t.rows] == [3.0, 4.0, None]
    text = t.render()
    assert "3.00x" in text and "4.00x" in text and "hf" in text
    data = json.loads(t.save(tmp_path / "r.json").read_text())
    assert data["rows"][0]["ratio"] == 3.0 and data["device"]


def test_paired_median_times_alternate_and_rotate_the_first_call():
    """Each round calls every function once, the round's first call rotating, after the warm-up calls; the medians
    come back in the functions' order."""
    from bench.common import paired_median_times

    calls = []
    fns = [lambda name=name: calls.append(name) for name in "abc"]
    out = paired_median_times(fns, repeat=3, warmup=1)
    assert len(out) == 3 and all(t >= 0 for t in out)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
