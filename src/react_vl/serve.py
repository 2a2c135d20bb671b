"""Serve a knowledge base over HTTP: clip-retrieval's kNN protocol, a browser page, curation.

    react-vl serve KB --retrieved R --port 1234       # then open http://127.0.0.1:1234/

The protocol is clip-retrieval's back (`clip_back.py`), so its `ClipClient` and front work
against it unchanged:

    POST /knn-service  {text | image (base64) | image_url | embedding_input, modality (image: the
                        image index, text: the caption index), num_images, num_result_ids,
                        deduplicate, indice_name}
                       -> [{id, similarity, caption, url, key, image (base64 bytes)}, ...]:
                          num_result_ids results, the first num_images with their metadata
    POST /metadata     {ids, indice_name} -> [{id, metadata: {...}}, ...]
    GET  /indices-list -> [the KB folder's name]

Text and image queries are encoded with the KB's own model (kb.json); the FAISS indexes are
memory-mapped (index.load_index). Metadata is read by id from memory-mapped Arrow copies of the
KB's metadata parts (KB/serve-cache/, made once, as clip-back's --use_arrow does). Images are
read from the corpus shards the KB metadata names, by the pair's id, never by a client-given
path: GET /image/{id}. `url` is the metadata's own url column when the KB has one (LAION), else
this server's /image/{id}. `image_url` queries download from the network, so they are refused
unless the server was started with allow_image_urls. `deduplicate` drops results whose image is
within DEDUP_THRESHOLD cosine of a better-ranked one's. use_mclip, safety and aesthetic options
of clip-retrieval are accepted and ignored (no such models here); `inline_images: false` (not
clip-retrieval's) leaves the image bytes out. Bad requests get a 4xx with what is wrong:
malformed JSON, unknown index, counts over the MAX_ limits, undecodable or oversized images,
bodies over MAX_BODY_BYTES; on localhost only localhost Host headers are answered.

The page (GET /) and its /api/ routes add what REACT needs: with retrieved sets, a per-class
view of the pairs, report cards (curation.report_cards), reject/accept decisions written to
R/curation.json (curation.record_decisions), which materialize honours, and lineage: with
training runs (`runs`, RUN/model.pt records the retrieved sets it was trained on), GET
/api/lineage/{id} names the served sets holding a pair and the runs trained on it, POST
/api/lineage {ids} does so for a takedown list, GET /api/runs lists the runs and how their
retrieved sets stand (curation.runs_using).
"""

import base64
import io
import sys
import tarfile
import threading
import urllib.request
from functools import lru_cache
from importlib import resources
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .data import IMAGE_EXTS, SkipLog, decode_image, open_shard, read_shard
from .kb import PART_BITS, KnowledgeBase, make_ids
from .retrieve import DEDUP_THRESHOLD  # clip-back's near-duplicate cosine, here over the results' images

MAX_NUM_IMAGES = 1_000       # results with metadata (and image bytes) per query
MAX_RESULT_IDS = 10_000      # ids searched per query
MAX_METADATA_IDS = 1_000     # ids per /metadata request
MAX_LINEAGE_IDS = 100_000    # pair ids per takedown list (POST /api/lineage)
MAX_BODY_BYTES = 16 * 2**20  # request bodies (a base64 image query included) and downloaded images
MAX_QUERY_PIXELS = 25_000_000  # a query image's width x height, read from its header before decoding
URL_TIMEOUT_S = 10
CACHE_DIR = "serve-cache"
RESULT_COLUMNS = ("caption", "url", "key")  # metadata columns a kNN result carries
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MEDIA_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp",
               "bmp": "image/bmp", "gif": "image/gif", "tif": "image/tiff", "tiff": "image/tiff"}


class BadRequest(ValueError):
    """A client error: answered with its HTTP status and message, the server goes on."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# --- metadata by id ------------------------------------------------------------------------------
def _arrow_copy(parquet: Path, arrow: Path) -> pa.Table:
    """A memory-mapped Arrow IPC copy of one metadata part, (re)written when the parquet changed."""
    from .utils import atomic_path

    stamp = f"{parquet.stat().st_size}:{parquet.stat().st_mtime_ns}".encode()
    if arrow.exists():
        table = pa.ipc.open_file(pa.memory_map(str(arrow), "r")).read_all()
        if (table.schema.metadata or {}).get(b"react_vl_source") == stamp:
            return table
    source = pq.ParquetFile(parquet)
    schema = source.schema_arrow.with_metadata({b"react_vl_source": stamp})
    with atomic_path(arrow) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for batch in source.iter_batches(batch_size=65_536):
            writer.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=schema))
    return pa.ipc.open_file(pa.memory_map(str(arrow), "r")).read_all()


class MetadataStore:
    """Each KB part's metadata, memory-mapped, and the row of any id (its part is id >> PART_BITS)."""

    def __init__(self, kb: KnowledgeBase, cache_dir: Path):
        from tqdm import tqdm

        self.tables, self.sorted_ids = {}, {}
        for part in tqdm(kb.parts, desc="metadata (memory-mapped copies)", unit="part", disable=len(kb.parts) < 20):
            table = _arrow_copy(kb.metadata_path(part), cache_dir / f"metadata_{part}.arrow")
            if "id" not in table.column_names:
                table = table.append_column("id", pa.array(make_ids(part, table.num_rows)))
            ids = table.column("id").to_numpy()
            if not np.array_equal(ids, make_ids(part, len(ids))):  # ids not positional: look them up
                order = np.argsort(ids)
                self.sorted_ids[part] = (ids[order], order)
            self.tables[part] = table

    def row(self, pair_id: int) -> tuple[int, int] | None:
        """(part, row) of an id, None when no part holds it."""
        part = pair_id >> PART_BITS
        table = self.tables.get(part)
        if table is None:
            return None
        if part in self.sorted_ids:
            ids, order = self.sorted_ids[part]
            at = int(np.searchsorted(ids, pair_id))
            return (part, int(order[at])) if at < len(ids) and ids[at] == pair_id else None
        row = pair_id - (part << PART_BITS)
        return (part, row) if 0 <= row < table.num_rows else None

    def get(self, ids: list[int], columns=None) -> list[dict | None]:
        """Each id's metadata (the given columns where present), None for an unknown id."""
        out = []
        for pair_id in ids:
            found = self.row(pair_id)
            if found is None:
                out.append(None)
                continue
            table = self.tables[found[0]]
            names = [c for c in (columns or table.column_names) if c in table.column_names]
            out.append({name: table.column(name)[found[1]].as_py() for name in names})
        return out


# --- images by id, from the corpus shards ----------------------------------------------------------
@lru_cache(maxsize=64)
def _tar_members(shard: str) -> dict:
    """{key: (offset, size, extension)} of a plain tar shard's images, read from its headers only."""
    from webdataset.tariterators import base_plus_ext

    members = {}
    with open_shard(shard) as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
        for member in tar:
            key, ext = base_plus_ext(member.name)
            if member.isfile() and key and ext.lower() in IMAGE_EXTS:
                members.setdefault(key, (member.offset_data, member.size, ext.lower()))
    return members


@lru_cache(maxsize=256)
def shard_image(shard: str, key: str) -> tuple[bytes, str] | None:
    """(bytes, extension) of the image of `key` in a corpus shard; None when it is not there.

    Plain tars are read at the member's offset; other shards (parquet, image folders,
    compressed tars) are read through data.read_shard up to the key.
    """
    if shard.endswith(".tar"):
        try:
            found = _tar_members(shard).get(key)
        except (OSError, tarfile.TarError):
            return None
        if found is None:
            return None
        offset, size, ext = found
        with open_shard(shard) as stream:
            stream.seek(offset)
            return stream.read(size), ext
    for pair in read_shard(shard, SkipLog()):
        if pair.key == key:
            return pair.image, pair.image_ext
    return None


# --- the searcher ----------------------------------------------------------------------------------
def _normalised(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm == 0, 1, norm)).astype(np.float32)


class Backend:
    """One KB, searchable: its model (the one kb.json names), indexes, metadata and images."""

    def __init__(self, kb_path: str | Path, cache_dir: str | Path | None = None):
        import torch

        from .index import load_index
        from .models import load_model

        self.kb = KnowledgeBase(kb_path)
        self.name = self.kb.path.resolve().name
        model, pretrained = self.kb.info.get("model"), self.kb.info.get("pretrained")
        if not model:
            raise ValueError(f"{self.kb.path}/kb.json records no model: queries must be encoded with the model that "
                             f"embedded the KB (write it with `react-vl index {self.kb.path} --model NAME`)")
        torch.manual_seed(0)  # as embed and retrieve: a randomly initialised model is the one that embedded the KB
        self.model, self.preprocess, self.tokenizer = load_model(model, pretrained)
        self.model.eval()
        self.indexes = {kind: load_index(self.kb, kind) for kind in ("image", "text")
                        if (self.kb.path / f"{kind}.index").exists()}
        if not self.indexes:
            raise FileNotFoundError(f"{self.kb.path} has no image.index or text.index: run `react-vl index "
                                    f"{self.kb.path}` first")
        cache = Path(cache_dir) if cache_dir else self.kb.path / CACHE_DIR
        try:
            self.metadata = MetadataStore(self.kb, cache)
        except PermissionError as err:
            raise PermissionError(f"cannot write the metadata copies to {cache} ({err}); give a writable folder "
                                  f"with --cache-dir") from err
        self._model_lock = threading.Lock()  # one forward pass at a time: torch already uses every core

    def encode_text(self, text: str) -> np.ndarray:
        import torch

        with self._model_lock, torch.inference_mode():
            return _normalised(self.model.encode_text(self.tokenizer([text])).float().numpy())

    def encode_image(self, data: bytes) -> np.ndarray:
        import torch

        try:
            with Image.open(io.BytesIO(data)) as header:
                pixels = header.width * header.height
            if pixels > MAX_QUERY_PIXELS:  # a small file can hold a huge image: refused before decoding
                raise BadRequest(f"the query image has {pixels:,} pixels, over {MAX_QUERY_PIXELS:,}; send it "
                                 f"downscaled (it is resized to the model's input anyway)", 413)
            image = decode_image(data)
        except BadRequest:
            raise
        except Exception as err:  # noqa: BLE001 - any undecodable upload is the client's error
            raise BadRequest(f"the query image does not decode ({type(err).__name__}: {err}); send PNG, JPEG or "
                             f"WebP bytes, base64-encoded") from err
        with self._model_lock, torch.inference_mode():
            return _normalised(self.model.encode_image(self.preprocess(image).unsqueeze(0)).float().numpy())

    def embedding(self, pair_id: int, kind: str = "img_emb") -> np.ndarray:
        """A KB pair's stored embedding (img_emb or text_emb), as a (1, dim) float32 query."""
        found = self.metadata.row(pair_id)
        if found is None:
            raise BadRequest(f"no pair with id {pair_id} in {self.name}", 404)
        return _normalised(np.asarray(self.kb.part_embeddings(kind, found[0])[found[1]:found[1] + 1], np.float32))

    def search(self, query: np.ndarray, modality: str, num_result_ids: int, deduplicate: bool):
        """(ids, similarities) of the nearest pairs, best first; near-duplicate images dropped when asked."""
        index = self.indexes.get(modality)
        if index is None:
            raise BadRequest(f"{self.name} has no {modality} index (it has: {', '.join(self.indexes)})")
        if query.shape[1] != index.d:
            raise BadRequest(f"the query embedding has {query.shape[1]} dimensions, {self.name} holds {index.d}")
        scores, ids = index.search(query, num_result_ids)
        found = ids[0] >= 0
        ids, scores = ids[0][found], scores[0][found]
        if deduplicate and len(ids) > 1:
            keep = ~self._duplicates(ids)
            ids, scores = ids[keep], scores[keep]
        return ids.tolist(), scores.tolist()

    def _duplicates(self, ids: np.ndarray) -> np.ndarray:
        """Results whose image is within DEDUP_THRESHOLD cosine of a better-ranked result's."""
        images = np.concatenate([self.embedding(int(i)) for i in ids])
        flat = faiss.IndexFlatIP(images.shape[1])
        flat.add(images)
        limits, _, neighbours = flat.range_search(images, DEDUP_THRESHOLD)
        removed = np.zeros(len(ids), dtype=bool)
        for i in range(len(ids)):
            if not removed[i]:
                near = neighbours[limits[i]:limits[i + 1]]
                removed[near[near > i]] = True
        return removed

    def image(self, pair_id: int) -> tuple[bytes, str]:
        """(bytes, extension) of a pair's image, from the corpus shard the KB metadata names."""
        meta = self.metadata.get([pair_id], ["shard", "key"])[0]
        if meta is None:
            raise BadRequest(f"no pair with id {pair_id} in {self.name}", 404)
        if not meta.get("shard") or meta.get("key") is None:
            raise BadRequest(f"pair {pair_id}: the KB metadata names no corpus shard (its images were not embedded "
                             f"here)", 404)
        found = shard_image(meta["shard"], meta["key"])
        if found is None:
            raise BadRequest(f"pair {pair_id}: image {meta['key']!r} not found in {Path(meta['shard']).name}", 404)
        return found


# --- the protocol --------------------------------------------------------------------------------
def _field(body: dict, name: str, kind, default=None, low: int | None = None, high: int | None = None):
    """body[name] checked against its type (and bounds); `default` when absent or null."""
    value = body.get(name)
    if value is None or (value == "" and kind is not str):
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"{name} must be {kind.__name__ if kind is not list else 'a list'}, got {value!r:.60}")
    if low is not None and not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}, got {value}")
    return value


def _decode_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
    except ValueError as err:
        raise BadRequest(f"image is not valid base64 ({err}); send the file's bytes base64-encoded") from err


def _download(url: str) -> bytes:
    if not url.startswith(("http://", "https://")):
        raise BadRequest(f"image_url must be an http(s) URL, got {url!r:.80}")
    try:
        with urllib.request.urlopen(urllib.request.Request(url), timeout=URL_TIMEOUT_S) as response:
            data = response.read(MAX_BODY_BYTES + 1)
    except OSError as err:
        raise BadRequest(f"could not download image_url {url!r:.80}: {err}", 502) from err
    if len(data) > MAX_BODY_BYTES:
        raise BadRequest(f"image_url {url!r:.80} is over {MAX_BODY_BYTES} bytes", 413)
    return data


def knn_query(backend: Backend, body: dict, allow_image_urls: bool) -> np.ndarray:
    """The query embedding of a /knn-service request: text, else image (base64 or URL), else embedding_input."""
    text, image = _field(body, "text", str), _field(body, "image", str)
    image_url, embedding = _field(body, "image_url", str), _field(body, "embedding_input", list)
    if text:
        return backend.encode_text(text)
    if image:
        return backend.encode_image(_decode_base64(image))
    if image_url:
        if not allow_image_urls:
            raise BadRequest("image_url queries are off on this server (they fetch from the network); send the "
                             "image itself base64-encoded as `image`, or start it with --allow-image-urls", 403)
        return backend.encode_image(_download(image_url))
    if embedding is not None:
        try:
            query = np.asarray(embedding, dtype=np.float32).reshape(1, -1)
        except (TypeError, ValueError) as err:
            raise BadRequest(f"embedding_input must be a list of numbers ({err})") from err
        if not np.isfinite(query).all():
            raise BadRequest("embedding_input holds NaN or infinite values")
        return _normalised(query)
    raise BadRequest("the query is empty: give one of text, image (base64), image_url or embedding_input")


def _check_index_name(backend: Backend, body: dict) -> None:
    name = _field(body, "indice_name", str)
    if name is not None and name != backend.name:
        raise BadRequest(f"unknown indice_name {name!r:.80}; this server serves {backend.name!r} (GET /indices-list)",
                         404)


def knn_service(backend: Backend, body: dict, base_url: str, allow_image_urls: bool) -> list[dict]:
    """Answer a /knn-service request as clip-back does (its fields, its result list)."""
    _check_index_name(backend, body)
    modality = _field(body, "modality", str, "image")
    if modality not in ("image", "text"):
        raise BadRequest(f"modality must be image or text, got {modality!r:.40}")
    num_images = _field(body, "num_images", int, 40, 1, MAX_NUM_IMAGES)
    num_result_ids = _field(body, "num_result_ids", int, num_images, 1, MAX_RESULT_IDS)
    deduplicate = _field(body, "deduplicate", bool, False)
    inline = _field(body, "inline_images", bool, True)  # not clip-retrieval's: the page fetches /image/{id}
    query = knn_query(backend, body, allow_image_urls)
    ids, similarities = backend.search(query, modality, max(num_result_ids, num_images), deduplicate)
    metas = backend.metadata.get(ids[:num_images], [*RESULT_COLUMNS, "shard"])
    results = []
    for n, (pair_id, similarity) in enumerate(zip(ids, similarities)):
        result = _result_metadata(backend, pair_id, metas[n], base_url, inline) if n < len(metas) else {}
        results.append({**result, "id": pair_id, "similarity": float(similarity)})
    return results


def _result_metadata(backend: Backend, pair_id: int, meta: dict | None, base_url: str, inline: bool) -> dict:
    """A result's caption, url and key; with the image bytes (base64, as clip-back's `image`) when inline."""
    if meta is None:
        return {}
    shard = meta.pop("shard", None)
    result = {k: v for k, v in meta.items() if v is not None}
    if shard:
        result.setdefault("url", f"{base_url}image/{pair_id}")
        if inline:
            try:
                result["image"] = base64.b64encode(backend.image(pair_id)[0]).decode("ascii")
            except BadRequest:
                pass  # a shard gone since embedding: the result stays, without its image
    return result


def metadata_service(backend: Backend, body: dict) -> list[dict]:
    """Answer a /metadata request: [{id, metadata}] for the ids asked (metadata {} for an unknown id)."""
    _check_index_name(backend, body)
    ids = _field(body, "ids", list, [])
    if len(ids) > MAX_METADATA_IDS:
        raise BadRequest(f"{len(ids)} ids asked; at most {MAX_METADATA_IDS} per request", 413)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise BadRequest("ids must be a list of integers")
    metas = backend.metadata.get(ids)
    return [{"id": i, "metadata": meta or {}} for i, meta in zip(ids, metas)]


# --- the app -------------------------------------------------------------------------------------
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PROTOCOL_ROUTES = ("/knn-service", "/metadata", "/indices-list")  # open to other origins, as clip-back


class RetrievedSets:
    """The retrieved sets served, by folder name; their report cards computed once, on first use."""

    def __init__(self, backend: Backend, folders: list[str | Path]):
        from .curation import retrieved_file

        self.backend, self.folders, self._cards = backend, {}, {}
        for folder in map(Path, folders):
            retrieved_file(folder)
            if folder.name in self.folders:
                raise ValueError(f"two retrieved sets are named {folder.name!r} ({self.folders[folder.name]} and "
                                 f"{folder}); give them folders of different names")
            self.folders[folder.name] = folder
        self._lock = threading.Lock()
        self._fingerprints = {}  # name -> (file stamps, curation.fingerprint)

    def fingerprints(self) -> dict[str, dict]:
        """curation.fingerprint of every set, hashed again only when a file changed (size, time, inode)."""
        from .curation import CURATION_FILE, fingerprint, retrieved_file

        found = {}
        for name, folder in self.folders.items():
            files = (retrieved_file(folder), folder / CURATION_FILE)
            stamps = tuple((s.st_size, s.st_mtime_ns, s.st_ino) if (s := _stat(f)) else None for f in files)
            if self._fingerprints.get(name, (None,))[0] != stamps:
                self._fingerprints[name] = (stamps, fingerprint(folder))
            found[name] = self._fingerprints[name][1]
        return found

    def folder(self, name: str) -> Path:
        if name not in self.folders:
            known = ", ".join(self.folders) or "none"
            raise BadRequest(f"no retrieved set {name!r:.80} on this server (it has: {known})", 404)
        return self.folders[name]

    def cards(self, name: str) -> dict:
        from .curation import report_cards

        folder = self.folder(name)
        with self._lock:
            if name not in self._cards:
                try:
                    self._cards[name] = report_cards(self.backend.kb, folder)
                except KeyError as err:  # an id of the set is not in this KB
                    raise BadRequest(f"retrieved set {name} holds pairs that are not in {self.backend.name} ({err}): "
                                     f"serve it with the KB it was retrieved from", 409) from err
            return self._cards[name]


def _stat(path: Path):
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _lineage_ids(body: dict) -> list[int]:
    ids = _field(body, "ids", list)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise BadRequest("give ids: a non-empty list of pair ids (integers), e.g. a takedown list")
    if len(ids) > MAX_LINEAGE_IDS:
        raise BadRequest(f"{len(ids)} ids is over the limit of {MAX_LINEAGE_IDS} per request: send the list in parts",
                         413)
    return ids


def _pair_lineage(pair_id: int, sets: RetrievedSets, runs: dict) -> dict:
    """GET /api/lineage/{id}: the served sets holding the pair, the runs trained on one of them."""
    from .curation import runs_using

    fingerprints = sets.fingerprints()
    found = runs_using([pair_id], runs, sets.folders, fingerprints)
    return {"id": pair_id,
            "sets": [{"set": name, **rows[0], **fingerprints[name]} for name, rows in found["sets"].items()],
            "runs": [{**{k: r[k] for k in ("run", "path", "shards", "set", "standing")},
                      "used": True if r["used"] else None if r["possibly"] else False} for r in found["runs"]],
            "untraced": found["untraced"]}


def _run_list(sets: RetrievedSets, runs: dict) -> list[dict]:
    """GET /api/runs: each run's shard sets, the served set each was materialized from and how it stands."""
    from .curation import standing

    fingerprints, listed = sets.fingerprints(), []
    for name, run in runs.items():
        entries = []
        for entry in run["lineage"] or []:
            served, state = standing(entry, sets.folders, fingerprints) or (None, None)
            entries.append({**entry, "set": served, "standing": state})
        listed.append({"run": name, "path": run["path"], "lineage": entries})
    return listed


def _curation_request(sets: RetrievedSets, name: str, body: dict) -> dict:
    from .curation import DECISIONS, query_ids, record_decisions

    folder = sets.folder(name)
    decision = _field(body, "decision", str)
    if decision not in DECISIONS:
        raise BadRequest(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r:.40}")
    who = (_field(body, "who", str) or "").strip()[:100] or None
    klass, query = _field(body, "class", str), _field(body, "query", str)
    if query is not None:
        if klass is None:
            raise BadRequest("a decision on a query's results needs the class too")
        ids, scope = query_ids(folder, klass, query), {"class": klass, "query": query}
    else:
        ids, scope = _field(body, "ids", list, []), ({"class": klass} if klass else {})
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise BadRequest("give ids (a non-empty list of pair ids) or class and query")
    return record_decisions(folder, ids, decision, who, scope)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before it is read whole."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _plain_error(send, 413, f"request body over {self.limit} bytes")
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BadRequest(f"request body over {self.limit} bytes", 413)
            return message

        return await self.app(scope, limited, send)


async def _plain_error(send, status: int, message: str):
    import json

    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _json_body(request) -> dict:
    import json

    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"the request body is not JSON ({err})") from err
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def create_app(backend: Backend, retrieved: list[str | Path] = (), allow_image_urls: bool = False,
               allowed_hosts: tuple[str, ...] | None = LOCAL_HOSTS, runs: list[str | Path] = ()):
    """The FastAPI app: clip-retrieval's routes, GET /image/{id}, the page and its /api/ routes.

    allowed_hosts: the Host headers answered (None: any). Localhost only by default, so a web
    page whose domain is re-pointed at 127.0.0.1 (DNS rebinding) cannot read or curate.
    runs: training run folders, or folders of them (curation.find_runs), for lineage.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    from .curation import find_runs

    sets, runs = RetrievedSets(backend, list(retrieved)), find_runs(runs)
    app = FastAPI(title="react-vl serve", docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=[*allowed_hosts, "[::1]"])
    page = resources.files("react_vl") / "static"

    @app.exception_handler(BadRequest)
    async def bad_request(request, err: BadRequest):
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.middleware("http")
    async def protocol_cors(request, call_next):
        response = await call_next(request)
        if request.url.path in PROTOCOL_ROUTES:  # clip-front may be served from elsewhere, as with clip-back
            response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    @app.get("/indices-list")
    def indices_list():
        return [backend.name]

    @app.post("/knn-service")
    async def knn(request: Request):
        body = await _json_body(request)
        return await run_in_threadpool(knn_service, backend, body, str(request.base_url), allow_image_urls)

    @app.post("/metadata")
    async def metadata(request: Request):
        return await run_in_threadpool(metadata_service, backend, await _json_body(request))

    @app.get("/image/{pair_id}")
    def image(pair_id: int):
        data, ext = backend.image(pair_id)
        return Response(data, media_type=MEDIA_TYPES.get(ext, "application/octet-stream"),
                        headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})

    @app.get("/", response_class=HTMLResponse)
    def index_page():
        return HTMLResponse((page / "index.html").read_text())

    @app.get("/static/{name}")
    def static(name: str):
        if name not in STATIC:  # a fixed list: no client-given name is ever joined to a path
            raise BadRequest(f"no static file {name!r:.80}", 404)
        return Response((page / name).read_text(), media_type=STATIC[name])

    _add_api_routes(app, backend, sets, allow_image_urls, runs)
    return BodyLimit(app)


def _add_api_routes(app, backend: Backend, sets: RetrievedSets, allow_image_urls: bool, runs: dict):
    """The page's own routes: server info, stored embeddings, retrieved sets, curation, lineage."""
    from fastapi import Request
    from starlette.concurrency import run_in_threadpool

    @app.get("/api/info")
    def info():
        return {"index": backend.name, "model": backend.kb.info.get("model"), "pairs": len(backend.kb),
                "modalities": list(backend.indexes), "retrieved": list(sets.folders), "runs": list(runs),
                "allow_image_urls": allow_image_urls, "max_num_images": MAX_NUM_IMAGES}

    @app.get("/api/embedding/{pair_id}")
    def embedding(pair_id: int, kind: str = "image"):
        if kind not in ("image", "text"):
            raise BadRequest(f"kind must be image or text, got {kind!r:.40}")
        return {"id": pair_id, "embedding": backend.embedding(pair_id, "img_emb" if kind == "image" else "text_emb")[0]
                .tolist()}

    @app.get("/api/lineage/{pair_id}")
    def lineage(pair_id: int):
        return _pair_lineage(pair_id, sets, runs)

    @app.post("/api/lineage")
    async def takedown(request: Request):
        from .curation import runs_using

        ids = _lineage_ids(await _json_body(request))
        return await run_in_threadpool(lambda: runs_using(ids, runs, sets.folders, sets.fingerprints()))

    @app.get("/api/runs")
    def run_list():
        return _run_list(sets, runs)

    @app.get("/api/retrieved/{name}/cards")
    def cards(name: str):
        return sets.cards(name)

    @app.get("/api/retrieved/{name}/class")
    def class_view(name: str, klass: str, limit: int = 200):
        from .curation import class_pairs

        return class_pairs(sets.folder(name), klass, limit=max(1, min(limit, MAX_NUM_IMAGES)))

    @app.post("/api/retrieved/{name}/curation")
    async def curation(name: str, request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            # cross-site forms can post text/plain without asking; a JSON body needs a CORS preflight, never granted
            raise BadRequest("curation requests must be sent as application/json", 415)
        return await run_in_threadpool(_curation_request, sets, name, await _json_body(request))


def serve(kb: str | Path, retrieved: list[str | Path] = (), host: str = "127.0.0.1", port: int = 1234,
          allow_image_urls: bool = False, cache_dir: str | Path | None = None, runs: list[str | Path] = ()) -> None:
    """Load the KB and serve it until interrupted (uvicorn)."""
    import uvicorn

    if host not in LOCAL_HOSTS:
        print(f"warning: serving on {host}: anyone who can reach this machine can search {kb}, read its images and "
              f"write curation decisions; there is no authentication (keep the default 127.0.0.1 unless you mean it)",
              file=sys.stderr)
    backend = Backend(kb, cache_dir)
    app = create_app(backend, retrieved, allow_image_urls, allowed_hosts=LOCAL_HOSTS if host in LOCAL_HOSTS else None,
                     runs=runs)
    print(f"serving {backend.name} ({len(backend.kb):,} pairs, {backend.kb.info.get('model')}): page at "
          f"http://{host}:{port}/, ClipClient(url='http://{host}:{port}/knn-service', indice_name='{backend.name}')",
          file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info")
