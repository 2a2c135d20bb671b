"""The HTML report: built from a small demo folder of real files, checked in headless Chromium."""

import html
import io
import json
import re
import shutil
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image, ImageDraw

from react_vl.report import write_report

TASKS = {
    "shape-sketch": {"role": "target", "metric": "accuracy", "base": 79.9, "gated-image": 90.9, "locked-text": 94.4},
    "shape-photo": {"role": "control", "metric": "accuracy", "base": 99.3, "gated-image": 97.9, "locked-text": 94.3},
}
CLASSES = ["circle", "square"]
PER_CLASS = {"base": {"circle": 0.5, "square": 0.75}, "gated-image": {"circle": 0.875, "square": 0.625}}


def _png(color: str, shape: str) -> bytes:
    image = Image.new("RGB", (32, 32), "white")
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)((6, 6, 26, 26), outline=color, width=2)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _make_demo(demo):
    """A demo folder as the stages write it: shards, retrieved parquet, logs and summaries."""
    shard = demo / "world" / "kb" / "kb-000000.tar"
    shard.parent.mkdir(parents=True)
    rows = []
    with wds.TarWriter(str(shard)) as writer:
        for i in range(12):
            shape = CLASSES[i % 2]
            key = f"kb{i:06d}"
            attributes = {"shape": shape, "style": "sketch", "noisy": i == 11}
            writer.write({"__key__": key, "png": _png("black", shape), "txt": f"a sketch of a {shape}",
                          "json": json.dumps(attributes).encode()})
            rows.append({"id": i, "key": key, "caption": f"a sketch of a {shape}", "shard": str(shard),
                         "score": 0.2 + 0.01 * i, "classes": [shape], "queries": [f"a sketch of a {shape}."],
                         "modes": ["t2t"], "json": json.dumps(attributes)})
    corrupt = demo / "world" / "kb" / "kb-000001.tar"
    corrupt.write_bytes(b"this is not a tar file" * 40)
    rows.append({**rows[0], "id": 99, "key": "kb000099", "shard": str(corrupt), "score": 0.1})
    retrieved = demo / "retrieved" / "shape-sketch"
    retrieved.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), retrieved / "retrieved.parquet")
    (retrieved / "summary.json").write_text(json.dumps(
        {"per_class": {"circle": 6, "square": 7}, "overlap": {"t2t_and_t2i": 0.8}, "time_s": 1.5}))

    (demo / "base").mkdir()
    (demo / "base" / "log.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 4.0 - s / 10, "lr": 5e-4}) + "\n" for s in range(20)))
    run = demo / "runs" / "gated-image"
    run.mkdir(parents=True)
    log = [{"step": s, "loss": 2.0 - s / 20, "gates": {"4": {"attn": s / 50, "dense": -s / 80},
                                                     "5": {"attn": s / 40, "dense": s / 90}},
            "eval": {"shape-sketch": 80 + s, "shape-photo": 99 - s / 5}} for s in range(10)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + "{not json\n")
    (run / "summary.json").write_text(json.dumps({"steps": 10, "time_s": 3.2, "trainable_params": 1234}))
    (demo / "eval").mkdir()
    (demo / "eval" / "results.json").write_text(json.dumps({"zero_shot": {"shape-sketch": {
        model: {"metric": "accuracy", "per_class_accuracy": accuracies} for model, accuracies in PER_CLASS.items()}}}))
    (demo / "world" / "world.json").write_text(json.dumps(
        {"seed": 0, "counts": {"kb": {"style": {"photo": 900, "sketch": 40}}}}))
    (demo / "summary.json").write_text(json.dumps(
        {"tasks": TASKS, "stages": {"world": 2.5, "train": 60.0},
         "settings": {"seed": 0, "steps": 10}, "versions": {"torch": "2.14.1"}}))


@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("headless Chromium not installed (apt-get install -y chromium; .ci/run installs it)")
    return path


def _page_check(chromium, page, tmp_path) -> dict:
    """Load the page in headless Chromium and read what its inline check script recorded."""
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'<pre id="page-check"[^>]*>(.*?)</pre>', dom, re.S)
    assert found and found.group(1), f"the page check never ran; dumped DOM starts: {dom[:300]}"
    return json.loads(html.unescape(found.group(1)))


def test_report_loads_in_chromium_without_broken_images_or_errors(tmp_path, chromium):
    demo = tmp_path / "demo"
    _make_demo(demo)
    page = write_report(demo)
    text = page.read_text()

    check = _page_check(chromium, page, tmp_path)
    assert check["broken_images"] == [] and check["script_errors"] == []
    # 2 classes x 4 best + the 8 lowest (one of them in the corrupt shard, so not shown) + 3 charts
    assert check["images"] == 2 * 4 + 7 + 3
    assert 'src="http' not in text and "<link" not in text, "the page must not need the network"
    for task, result in TASKS.items():
        assert task in text
        assert f"({result['gated-image'] - result['base']:+.1f})" in text
    assert text.index("shape-sketch") < text.index("shape-photo"), "targets come before controls"
    for name in CLASSES:
        change = 100 * (PER_CLASS["gated-image"][name] - PER_CLASS["base"][name])
        assert f"({change:+.1f})" in text
    assert "1 in corrupt shards" in text and "1 unreadable log line" in text
    assert "noisy caption" in text and "world.json" not in text  # present files give tables, not notes


def test_page_check_catches_a_broken_image_and_a_script_error(tmp_path, chromium):
    demo = tmp_path / "demo"
    _make_demo(demo)
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
