"""`react-vl serve` on a real KB (a shard of the tiny world, embedded and indexed), a real
uvicorn server on a free localhost port: clip-retrieval's protocol, bad input, path traversal,
curation, report cards, a bounded load test, and the page in headless Chromium."""

import base64
import http.client
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from react_vl import curation
from react_vl.data import SkipLog, read_shard
from react_vl.kb import KnowledgeBase
from react_vl.models import load_model
from react_vl.serve import MAX_BODY_BYTES, MAX_NUM_IMAGES, Backend, create_app

TASK = "mini-shape-sketch"


@pytest.fixture(scope="module")
def world_kb(tiny_world, tmp_path_factory):
    """(KB path, retrieved set R): one kb shard embedded with random mini-vit-test, indexed, retrieved
    for mini-shape-sketch (random weights make every image a near-duplicate: no dedup)."""
    from react_vl.embed import embed_corpus
    from react_vl.index import build_indexes
    from react_vl.retrieve import retrieve

    root = tmp_path_factory.mktemp("serve")
    shards = [str(p) for p in sorted((tiny_world / "kb").glob("*.tar"))[:1]]
    embed_corpus(shards, "mini-vit-test", None, root / "kb", batch_size=256, workers=0, progress=False)
    build_indexes(root / "kb", n_queries=50)
    retrieve(root / "kb", TASK, root / "r", per_class=12, dedup_threshold=None)
    return root / "kb", root / "r"


@pytest.fixture(scope="module")
def server(world_kb):
    """The base URL of a uvicorn server in this process, serving the KB and R."""
    kb, retrieved = world_kb
    with _serving(create_app(Backend(kb), [retrieved])) as url:
        yield url


@contextmanager
def _serving(app):
    """The base URL of a uvicorn server in this process running `app` on a free localhost port."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    instance = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started and time.time() < deadline:
        time.sleep(0.05)
    assert instance.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        instance.should_exit = True
        thread.join(10)


def _copy_retrieved(retrieved: Path, out: Path) -> list[int]:
    """A copy of retrieved set `retrieved` (its parquet and summary, no curation) in `out`; its pair ids."""
    out.mkdir()
    for name in ("retrieved.parquet", "summary.json"):
        shutil.copy(retrieved / name, out / name)
    return pq.read_table(out / "retrieved.parquet", columns=["id"]).column("id").to_pylist()


def _post(url: str, body, content_type: str | None = None) -> tuple[int, object]:
    """POST a body (JSON-encoded unless bytes) the way ClipClient does (requests' data=: no content type)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": content_type} if content_type else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("content-type", "")


def _client_body(**query) -> dict:
    """The body clip-retrieval's ClipClient posts (clip_client.py), with its defaults."""
    return {"text": None, "image": None, "image_url": None, "embedding_input": None, "deduplicate": True,
            "use_safety_model": True, "use_violence_detector": True, "indice_name": "kb", "use_mclip": False,
            "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image", "num_images": 40,
            "num_result_ids": 40, **query}


def _normalise(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _text_embedding(kb: KnowledgeBase, texts: str | list[str]) -> np.ndarray:
    """The KB model's L2-normalised embedding of a text (or of each of a list)."""
    torch.manual_seed(0)  # the random mini-vit-test that embedded the KB
    model, _, tokenizer = load_model(kb.info["model"], kb.info["pretrained"])
    with torch.inference_mode():
        emb = _normalise(model.encode_text(tokenizer([texts] if isinstance(texts, str) else texts)).float().numpy())
    return emb[0] if isinstance(texts, str) else emb


def _shard_images(kb: KnowledgeBase) -> dict:
    """{id: image bytes} read from the corpus shards independently of the server."""
    meta = kb.metadata(["id", "key", "shard"]).to_pylist()
    by_key = {(p.shard, p.key): p.image for shard in {m["shard"] for m in meta} for p in read_shard(shard, SkipLog())}
    return {m["id"]: by_key[(m["shard"], m["key"])] for m in meta}


# --- the protocol ---------------------------------------------------------------------------------
@pytest.mark.parametrize("modality, stored", [("image", "img_emb"), ("text", "text_emb")])
def test_text_query_finds_the_exact_neighbours_with_metadata_and_images(server, world_kb, modality, stored):
    kb = KnowledgeBase(world_kb[0])
    text = "a pencil sketch of a circle."
    status, results = _post(f"{server}/knn-service", _client_body(text=text, modality=modality, num_images=5,
                                                                   num_result_ids=8, deduplicate=False))
    assert status == 200 and len(results) == 8
    scores = np.asarray(kb.image_embeddings() if stored == "img_emb" else kb.text_embeddings(), np.float32) \
        @ _text_embedding(kb, text)
    exact = kb.ids()[np.argsort(-scores)[:8]]
    assert [r["id"] for r in results] == exact.tolist()
    np.testing.assert_allclose([r["similarity"] for r in results], np.sort(scores)[::-1][:8], atol=2e-3)
    captions = dict(zip(kb.ids().tolist(), kb.metadata(["caption"]).column("caption").to_pylist()))
    images = _shard_images(kb)
    for result in results[:5]:
        assert result["caption"] == captions[result["id"]]
        assert base64.b64decode(result["image"]) == images[result["id"]]
        assert result["url"] == f"{server}/image/{result['id']}"
        status, data, kind = _get(result["url"])
        assert status == 200 and data == images[result["id"]] and kind == "image/png"
    assert all(set(r) == {"id", "similarity"} for r in results[5:]), "beyond num_images: ids and scores only"


def test_image_and_embedding_queries(server, world_kb):
    kb = KnowledgeBase(world_kb[0])
    pair = int(kb.ids()[7])
    image = base64.b64encode(_shard_images(kb)[pair]).decode()
    status, by_image = _post(f"{server}/knn-service", _client_body(image=image, num_images=3, deduplicate=False))
    assert status == 200 and by_image[0]["similarity"] > 0.99  # the image itself is in the KB
    stored = np.asarray(kb.embeddings_of("img_emb", [pair])[0], np.float32)
    status, by_embedding = _post(f"{server}/knn-service", _client_body(embedding_input=stored.tolist(),
                                                                       num_images=3, deduplicate=False))
    assert status == 200 and by_embedding[0]["similarity"] > 0.999
    assert pair in [r["id"] for r in by_embedding] or by_embedding[0]["similarity"] > 0.9999


def test_deduplicate_drops_near_duplicate_images(server, world_kb):
    kb = KnowledgeBase(world_kb[0])
    body = _client_body(text="a sketch of a star.", num_images=40)
    _, plain = _post(f"{server}/knn-service", {**body, "deduplicate": False})
    _, unique = _post(f"{server}/knn-service", body)
    assert len(unique) < len(plain) == 40, "random weights make most images near-duplicates"
    images = _normalise(np.asarray(kb.embeddings_of("img_emb", [r["id"] for r in unique]), np.float32))
    cosine = images @ images.T
    np.fill_diagonal(cosine, 0)
    assert cosine.max() < 0.94 + 1e-3
    assert unique[0]["id"] == plain[0]["id"], "the best-ranked copy stays"


def test_metadata_and_indices_list(server, world_kb):
    kb = KnowledgeBase(world_kb[0])
    ids = kb.ids()[[0, 5, -1]].tolist()
    unknown = 99 << 32  # part 99: not in the KB
    status, answer = _post(f"{server}/metadata", {"ids": ids + [unknown], "indice_name": "kb"})
    assert status == 200 and [a["id"] for a in answer] == ids + [unknown]
    truth = {r["id"]: r for r in kb.metadata().to_pylist()}
    assert all(a["metadata"] == truth[a["id"]] for a in answer[:3]) and answer[3]["metadata"] == {}
    status, body, _ = _get(f"{server}/indices-list")
    assert status == 200 and json.loads(body) == ["kb"]


def test_metadata_store_finds_ids_that_are_not_row_positions(tmp_path):
    from react_vl.kb import write_part
    from react_vl.serve import MetadataStore

    emb = np.eye(4, dtype=np.float32)
    ids = [(3 << 32) + 10, (3 << 32) + 2, (3 << 32) + 7, (3 << 32) + 0]  # explicit, out of row order
    write_part(tmp_path, 3, emb, emb, pa.table({"id": ids, "caption": list("abcd")}))
    write_part(tmp_path, 5, emb[:2], emb[:2], pa.table({"caption": ["e", "f"]}))  # ids from the row
    store = MetadataStore(KnowledgeBase(tmp_path), tmp_path / "cache")
    assert [m["caption"] for m in store.get(ids + [(5 << 32) + 1])] == list("abcdf")
    assert store.get([(3 << 32) + 1, (5 << 32) + 2, 7 << 32]) == [None, None, None]
    again = MetadataStore(KnowledgeBase(tmp_path), tmp_path / "cache")  # the copies are reused
    assert again.get([ids[0]])[0]["caption"] == "a"
    write_part(tmp_path, 3, emb, emb, pa.table({"id": ids, "caption": list("wxyz")}))  # re-embedded
    assert MetadataStore(KnowledgeBase(tmp_path), tmp_path / "cache").get([ids[0]])[0]["caption"] == "w"


# --- bad input and security -----------------------------------------------------------------------
BAD_QUERIES = [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"text": "x", "modality": "image", "num_images": 5, "indice_name": "laion5B"}, 404, "unknown indice_name"),
    ({"text": "x", "num_images": MAX_NUM_IMAGES + 1}, 400, "num_images must be between"),
    ({"text": "x", "num_images": "ten"}, 400, "num_images must be int"),
    ({"text": "x", "modality": "video"}, 400, "modality must be image or text"),
    ({"image": base64.b64encode(b"not an image at all").decode()}, 400, "does not decode"),
    ({"image": "%%% not base64 %%%"}, 400, "not valid base64"),
    ({"image_url": "http://127.0.0.1:9/cat.jpg"}, 403, "--allow-image-urls"),
    ({"embedding_input": [0.1, 0.2]}, 400, "dimensions"),
    ({"embedding_input": ["a", "b"]}, 400, "list of numbers"),
    ({}, 400, "the query is empty"),
]


@pytest.mark.parametrize("body, status, message", BAD_QUERIES)
def test_bad_queries_get_a_clear_4xx_and_the_server_goes_on(server, body, status, message):
    got, answer = _post(f"{server}/knn-service", body)
    assert got == status and message in answer["detail"], answer
    assert _get(f"{server}/indices-list")[0] == 200


def test_a_huge_image_in_a_small_file_is_refused_before_decoding(server):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buffer, format="PNG")  # 36M pixels in ~40 KB
    status, answer = _post(f"{server}/knn-service", {"image": base64.b64encode(buffer.getvalue()).decode()})
    assert status == 413 and "pixels" in answer["detail"] and len(buffer.getvalue()) < 200_000


def test_oversized_and_bulk_requests_are_refused(server):
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/knn-service")
    connection.putheader("Content-Length", str(MAX_BODY_BYTES + 10))
    connection.endheaders()  # answered from the headers: the body is never read
    response = connection.getresponse()
    assert response.status == 413 and "over" in json.loads(response.read())["detail"]
    status, answer = _post(f"{server}/metadata", {"ids": list(range(5000))})
    assert status == 413 and "at most" in answer["detail"]
    assert _get(f"{server}/image/99999999999")[0] == 404
    assert _get(f"{server}/indices-list")[0] == 200


def test_other_host_names_are_refused_on_localhost(server):
    """A page whose domain was re-pointed at 127.0.0.1 (DNS rebinding) sends its own Host: refused."""
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", "/indices-list", headers={"Host": f"attacker.example:{port}"})
    assert connection.getresponse().status == 400
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", "/indices-list", headers={"Host": f"localhost:{port}"})
    assert connection.getresponse().status == 200


TRAVERSALS = [
    "/static/../kb.json", "/static/..%2fkb.json", "/static/%2e%2e%2fkb.json", "/static/%252e%252e%252fkb.json",
    "/%2e%2e/%2e%2e/etc/passwd", "/../../../../etc/passwd", "//etc/passwd", "/image/..%2f..%2fetc%2fpasswd",
    "/image/1/../../kb.json", "/api/retrieved/..%2f..%2fetc/cards", "/api/retrieved/%2e%2e/cards",
    "/static/app.js/..%2f..%2f..%2fkb.json", "/static/....//....//kb.json", "/static/%c0%ae%c0%ae/kb.json",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal_is_refused(server, world_kb, path):
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", path)  # sent as written: no client-side normalisation
    response = connection.getresponse()
    body = response.read()
    assert 400 <= response.status < 500, (path, response.status)
    assert b"root:" not in body and b"text_tower_sha256" not in body and b'"model"' not in body


# --- curation -------------------------------------------------------------------------------------
def test_decisions_are_written_atomically_with_who_and_when(tmp_path):
    curation.record_decisions(tmp_path, [3, 1, 2], "reject", who="ana", scope={"class": "circle"})
    curation.record_decisions(tmp_path, [2], "accept", who="ben")
    assert curation.rejected_ids(tmp_path) == {1, 3}
    saved = json.loads((tmp_path / "curation.json").read_text())
    assert saved["decisions"]["2"]["who"] == "ben" and saved["decisions"]["1"]["when"].endswith("Z")
    assert [(a["decision"], a["pairs"]) for a in saved["log"]] == [("reject", 3), ("accept", 1)]
    with pytest.raises(ValueError, match="decision must be one of"):
        curation.record_decisions(tmp_path, [1], "delete")
    assert not list(tmp_path.glob(".curation.json.*.tmp"))


def test_concurrent_writers_lose_no_decision(tmp_path):
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: curation.record_decisions(tmp_path, [i], "reject", who=f"w{i % 3}"), range(40)))
    assert curation.rejected_ids(tmp_path) == set(range(40))
    assert len(json.loads((tmp_path / "curation.json").read_text())["log"]) == 40


def test_a_broken_curation_file_is_named(tmp_path):
    (tmp_path / "curation.json").write_text("[]")
    with pytest.raises(ValueError, match="not a curation file"):
        curation.rejected_ids(tmp_path)
    assert curation.rejected_ids(tmp_path / "none") == set()


def test_curation_through_the_server(server, world_kb, tmp_path):
    _, retrieved = world_kb
    status, view = _post(f"{server}/api/retrieved/r/curation", {"decision": "reject", "ids": [1]})
    assert status == 415, "a text/plain post (a cross-site form) must not curate"
    status, view = _get(f"{server}/api/retrieved/r/class?klass=circle")[:2]
    view = json.loads(view)
    assert status == 200 and view["count"] == len(view["pairs"]) > 0
    query = view["queries"][0]["query"]
    status, action = _post(f"{server}/api/retrieved/r/curation", {"decision": "reject", "class": "circle",
                                                                  "query": query, "who": "tester"}, "application/json")
    found_by_query = {p["id"] for p in view["pairs"] if query in p["queries"]}
    assert status == 200 and action["pairs"] == len(found_by_query) and action["who"] == "tester"
    assert found_by_query <= curation.rejected_ids(retrieved)
    status, action = _post(f"{server}/api/retrieved/r/curation", {"decision": "accept", "ids": sorted(found_by_query)},
                           "application/json")
    assert status == 200 and not curation.rejected_ids(retrieved) & found_by_query
    as_json = "application/json"
    assert _post(f"{server}/api/retrieved/r/curation", {"decision": "maybe", "ids": [1]}, as_json)[0] == 400
    assert _post(f"{server}/api/retrieved/nope/curation", {"decision": "reject", "ids": [1]}, as_json)[0] == 404


def test_lineage_names_the_sets_holding_a_pair(server, world_kb, tmp_path):
    _, retrieved = world_kb
    row = pq.read_table(retrieved / "retrieved.parquet").slice(0, 1).to_pylist()[0]
    status, body, _ = _get(f"{server}/api/lineage/{row['id']}")
    answer = json.loads(body)
    assert status == 200 and [s["set"] for s in answer["sets"]] == ["r"]
    assert answer["sets"][0]["classes"] == row["classes"] and len(answer["sets"][0]["retrieved_sha256"]) == 64
    assert json.loads(_get(f"{server}/api/lineage/{99 << 32}")[1])["sets"] == []
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(retrieved / "retrieved.parquet", copy / "retrieved.parquet")
    before = curation.fingerprint(copy)
    curation.record_decisions(copy, [row["id"]], "reject", who="t")
    after = curation.fingerprint(copy)
    assert before["curation_sha256"] is None and after["curation_sha256"] and \
        before["retrieved_sha256"] == after["retrieved_sha256"]
    assert curation.sets_holding([row["id"], 99 << 32], {"copy": copy})["copy"][0]["decision"] == "reject"


@pytest.fixture(scope="module")
def trained_run(world_kb, tiny_world, tmp_path_factory):
    """(R, RUNS, ids, sha256): a copy R of the retrieved set with its first pair rejected,
    materialized and trained on for 2 steps (mini-vit-test gated-image, a quarter of each batch
    mixed in from the world's pretraining shards) into RUNS/gated; ids: R's pair ids in file order;
    sha256: of R's retrieved.parquet and curation.json then (tests change them later)."""
    import hashlib

    from react_vl.materialize import materialize
    from react_vl.train import TrainConfig, train

    kb, retrieved = world_kb
    root = tmp_path_factory.mktemp("lineage")
    copy = root / "trained"
    ids = _copy_retrieved(retrieved, copy)
    curation.record_decisions(copy, ids[:1], "reject", who="ana")
    sha256 = {f"{name}_sha256": hashlib.sha256((copy / f"{name}.{ext}").read_bytes()).hexdigest()
              for name, ext in (("retrieved", "parquet"), ("curation", "json"))}
    materialize(copy, root / "shards", kb=kb, progress=False)
    train(TrainConfig(str(root / "shards"), root / "runs" / "gated", model="mini-vit-test", steps=2, batch_size=8,
                      workers=1, mix_shards=str(tiny_world / "pretrain"), mix_ratio=0.25, text_embeddings=False,
                      log_every=1, checkpoint_every=2))
    return copy, root / "runs", ids, sha256


def test_materialize_and_train_record_the_lineage(trained_run, tiny_world):
    from react_vl.models import read_checkpoint_meta

    retrieved, runs, _, sha256 = trained_run
    shards = runs.parent / "shards"
    recorded = {"retrieved": str(retrieved.resolve()), "fingerprint": sha256}
    assert json.loads((shards / "summary.json").read_text())["lineage"] == recorded
    expected = [{"shards": str(shards), **recorded},
                {"shards": str(tiny_world / "pretrain"), "retrieved": None, "fingerprint": None}]
    assert read_checkpoint_meta(runs / "gated" / "model.pt")["lineage"] == expected
    assert json.loads((runs / "gated" / "summary.json").read_text())["lineage"] == expected


def test_lineage_names_the_runs_trained_on_a_pair(world_kb, trained_run):
    kb, retrieved = world_kb
    copy, runs, ids, _ = trained_run
    outsider = next(i for i in KnowledgeBase(kb).metadata(["id"]).column("id").to_pylist() if i not in ids)
    with _serving(create_app(Backend(kb), [retrieved, copy], runs=[runs])) as url:
        answer = json.loads(_get(f"{url}/api/lineage/{ids[1]}")[1])
        assert [s["set"] for s in answer["sets"]] == ["r", "trained"]
        assert [(r["run"], r["set"], r["standing"], r["used"]) for r in answer["runs"]] == \
            [("gated", "trained", "unchanged", True)]
        assert [u["why"] for u in answer["untraced"]] == ["shards not materialized from a retrieved set"]
        rejected = json.loads(_get(f"{url}/api/lineage/{ids[0]}")[1])
        assert [(r["run"], r["used"]) for r in rejected["runs"]] == [("gated", False)], "rejected: left out"
        assert json.loads(_get(f"{url}/api/lineage/{outsider}")[1])["runs"] == []

        status, takedown = _post(f"{url}/api/lineage", {"ids": [outsider, ids[2], ids[0], ids[1]]})
        assert status == 200 and len(takedown["runs"]) == 1
        assert takedown["runs"][0]["used"] == sorted(ids[1:3]) and takedown["runs"][0]["rejected"] == ids[:1]
        assert sorted(takedown["sets"]) == ["r", "trained"]
        assert _post(f"{url}/api/lineage", {"ids": [outsider]})[1]["runs"] == []

        originals = {name: (copy / name).read_bytes() for name in ("retrieved.parquet", "curation.json")}
        try:
            curation.record_decisions(copy, ids[3:4], "reject", who="ben")  # after the run: not what it saw
            changed = json.loads(_get(f"{url}/api/lineage/{ids[1]}")[1])["runs"]
            assert [(r["standing"], r["used"]) for r in changed] == [("curation changed", None)]
            table = pq.read_table(copy / "retrieved.parquet")
            pq.write_table(table.slice(1), copy / "retrieved.parquet")  # retrieved again: other pairs
            changed = _post(f"{url}/api/lineage", {"ids": ids[1:3]})[1]["runs"]
            assert [(r["set"], r["standing"], r["possibly"]) for r in changed] == \
                [("r", "curation changed", ids[1:3])], "r holds the very pairs the run's set held"
            listed = json.loads(_get(f"{url}/api/runs")[1])
            assert [(r["run"], [e["set"] for e in r["lineage"]]) for r in listed] == [("gated", ["r", None])]
            assert json.loads(_get(f"{url}/api/info")[1])["runs"] == ["gated"]
            entry = json.loads((runs / "gated" / "summary.json").read_text())["lineage"][0]
            assert curation.standing(entry, {"trained": copy}, {"trained": curation.fingerprint(copy)}) == \
                ("trained", "set changed")
            assert curation.standing(entry, {"r": retrieved}, {"r": {"retrieved_sha256": "other"}}) is None
        finally:  # as trained on, for the page test
            for name, data in originals.items():
                (copy / name).write_bytes(data)


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not JSON"), ({"ids": "1,2"}, 400, "ids must be a list"), ({"ids": []}, 400, "non-empty"),
    ({"ids": [1, "2"]}, 400, "integers"), ({"ids": list(range(100_001))}, 413, "send the list in parts")])
def test_bad_takedown_lists_get_a_clear_4xx(server, body, status, message):
    got, answer = _post(f"{server}/api/lineage", body)
    assert got == status and message in answer["detail"]


def test_runs_folder_without_runs_is_named(tmp_path):
    from react_vl.curation import find_runs

    with pytest.raises(FileNotFoundError, match="no run in it"):
        find_runs([tmp_path])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        find_runs([tmp_path / "nowhere"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        find_runs([tmp_path])


def test_class_view_ranks_each_mode_and_shows_the_noise(world_kb):
    _, retrieved = world_kb
    rows = [r for r in pq.read_table(retrieved / "retrieved.parquet").to_pylist() if "circle" in r["classes"]]
    view = curation.class_pairs(retrieved, "circle", limit=5, noise=3)
    assert view["count"] == len(rows) and len(view["pairs"]) == 5 and len(view["noise"]) == 3
    every = curation.class_pairs(retrieved, "circle", noise=0)["pairs"]
    for mode in ("t2t", "t2i"):
        found = sorted((p for p in every if mode in p["scores"]), key=lambda p: p["ranks"][mode])
        assert [p["ranks"][mode] for p in found] == list(range(1, len(found) + 1))
        assert all(a["scores"][mode] >= b["scores"][mode] for a, b in zip(found, found[1:]))
    assert view["noise"] == every[-3:]
    assert all(set(p["queries"]) <= {f.format("circle") for f in _templates()} for p in every)


def _templates():
    from react_vl.tasks import get_task
    return get_task(TASK).templates


# --- report cards ---------------------------------------------------------------------------------
def test_report_cards_count_what_the_retrieved_file_holds(world_kb):
    kb_path, retrieved = world_kb
    kb = KnowledgeBase(kb_path)
    rows = pq.read_table(retrieved / "retrieved.parquet").to_pylist()
    result = curation.report_cards(kb, retrieved)
    cards = {c["class"]: c for c in result["cards"]}
    assert result["task"] == TASK and set(cards) == set(_task().classnames)
    classifier = _normalise(np.stack([_text_embedding(kb, _task().prompts(name)).mean(0)
                                      for name in _task().classnames]))
    for name, card in cards.items():
        mine = [r for r in rows if name in r["classes"]]
        assert card["count"] == len(mine)
        assert card["by_mode"] == {m: sum(r[f"score_{m}"] is not None for r in mine) for m in ("t2t", "t2i")}
        assert card["both_modes"] == sum(len(r["modes"]) == 2 for r in mine)
        assert {m: sum(h) for m, h in card["histogram"].items()} == card["by_mode"]
        assert card["collapse"] == (card["prompt_cosine"] > curation.COLLAPSE_COSINE) and card["nearest_class"] != name
        if mine:
            images = np.asarray(kb.embeddings_of("img_emb", [r["id"] for r in mine]), np.float32)
            agree = np.mean(np.array(_task().classnames)[np.argmax(images @ classifier.T, axis=1)] == name)
            assert card["precision"] == pytest.approx(agree, abs=1e-4)
    assert len(result["bin_edges"]["t2t"]) == curation.HISTOGRAM_BINS + 1


def _task():
    from react_vl.tasks import get_task
    return get_task(TASK)


def test_report_cards_list_the_most_overlapping_classes(world_kb, tmp_path):
    kb_path, retrieved = world_kb
    ids = KnowledgeBase(kb_path).ids()[:6].tolist()
    classes = [["circle", "square"]] * 3 + [["circle", "star"], ["circle"], ["square", "star", "circle"]]
    pq.write_table(pa.table({"id": ids, "caption": ["c"] * 6, "classes": classes, "modes": [["t2t"]] * 6,
                             "score": [0.5] * 6}), tmp_path / "retrieved.parquet")
    shutil.copy(retrieved / "summary.json", tmp_path / "summary.json")
    cards = {c["class"]: c for c in curation.report_cards(kb_path, tmp_path)["cards"]}
    assert cards["circle"]["overlapping"] == [{"class": "square", "shared": 4, "share": round(4 / 6, 4)},
                                              {"class": "star", "shared": 2, "share": round(2 / 6, 4)}]
    assert cards["square"]["count"] == 4 and cards["circle"]["both_modes"] is None
    assert cards["triangle"]["count"] == 0 and cards["triangle"]["precision"] is None


def test_cards_through_the_server(server):
    status, body, _ = _get(f"{server}/api/retrieved/r/cards")
    assert status == 200 and len(json.loads(body)["cards"]) == len(_task().classnames)


# --- load ------------------------------------------------------------------------------------------
def test_fifty_concurrent_queries_all_answer(server):
    """A bounded local load test: 50 text queries at once (ClipClient bodies, 10 images each)."""
    def one(i):
        started = time.perf_counter()
        status, results = _post(f"{server}/knn-service", _client_body(text=f"a sketch of shape {i}", num_images=10,
                                                                       num_result_ids=10))
        return status, len(results), time.perf_counter() - started

    alone = np.array([one(i)[2] for i in range(10)]) * 1000
    started = time.perf_counter()
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(one, range(50)))
    wall = time.perf_counter() - started
    assert all(status == 200 and n > 0 for status, n, _ in answers)
    latency = np.array([t for _, _, t in answers]) * 1000
    print(f"\n50 concurrent queries: p50 {np.percentile(latency, 50):.0f} ms, p95 {np.percentile(latency, 95):.0f} ms, "
          f"{50 / wall:.0f} queries/s; one at a time: p50 {np.percentile(alone, 50):.0f} ms")


# --- the command ----------------------------------------------------------------------------------
def test_cli_serves_and_warns_off_localhost(world_kb, trained_run, free_port):
    kb, retrieved = world_kb
    port = free_port
    process = subprocess.Popen([sys.executable, "-m", "react_vl.cli", "serve", str(kb), "--retrieved", str(retrieved),
                                "--host", "0.0.0.0", "--port", str(port), "--runs", str(trained_run[1])],
                               stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "Uvicorn running" in line or "Traceback" in line:
                break
        assert any("warning: serving on 0.0.0.0" in line for line in lines), lines
        status, body, _ = _get(f"http://127.0.0.1:{port}/indices-list")
        assert status == 200 and json.loads(body) == ["kb"]
        assert [r["run"] for r in json.loads(_get(f"http://127.0.0.1:{port}/api/runs")[1])] == ["gated"]
    finally:
        process.terminate()
        process.wait(10)


# --- the page, in headless Chromium ----------------------------------------------------------------
class DevTools:
    """A headless Chromium page driven over the DevTools protocol; script errors are collected."""

    def __init__(self, chromium: str, profile: Path):
        import websocket

        self.process = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "--remote-allow-origins=*", "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = profile / "DevToolsActivePort", time.time() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1) and time.time() < deadline:
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=30).read())
        page = next(p for p in pages if p["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id, self.errors = 0, []
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]
            self._event(message)

    def _event(self, message: dict):
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.errors.append(params["exceptionDetails"].get("exception", {}).get("description", str(params)))
        elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
            self.errors.append(str(params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(params["entry"]["text"] + " " + params["entry"].get("url", ""))

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        page = self.evaluate("document.body.innerText")[:500]
        raise AssertionError(f"timed out waiting for {expression}; the page reads: {page}")

    def close(self):
        self.socket.close()
        self.process.terminate()
        self.process.wait(10)


LOADED = """(() => { const images = [...document.querySelectorAll('%s .result img')];
  return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0) && images.length; })()"""


def test_page_searches_from_the_url_by_click_and_curates(server, world_kb, chromium, tmp_path):
    _, retrieved = world_kb
    browser, pair = DevTools(chromium, tmp_path / "profile"), None
    try:
        browser.send("Page.navigate", url=f"{server}/?query=a+pencil+sketch+of+a+circle.&modality=image&num=12")
        assert browser.wait_for(LOADED % "#results") == 12
        first = browser.evaluate("document.querySelector('#results .result').dataset.id")
        browser.evaluate("document.querySelector('#results .result').click()")
        browser.wait_for(f"location.search.includes('id={first}') && "
                         f"document.querySelector('#results h2')?.textContent.includes('pair {first}')")
        assert browser.wait_for(LOADED % "#results") == 12
        assert browser.evaluate("document.querySelector('#results .result').dataset.id") == first, "itself first"
        screenshot = browser.send("Page.captureScreenshot", format="png")["data"]
        Path("/tmp/serve.png").write_bytes(base64.b64decode(screenshot))

        query_image = tmp_path / "query.png"
        query_image.write_bytes(_shard_images(KnowledgeBase(world_kb[0]))[int(first)])
        document = browser.send("DOM.getDocument")["root"]["nodeId"]
        upload = browser.send("DOM.querySelector", nodeId=document, selector="#image-file")["nodeId"]
        browser.send("DOM.setFileInputFiles", files=[str(query_image)], nodeId=upload)
        browser.wait_for("document.querySelector('#results h2')?.textContent.includes('query.png')")
        assert browser.wait_for(LOADED % "#results") == 12, "an uploaded image is a query too"

        browser.send("Page.navigate", url=f"{server}/?set=r")
        browser.wait_for("document.querySelectorAll('table.cards tr').length > 1")
        browser.evaluate("[...document.querySelectorAll('table.cards a')].find(a => a.textContent == 'circle').click()")
        browser.wait_for(LOADED % "#class-view")
        pair = int(browser.evaluate("document.querySelector('#class-view .result').dataset.id"))
        browser.evaluate("localStorage.setItem('curator', 'chromium')")
        browser.evaluate("document.querySelector('#class-view .result button').click()")  # reject
        browser.wait_for(f"document.querySelector('#class-view .result[data-id=\"{pair}\"]')"
                         f"?.classList.contains('rejected')")
        assert pair in curation.rejected_ids(retrieved)
        assert json.loads((retrieved / "curation.json").read_text())["decisions"][str(pair)]["who"] == "chromium"
        assert browser.errors == []
    finally:
        browser.close()
        if pair is not None:
            curation.record_decisions(retrieved, [pair], "accept", who="test cleanup")


def test_page_names_the_runs_under_each_pair(world_kb, trained_run, chromium, tmp_path):
    kb, _ = world_kb
    copy, runs, ids, _ = trained_run
    with _serving(create_app(Backend(kb), [copy], runs=[runs])) as url:
        browser = DevTools(chromium, tmp_path / "profile")
        try:
            browser.send("Page.navigate", url=f"{url}/?set=trained&class=circle")
            lines = browser.wait_for("""(() => { const cards = [...document.querySelectorAll('#class-view .result')];
              return cards.length && cards.every(c => c.querySelector('.lineage')) &&
                cards.map(c => [Number(c.dataset.id), c.querySelector('.lineage').textContent]); })()""")
            assert "trained into gated" in {text for _, text in lines}
            assert {text for _, text in lines} <= {"trained into gated", "in no run"}
            assert all((text == "in no run") == (pair == ids[0]) for pair, text in lines), lines
            assert browser.errors == []
        finally:
            browser.close()


def test_broken_images_are_hidden(server, chromium, tmp_path):
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        browser.send("Page.navigate", url=f"{server}/?query=a+star&num=3")
        browser.wait_for(LOADED % "#results")
        hidden = browser.evaluate("""(async () => { const img = document.querySelector('#results .result img');
          img.src = '/image/999999999999'; await new Promise(r => setTimeout(r, 1500)); return img.hidden; })()""")
        assert hidden is True
        assert all("999999999999" in error for error in browser.errors), browser.errors  # only the planted 404
    finally:
        browser.close()


def test_materialize_leaves_out_the_rejected_pairs_and_counts_them(world_kb, tmp_path):
    from react_vl.materialize import materialize

    kb, retrieved = world_kb
    curated = tmp_path / "r"
    ids = _copy_retrieved(retrieved, curated)
    curation.record_decisions(curated, ids[:3], "reject", who="ana")
    curation.record_decisions(curated, ids[2:3], "accept", who="ben")  # the latest decision counts
    summary = materialize(curated, tmp_path / "shards", kb=kb, progress=False)
    written = {json.loads(pair.extra["json"])["id"] for shard in summary["shards"]
               for pair in read_shard(str(tmp_path / "shards" / shard), SkipLog())}
    assert written == set(ids) - set(ids[:2])
    assert summary["rejected_by_curation"] == 2 and summary["count"] == len(ids) - 2
