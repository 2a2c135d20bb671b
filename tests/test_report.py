"""The HTML report: built from a demo folder around a real tiny world, checked in headless Chromium."""

import html
import json
import re
import subprocess
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import clustered, make_kb

from react_vl.curation import report_cards
from react_vl.data import SkipLog, list_shards, read_shard
from react_vl.report import NOISE_SAMPLES, SAMPLES_PER_CLASS, write_report
from react_vl.tasks import get_task

TASKS = {
    "mini-shape-sketch": {"role": "target", "metric": "accuracy", "base": 79.9, "gated-image": 90.9,
                          "locked-text": 94.4},
    "mini-shape-photo": {"role": "control", "metric": "accuracy", "base": 99.3, "gated-image": 97.9,
                         "locked-text": 94.3},
}
PER_CLASS = {"base": {"circle": 0.5, "square": 0.75}, "gated-image": {"circle": 0.875, "square": 0.625}}
CHARTS = 2  # gates, loss curves


def _retrieved_rows(world) -> list[dict]:
    """The world's sketch pairs as retrieve would list them; noisy captions get the lowest scores."""
    rows = []
    for shard in list_shards(str(world / "kb")):
        for pair in read_shard(shard, SkipLog()):
            attributes = json.loads(pair.extra["json"])
            if attributes["style"] == "sketch":
                score = (0.1 if attributes["noisy"] else 0.3) + 0.001 * len(rows)
                rows.append({"id": len(rows), "key": pair.key, "caption": pair.caption, "shard": shard,
                             "score": score, "classes": [attributes["shape"]], "queries": ["a sketch of a x."],
                             "modes": ["t2t"], "json": pair.extra["json"]})
    return rows


def _make_demo(demo, world) -> list[dict]:
    """A demo folder as the stages write it (world, retrieved parquet, logs, summaries); its rows."""
    demo.mkdir()
    (demo / "world").symlink_to(world, target_is_directory=True)
    rows = _retrieved_rows(world)
    corrupt = demo / "corrupt-000000.tar"
    corrupt.write_bytes(b"this is not a tar file" * 40)
    rows.append({**rows[0], "id": len(rows), "key": "lost", "shard": str(corrupt), "score": 0.0})
    retrieved = demo / "retrieved" / "mini-shape-sketch"
    retrieved.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), retrieved / "retrieved.parquet")
    random_control = demo / "retrieved" / "random"  # the demo's random subset: not a task, no scores
    random_control.mkdir()
    pq.write_table(pa.Table.from_pylist([{k: rows[1][k] for k in ("id", "key", "caption", "shard")}]),
                   random_control / "retrieved.parquet")
    (retrieved / "summary.json").write_text(json.dumps(
        {"per_class": {"circle": 6, "square": 7}, "overlap": {"t2t_and_t2i": 0.8}, "time_s": 1.5}))

    (demo / "base").mkdir()
    (demo / "base" / "log.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 4.0 - s / 10, "lr": 5e-4}) + "\n" for s in range(20)))
    run = demo / "runs" / "gated-image"
    run.mkdir(parents=True)
    log = [{"step": s, "loss": 2.0 - s / 20, "gates": {"4": {"attn": s / 50, "dense": -s / 80},
                                                     "5": {"attn": s / 40, "dense": s / 90}}} for s in range(10)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + "{not json\n")
    (run / "summary.json").write_text(json.dumps({"steps": 10, "time_s": 3.2, "trainable_params": 1234}))
    (demo / "eval").mkdir()
    (demo / "eval" / "results.json").write_text(json.dumps({"zero_shot": {"mini-shape-sketch": {
        model: {"metric": "accuracy", "per_class_accuracy": accuracies} for model, accuracies in PER_CLASS.items()}}}))
    (demo / "summary.json").write_text(json.dumps(
        {"tasks": TASKS, "stages": {"world": 2.5, "train": 60.0},
         "settings": {"seed": 0, "steps": 10}, "versions": {"torch": "2.14.1"}}))
    return rows


def _page_check(chromium, page, tmp_path) -> dict:
    """Load the page in headless Chromium and read what its inline check script recorded."""
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'<pre id="page-check"[^>]*>(.*?)</pre>', dom, re.S)
    assert found and found.group(1), f"the page check never ran; dumped DOM starts: {dom[:300]}"
    return json.loads(html.unescape(found.group(1)))


def test_report_loads_in_chromium_without_broken_images_or_errors(tmp_path, chromium, tiny_world):
    demo = tmp_path / "demo"
    rows = _make_demo(demo, tiny_world)
    page = write_report(demo)
    text = page.read_text()

    check = _page_check(chromium, page, tmp_path)
    assert check["broken_images"] == [] and check["script_errors"] == []
    per_class = Counter(row["classes"][0] for row in rows if row["key"] != "lost")
    lowest = sorted(rows, key=lambda row: row["score"])[:NOISE_SAMPLES]
    shown = sum(min(n, SAMPLES_PER_CLASS) for n in per_class.values()) + len(lowest) - 1  # "lost" is not shown
    assert check["images"] == shown + CHARTS
    assert 'src="http' not in text and "<link" not in text, "the page must not need the network"
    assert text.count('class="noisy"') == sum(json.loads(r["json"])["noisy"] for r in lowest if r["key"] != "lost")
    for task, result in TASKS.items():
        assert task in text
        assert f"({result['gated-image'] - result['base']:+.1f})" in text
    assert text.index("mini-shape-sketch") < text.index("mini-shape-photo"), "targets come before controls"
    for name in PER_CLASS["base"]:
        change = 100 * (PER_CLASS["gated-image"][name] - PER_CLASS["base"][name])
        assert f"({change:+.1f})" in text
    assert "also in retrieved/ (no grid, not a task): random." in text
    assert "1 in corrupt shards" in text and "1 unreadable log line" in text
    assert "world/world.json not found" not in text and "counts.kb.style" in text


def test_page_check_catches_a_broken_image_and_a_script_error(tmp_path, chromium, tiny_world):
    demo = tmp_path / "demo"
    _make_demo(demo, tiny_world)
    page = write_report(demo)
    page.write_text(page.read_text().replace(
        "</body>", '<img src="data:image/png;base64,AAAA" alt="broken one">'
                   '<script>undefinedFunction();</script></body>'))
    check = _page_check(chromium, page, tmp_path)
    assert check["broken_images"] == ["broken one"]
    assert len(check["script_errors"]) == 1 and "undefinedFunction" in check["script_errors"][0]


def test_missing_sections_become_notes(tmp_path):
    demo = tmp_path / "empty-demo"
    demo.mkdir()
    text = write_report(demo).read_text()
    assert text.count('class="note"') >= 7
    assert "no retrieved/&lt;task&gt;/retrieved.parquet found" in text
    assert "<img" not in text


def test_missing_demo_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        write_report(tmp_path / "nowhere")


def _carded_demo(demo) -> list[dict]:
    """A demo folder with a KB (600 random mini-vit-test-sized embeddings) and a retrieved set of
    the sketch task over it: every class gets pairs, every fifth pair a second class, every third
    both modes; plus a control task's set and a target whose pairs are not in the KB. Its rows."""
    rng = np.random.default_rng(0)
    kb = make_kb(demo / "kb", clustered(600, 32, rng), clustered(600, 32, rng), parts=[0, 1])
    metadata = kb.metadata(["id", "key", "shard"]).to_pylist()
    names = get_task("mini-shape-sketch").classnames
    rows = []
    for n, pair in enumerate(metadata[::3]):
        classes = [names[n % len(names)]] + ([names[(n + 1) % len(names)]] if n % 5 == 0 else [])
        both = n % 3 == 0
        rows.append({**pair, "caption": f"row {n}", "classes": classes, "queries": [f"a sketch of a {classes[0]}."],
                     "modes": ["t2t", "t2i"] if both else ["t2t"], "score": 0.2 + rng.random() / 10,
                     "score_t2t": 0.3 + rng.random() / 10, "score_t2i": 0.25 if both else None})
    for task, pairs in (("mini-shape-sketch", rows), ("mini-shape-photo", rows),
                        ("broken", [{**rows[0], "id": 1 << 50}])):
        folder = demo / "retrieved" / task
        folder.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(pairs), folder / "retrieved.parquet")
        (folder / "summary.json").write_text(json.dumps({"task": "mini-shape-sketch"}))
    (demo / "summary.json").write_text(json.dumps({"tasks": {
        "mini-shape-sketch": {"role": "target"}, "mini-shape-photo": {"role": "control"}, "broken": {"role": "target"}}}))
    return rows


def test_report_cards_per_target_task(tmp_path, chromium):
    demo = tmp_path / "demo"
    rows = _carded_demo(demo)
    text = write_report(demo).read_text()
    section = text[text.index("<h2>Report cards of the retrieved sets</h2>"):]
    section = section[:section.index("<h2>", 4)]
    assert re.findall(r"<h3>(.*?)</h3>", section) == ["broken", "mini-shape-sketch"], "targets only"
    assert "no report cards:" in section and "is in no part&#x27;s metadata" in section

    cards = report_cards(demo / "kb", demo / "retrieved" / "mini-shape-sketch")["cards"]
    counts = Counter(c for row in rows for c in row["classes"])
    both = Counter(c for row in rows if len(row["modes"]) == 2 for c in row["classes"])
    assert {card["class"]: card["count"] for card in cards} == dict(counts)
    for card in cards:
        cells = f"<td>{card['class']}</td><td class=\"num\">{counts[card['class']]}</td>" \
                f"<td>t2t {counts[card['class']]} / t2i {both[card['class']]}</td>" \
                f"<td class=\"num\">{100 * both[card['class']] / counts[card['class']]:.0f}%</td>"
        assert cells in section, cells
        assert f"{100 * card['precision']:.0f}%" in section and f"{card['prompt_cosine']:.3f}" in section
        assert f"{card['overlapping'][0]['class']} {100 * card['overlapping'][0]['share']:.0f}%" in section
    assert section.count("collapse?") == sum(card["collapse"] for card in cards)
    assert section.count('<svg class="hist"') == 2 * len(cards)  # one per mode and class

    check = _page_check(chromium, demo / "report.html", tmp_path)
    assert check["broken_images"] == [] and check["script_errors"] == []


def test_precondition_and_bars_rows_with_each_failure_marked(tmp_path):
    from react_vl.demo import RANDOM_CONTROL, check_bars
    from react_vl.experiment import check_precondition

    scores = {"mini-shape-sketch": 60.0, "mini-color-night": 85.0, "mini-shape-photo": 95.0,
              "mini-color-photo": 92.0, "mini-shape-pixel": 70.0}  # night: no headroom
    precondition = check_precondition(scores, 420.0, dict.fromkeys(scores, 0.5))
    tasks = {"mini-shape-sketch": {"role": "target", "base": 60.0, "gated-image": 66.0, RANDOM_CONTROL: 64.0},
             "mini-shape-photo": {"role": "control", "base": 95.0, "gated-image": 94.0, RANDOM_CONTROL: 95.0}}
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "summary.json").write_text(json.dumps({"tasks": tasks, "precondition": precondition,
                                                   "bars": check_bars(tasks)}))
    text = write_report(demo).read_text()
    assert "Precondition, validation sets: NOT met" in text and "Bars, test sets, this seed: missed" in text
    assert text.count("<b>FAIL</b>") == 1 and text.count("<b>MISSED</b>") == 1  # night headroom; +2 over random
    assert text.count('<tr class="pass">') == len(precondition["criteria"]) - 1 + 2
