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
