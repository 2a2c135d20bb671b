"""The demo report: every stage's results on one self-contained HTML page.

`write_report(demo_dir)` reads the files a demo folder holds (docs/DESIGN.md) and writes
`demo_dir/report.html`. Images and charts are inlined as base64 data URIs and the stylesheet is
inline, so the page opens offline and can be mailed as one file. A section whose files are
missing is replaced by a one-line note; a corrupt shard, image or log line is skipped and counted.

The page carries a tiny script that records script errors and images that failed to decode into
`<pre id="page-check">`, so a headless browser can check the page (tests/test_report.py).
"""

import base64
import html
import io
import json
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
from matplotlib.figure import Figure

from .data import SkipLog, decode_image, read_shard
from .utils import atomic_path

SAMPLES_PER_CLASS = 4
NOISE_SAMPLES = 8
NOT_A_STRATEGY = {"role", "metric", "base"}

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.up { color: #137333; } .down { color: #b3261e; } .note { color: #666; font-style: italic; }
tr.control td { background: #fafafa; }
.grid { display: flex; flex-wrap: wrap; gap: 0.6em; margin-bottom: 1em; }
figure { margin: 0; width: 132px; font-size: 0.78em; }
figure img { width: 128px; height: 128px; image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { overflow-wrap: anywhere; } .noisy { color: #b3261e; font-weight: bold; }
img.chart { max-width: 100%; }
.warn { color: #b3261e; font-weight: bold; } tr.fail td { background: #fdecea; }
svg.hist rect { fill: #4a78b5; } svg.hist rect.t2i { fill: #d08a2b; }
.tables { display: flex; flex-wrap: wrap; gap: 0 1.5em; align-items: flex-start; }
"""

# Records script errors and undecodable images into #page-check once the page has loaded.
PAGE_CHECK_SCRIPT = """
window.pageErrors = [];
window.addEventListener("error", function (event) {
  if (event.target && event.target.tagName === "IMG") return;  // counted below as broken
  window.pageErrors.push(String(event.message || event));
}, true);
window.addEventListener("load", function () {
  var broken = [];
  for (var i = 0; i < document.images.length; i++) {
    var img = document.images[i];
    if (!img.complete || img.naturalWidth === 0) broken.push(img.alt || "image " + i);
  }
  document.getElementById("page-check").textContent = JSON.stringify(
    {images: document.images.length, broken_images: broken, script_errors: window.pageErrors});
});
"""


def write_report(demo_dir) -> Path:
    """Write `demo_dir/report.html` from the demo folder's summaries, logs and shards."""
    demo_dir = Path(demo_dir)
    if not demo_dir.is_dir():
        raise FileNotFoundError(f"report: demo folder {demo_dir} does not exist")
    summary = _read_json_or_none(demo_dir / "summary.json") or {}
    sections = [
        _section("REACT's precondition on the base, and the demo's bars", _checks_section(summary)),
        _section("Before and after customization", _results_section(summary)),
        _section("Zero-shot accuracy per class", _per_class_section(demo_dir)),
        _section("Retrieved samples", _samples_section(demo_dir, tasks=summary.get("tasks"))),
        _section("Report cards of the retrieved sets", _cards_section(demo_dir, tasks=summary.get("tasks"))),
        _section("Learned gate values", _gates_section(demo_dir)),
        _section("Training curves", _curves_section(demo_dir)),
        _section("Knowledge base and retrieval statistics", _statistics_section(demo_dir)),
        _section("Settings and versions", _settings_section(summary)),
    ]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>react-vl report: {_esc(demo_dir.name)}</title>"
        f"<style>{STYLE}</style><script>{PAGE_CHECK_SCRIPT}</script></head><body>"
        f"<h1>react-vl report</h1><p class=\"note\">{_esc(demo_dir.resolve())}, generated {generated}."
        " REACT: customize a CLIP model with pairs retrieved from a knowledge base for the target"
        " task's class names; the control tasks show what the customization costs elsewhere.</p>"
        + "".join(sections)
        + "<pre id=\"page-check\" hidden></pre></body></html>\n"
    )
    out = demo_dir / "report.html"
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
        tmp.chmod(0o644)  # a page to share; the temporary file starts private (0600)
    return out


# --- sections ------------------------------------------------------------------------------------
def _results_section(summary: dict) -> str:
    """Base vs each strategy per task, targets first, with deltas; then stage times."""
    tasks = summary.get("tasks")
    if not tasks:
        return _note("summary.json has no task results yet.")
    strategies = list(dict.fromkeys(
        name for result in tasks.values() for name, value in result.items()
        if name not in NOT_A_STRATEGY and _is_number(value)))
    header = ["task", "role", "metric", "base"] + strategies
    rows = []
    by_role = sorted(tasks.items(), key=lambda item: item[1].get("role") != "target")
    for task, result in by_role:
        base = result.get("base")
        cells = [_esc(task), _esc(result.get("role", "")), _esc(result.get("metric", "")), _num(base)]
        cells += [_with_delta(result.get(name), base) for name in strategies]
        rows.append((f" class=\"{_esc(result.get('role', ''))}\"", cells))
    body = _table(header, rows)
    if summary.get("class_prompt_cosine"):
        body += ("<h3>Mean cosine between class prompts (near 1: the text tower does not tell the classes "
                 "apart, and a locked text tower gives customization nothing to aim at)</h3>"
                 + _stats_html(summary["class_prompt_cosine"], counts_as_shares=False))
    if summary.get("ground_truth"):
        body += ("<h3>What the training sets hold (mini-world ground truth, never seen by retrieval)</h3>"
                 + _stats_html(summary["ground_truth"], counts_as_shares=False))
    if summary.get("stages"):
        stages = summary["stages"]
        stage_rows = [("", [_esc(name), _num(seconds)]) for name, seconds in stages.items()]
        total = sum(v for v in stages.values() if _is_number(v))
        stage_rows.append(("", ["<b>total</b>", f"<b>{_num(total)}</b>"]))
        body += "<h3>Wall time per stage (seconds)</h3>" + _table(["stage", "seconds"], stage_rows)
    return body


def _checks_section(summary: dict) -> str:
    """The precondition (validation sets, before customizing) and the bars (test sets), one row a criterion."""
    precondition, bars = summary.get("precondition"), summary.get("bars")
    if not precondition and not bars:
        return _note("summary.json has neither the precondition check nor the bars yet.")
    body = ""
    if precondition:
        body += (f"<h3>Precondition, validation sets: {'met' if precondition['passed'] else 'NOT met'}</h3>"
                 + _table(["task", "criterion", "value", "bar", ""],
                          [(f" class=\"{'pass' if c['passed'] else 'fail'}\"",
                            [_esc(c["task"]), _esc(c["criterion"]), _num(c["value"]), _esc(f"{c['op']} {c['bar']:g}"),
                             "ok" if c["passed"] else "<b>FAIL</b>"]) for c in precondition["criteria"]]))
    if bars:
        body += (f"<h3>Bars, test sets, this seed: {'met' if bars['passed'] else 'missed'}</h3>"
                 + _table(["task", "bar", "value", "needs", ""],
                          [(f" class=\"{'pass' if b['passed'] else 'fail'}\"",
                            [_esc(b["task"]), _esc(b["bar"]), f"{b['value']:+.1f}", _esc(f">= {b['min']:+g}"),
                             "ok" if b["passed"] else "<b>MISSED</b>"]) for b in bars["bars"]]))
    return body


def _per_class_section(demo_dir: Path) -> str:
    """Per-class accuracy of every evaluated model (eval/results.json): where a gain comes from."""
    zero_shot = (_read_json_or_none(demo_dir / "eval" / "results.json") or {}).get("zero_shot")
    if not zero_shot:
        return _note("eval/results.json not found or without zero-shot results.")
    body = _note("Accuracy in %; differences are to the first model (the base).")
    for task, by_model in zero_shot.items():
        per_class = {model: result.get("per_class_accuracy") or {} for model, result in by_model.items()}
        models = list(per_class)
        rows = []
        for name in dict.fromkeys(c for accuracies in per_class.values() for c in accuracies):
            values = [_percent(per_class[model].get(name)) for model in models]
            rows.append(("", [_esc(name), _num(values[0])] + [_with_delta(v, values[0]) for v in values[1:]]))
        body += f"<h3>{_esc(task)}</h3>" + _table(["class"] + models, rows)
    return body


def _samples_section(demo_dir: Path, tasks: dict | None) -> str:
    """Top-scored retrieved pairs per class, and the lowest-scored ones (the noise), per task.

    Only folders named after a task of summary.json get a grid (when it lists tasks); others,
    such as a merged set or a random control, are named in a note.
    """
    folders = sorted(p.parent for p in (demo_dir / "retrieved").glob("*/retrieved.parquet"))
    if not folders:
        return _note("no retrieved/<task>/retrieved.parquet found.")
    task_dirs = [f for f in folders if not tasks or f.name in tasks]
    others = [f.name for f in folders if f not in task_dirs]
    body = _note(f"also in retrieved/ (no grid, not a task): {', '.join(others)}.") if others else ""
    for task_dir in task_dirs:
        try:
            rows = pq.read_table(task_dir / "retrieved.parquet").to_pylist()
        except Exception as error:  # a corrupt parquet loses its task's grid, not the report
            body += f"<h3>{_esc(task_dir.name)}</h3>" + _note(f"unreadable retrieved.parquet: {error}")
            continue
        by_class = defaultdict(list)
        for row in rows:
            for name in row.get("classes") or ["(none)"]:
                by_class[name].append(row)
        shown = {name: sorted(group, key=_score, reverse=True)[:SAMPLES_PER_CLASS]
                 for name, group in sorted(by_class.items())}
        noise = sorted(rows, key=_score)[:NOISE_SAMPLES]
        images, skipped = _read_images([*noise, *(r for g in shown.values() for r in g)])
        body += f"<h3>{_esc(task_dir.name)}: {len(rows):,} retrieved pairs</h3>"
        for name, group in shown.items():
            body += (f"<p><b>{_esc(name)}</b>: {len(by_class[name]):,} pairs, best scored</p>"
                     + _sample_grid(group, images))
        body += "<p><b>Lowest-scored pairs</b> (the noise retrieval lets through)</p>"
        body += _sample_grid(noise, images)
        if skipped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.items())
            body += _note(f"images not shown: {reasons}.")
    return body


def _cards_section(demo_dir: Path, tasks: dict | None) -> str:
    """A report card per class (curation.report_cards) of each target task's retrieved set: what
    was retrieved, how much both modes agree, how the scores spread, how well the class prompts
    tell the classes apart and how many pairs the base's zero-shot classifier agrees with.

    The targets are the folders of retrieved/ named after a summary.json task of role target (all
    with a retrieve summary.json when summary.json lists no tasks); the KB is demo_dir/kb.
    """
    from .curation import report_cards
    from .kb import KnowledgeBase

    folders = sorted(p.parent for p in (demo_dir / "retrieved").glob("*/retrieved.parquet"))
    targets = [f for f in folders if (tasks.get(f.name) or {}).get("role") == "target"] if tasks else \
        [f for f in folders if (f / "summary.json").is_file()]
    if not targets:
        return _note("no retrieved set of a target task (retrieved/<task>/) found.")
    if not (demo_dir / "kb" / "kb.json").is_file():
        return _note("kb/kb.json not found: the report cards need the knowledge base the sets were retrieved from.")
    kb, body = KnowledgeBase(demo_dir / "kb"), ""
    for folder in targets:
        body += f"<h3>{_esc(folder.name)}</h3>"
        try:
            cards = report_cards(kb, folder)
        except Exception as error:  # a set this KB cannot explain loses its cards, not the report
            body += _note(f"no report cards: {error.args[0] if isinstance(error, KeyError) else error}")
            continue
        body += "".join(_note(note) for note in cards["notes"]) + _cards_table(cards)
    return _note("Precision is estimated as the share of a class's pairs that the base's zero-shot classifier"
                 " assigns to it; a prompt cosine above the warning level means the class's prompts barely"
                 " differ from another class's.") + body


def _cards_table(cards: dict) -> str:
    header = ["class", "pairs", "by mode", "both modes", "scores (t2t blue, t2i orange)",
              f"nearest class prompt cosine (warning > {cards['collapse_cosine']})", "est. precision",
              "most overlapping classes"]
    rows = []
    for card in cards["cards"]:
        cosine = "" if card["prompt_cosine"] is None else \
            f"{card['prompt_cosine']:.3f} ({_esc(card['nearest_class'])})"
        cosine = f"<span class=\"warn\">{cosine} collapse?</span>" if card["collapse"] else f"<span>{cosine}</span>"
        overlapping = ", ".join(f"{_esc(o['class'])} {100 * o['share']:.0f}%" for o in card["overlapping"])
        rows.append(("", [_esc(card["class"]), _num(card["count"]),
                          _esc(" / ".join(f"{mode} {n}" for mode, n in card["by_mode"].items())),
                          "" if card["overlap"] is None else f"{100 * card['overlap']:.0f}%",
                          "".join(_sparkline(counts, mode) for mode, counts in card["histogram"].items()),
                          cosine, "" if card["precision"] is None else f"{100 * card['precision']:.0f}%",
                          overlapping]))
    return _table(header, rows)


def _sparkline(counts: list[int], mode: str, width: int = 80, height: int = 20) -> str:
    """A score histogram as a tiny inline SVG bar chart (no image file, no script)."""
    top, bar = max([1, *counts]), width / max(1, len(counts))
    bars = "".join(f"<rect class=\"{_esc(mode)}\" x=\"{i * bar:.1f}\" y=\"{height - height * n / top:.1f}\" "
                   f"width=\"{max(1.0, bar - 1):.1f}\" height=\"{height * n / top:.1f}\"></rect>"
                   for i, n in enumerate(counts))
    return (f"<svg class=\"hist\" width=\"{width}\" height=\"{height}\" role=\"img\">"
            f"<title>{_esc(mode)} scores: {_esc(counts)}</title>{bars}</svg>")


def _gates_section(demo_dir: Path) -> str:
    """tanh(alpha) per gated layer after training, one panel per customization run."""
    gates_by_run = {}
    for run_dir in _run_dirs(demo_dir):
        summary = _read_json_or_none(run_dir / "summary.json") or {}
        gates = summary.get("final_gates")
        if not gates:  # a run stopped before its summary: the last gates it logged
            logged = [r["gates"] for r in _read_log(run_dir / "log.jsonl")[0] if r.get("gates")]
            gates = logged[-1] if logged else None
        if gates:
            gates_by_run[run_dir.name] = gates
    if not gates_by_run:
        return _note("no gate values logged (no gated customization run found).")
    figure = Figure(figsize=(4.2 * len(gates_by_run), 3.2), layout="constrained")
    for axis, (run, gates) in zip(figure.subplots(1, len(gates_by_run), squeeze=False)[0],
                                  gates_by_run.items()):
        layers = sorted(gates, key=int)
        positions = range(len(layers))
        axis.bar([p - 0.2 for p in positions], [gates[k]["attn"] for k in layers], 0.4, label="attention")
        axis.bar([p + 0.2 for p in positions], [gates[k]["dense"] for k in layers], 0.4, label="dense (MLP)")
        axis.set_xticks(list(positions), layers)
        axis.set(title=run, xlabel="image-tower layer", ylabel="tanh(alpha)")
        axis.axhline(0, color="black", linewidth=0.6)
        axis.legend(fontsize=8)
    return (_note("Gates start closed (0): the customized model begins as the base model; how far"
                  " each opens shows where the new knowledge went.")
            + _chart(figure, "gate values per layer"))


def _curves_section(demo_dir: Path) -> str:
    """Loss per step for base pretraining and every customization."""
    logs = {"base": demo_dir / "base" / "log.jsonl"}
    logs.update({run_dir.name: run_dir / "log.jsonl" for run_dir in _run_dirs(demo_dir)})
    records, bad_lines = {}, 0
    for name, path in logs.items():
        rows, bad = _read_log(path)
        bad_lines += bad
        if any("loss" in r for r in rows):
            records[name] = rows
    if not records:
        return _note("no training logs (base/log.jsonl, runs/<strategy>/log.jsonl) found.")
    figure = Figure(figsize=(3.6 * len(records), 3), layout="constrained")
    for axis, (name, rows) in zip(figure.subplots(1, len(records), squeeze=False)[0], records.items()):
        points = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
        axis.plot(*zip(*points))
        axis.set(title=name, xlabel="step", ylabel="contrastive loss")
    body = _chart(figure, "loss curves") + _runs_table(demo_dir)
    if bad_lines:
        body += _note(f"{bad_lines} unreadable log line(s) skipped.")
    return body


def _statistics_section(demo_dir: Path) -> str:
    """World, knowledge-base, index and per-task retrieval summaries, as written by each stage."""
    sources = [  # (title, file, whether its integer dicts are counts worth showing as shares)
        ("Mini world (concept counts per corpus)", demo_dir / "world" / "world.json", True),
        ("Knowledge base", demo_dir / "kb" / "kb.json", False),
        ("Embedding", demo_dir / "kb" / "embed_summary.json", True),
        ("Image index (text-to-image search)", demo_dir / "kb" / "image.index.json", False),
        ("Text index (text-to-text search)", demo_dir / "kb" / "text.index.json", False),
    ]
    sources += [(f"Retrieval for {p.parent.name}", p, True)
                for p in sorted((demo_dir / "retrieved").glob("*/summary.json"))]
    body = ""
    for title, path, counts_as_shares in sources:
        stats = _read_json_or_none(path)
        body += f"<h3>{_esc(title)}</h3>"
        if stats is None:
            body += _note(f"{path.relative_to(demo_dir)} not found.")
        else:
            body += _stats_html(stats, counts_as_shares)
    return body


def _settings_section(summary: dict) -> str:
    body = ""
    for key in ("settings", "versions"):
        body += f"<h3>{key.capitalize()}</h3>"
        if summary.get(key):
            body += _stats_html(summary[key], counts_as_shares=False)
        else:
            body += _note(f"summary.json has no {key}.")
    return body


# --- pieces --------------------------------------------------------------------------------------
def _runs_table(demo_dir: Path) -> str:
    """One column per customization run: its scalar summary fields (steps, time, trainable params)."""
    summaries = {d.name: _read_json_or_none(d / "summary.json") for d in _run_dirs(demo_dir)}
    summaries = {name: s for name, s in summaries.items() if s}
    if not summaries:
        return ""
    fields = list(dict.fromkeys(k for s in summaries.values() for k, v in s.items() if _is_scalar(v)))
    rows = [("", [_esc(field)] + [_html_value(s.get(field)) for s in summaries.values()]) for field in fields]
    return "<h3>Runs</h3>" + _table(["field", *summaries], rows)


def _read_images(rows: list[dict]) -> tuple[dict, Counter]:
    """Data URIs of the rows' images, read out of their source shards by key, one pass per shard."""
    wanted = defaultdict(set)
    for row in rows:
        wanted[row["shard"]].add(row["key"])
    images, skipped = {}, Counter()
    for shard, keys in wanted.items():
        path = Path(shard)  # absolute, as the knowledge base records it (data.list_shards)
        if not path.is_file():
            skipped["in missing shards"] += len(keys)
            continue
        shard_skips = SkipLog()
        found = {}
        for pair in read_shard(str(path), shard_skips):
            if pair.key in keys and pair.key not in found and (uri := _image_uri(pair.image)):
                found[pair.key] = uri
                if len(found) == len(keys):  # the rest of the shard holds nothing wanted
                    break
        images.update({(shard, key): uri for key, uri in found.items()})
        reason = "in corrupt shards" if shard_skips.counts["corrupt shard"] else "not found or undecodable"
        skipped[reason] += len(keys) - len(found)
    return images, +skipped


def _image_uri(data: bytes) -> str | None:
    """Re-encode as PNG (decodable by any browser) or None if the bytes are not an image."""
    buffer = io.BytesIO()
    try:
        decode_image(data).save(buffer, format="PNG")
    except Exception:  # PIL raises many kinds on corrupt data; any of them means "skip"
        return None
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _sample_grid(rows: list[dict], images: dict) -> str:
    figures = []
    for row in rows:
        uri = images.get((row["shard"], row["key"]))
        if uri is None:
            continue
        attributes = _parse_attributes(row.get("json"))
        kind = attributes.get("noise") or "noisy"  # the mini world names the kind: mismatched, irrelevant
        noisy = f" <span class=\"noisy\">{_esc(kind)} caption</span>" if attributes.get("noisy") else ""
        figures.append(
            f"<figure title=\"{_esc(json.dumps(attributes))}\"><img src=\"{uri}\" alt=\"{_esc(row['key'])}\">"
            f"<figcaption>score {_score(row):.3f} {_esc('+'.join(row.get('modes') or []))}{noisy}<br>"
            f"{_esc(row.get('caption', ''))}</figcaption></figure>")
    return f"<div class=\"grid\">{''.join(figures)}</div>" if figures else _note("no images could be read.")


def _score(row: dict) -> float:
    return row.get("score") or 0.0


def _parse_attributes(text) -> dict:
    try:
        attributes = json.loads(text) if text else {}
    except (TypeError, ValueError):
        return {}
    return attributes if isinstance(attributes, dict) else {}


def _stats_html(stats, counts_as_shares: bool = True) -> str:
    """Scalars as a key/value table; every flat dict of integer counts as its own table with shares."""
    scalars, count_tables = [], []

    def walk(value, path):
        if (counts_as_shares and isinstance(value, dict) and len(value) > 1
                and all(_is_number(v) and float(v).is_integer() and v >= 0 for v in value.values())):
            count_tables.append((path, value))
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else str(key))
        elif isinstance(value, list) and len(value) > 12:
            scalars.append((path, f"{len(value)} items: " + ", ".join(map(str, value[:12])) + ", ..."))
        else:
            scalars.append((path, value))

    walk(stats, "")
    body = _table(["field", "value"], [("", [_esc(k), _html_value(v)]) for k, v in scalars]) if scalars else ""
    tables = []
    for path, counts in count_tables:
        total = sum(counts.values())
        rows = [("", [_esc(name), _num(value), f"{100 * value / total:.1f}%" if total else ""])
                for name, value in counts.items()]
        tables.append(f"<div><b>{_esc(path)}</b>" + _table(["name", "count", "share"], rows) + "</div>")
    return body + (f"<div class=\"tables\">{''.join(tables)}</div>" if tables else "")


def _chart(figure: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img class=\"chart\" src=\"{uri}\" alt=\"{_esc(alt)}\">"


def _run_dirs(demo_dir: Path) -> list[Path]:
    return sorted(p for p in (demo_dir / "runs").glob("*") if p.is_dir())


def _read_log(path: Path) -> tuple[list[dict], int]:
    """The JSON lines of a training log, and how many lines were unreadable."""
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                bad += 1
    return rows, bad


def _read_json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _section(title: str, body: str) -> str:
    return f"<h2>{_esc(title)}</h2>{body}"


def _table(header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    lines = "".join(f"<tr{attrs}>" + "".join(_td(c) for c in cells) + "</tr>" for attrs, cells in rows)
    return f"<table><tr>{head}</tr>{lines}</table>"


def _td(cell: str) -> str:
    numeric = cell[:1].isdigit() or cell[:1] == "-"
    return f"<td class=\"num\">{cell}</td>" if numeric else f"<td>{cell}</td>"


def _html_value(value) -> str:
    """A table cell's HTML: numbers formatted, lists and dicts as JSON, text escaped."""
    if _is_number(value):
        return _num(value)
    if isinstance(value, (list, dict)):
        return _esc(json.dumps(value))
    return _esc("" if value is None else value)


def _num(value) -> str:
    if not _is_number(value):
        return ""
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.1f}"


def _with_delta(value, reference) -> str:
    """The value, and its difference to the reference in green (up) or red (down)."""
    if not (_is_number(value) and _is_number(reference)):
        return _num(value)
    delta = value - reference
    css = "up" if delta > 0 else "down" if delta < 0 else ""
    return f"{_num(value)} <span class=\"{css}\">({delta:+.1f})</span>"


def _percent(fraction):
    return 100 * fraction if _is_number(fraction) else None


def _note(text: str) -> str:
    return f"<p class=\"note\">{_esc(text)}</p>"


def _esc(value) -> str:
    return html.escape(str(value))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))
