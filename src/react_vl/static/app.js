// react-vl serve: the page. Plain JS, no build step; state lives in the URL
// (?query=...&modality=..., ?id=... to search by a pair, ?set=...&class=... for a retrieved set).
"use strict";

const $ = (id) => document.getElementById(id);
let info = { index: null, retrieved: [] };

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function call(path, body) {
  const options = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.detail || response.statusText);
  return data;
}

function navigate(params) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== ""));
  history.pushState(null, "", "/?" + query.toString());
  route();
}

function fmt(value, digits = 3) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

// --- lineage: under each result, the training runs (--runs) that used its pair ------------------
async function showLineage(container) {
  if (!info.runs || !info.runs.length) return;
  const cards = [...container.querySelectorAll(".result")];
  if (!cards.length) return;
  const found = await call("/api/lineage", { ids: [...new Set(cards.map((c) => Number(c.dataset.id)))] });
  const runs = new Map();  // pair id -> ["run", "run (curation changed since)", ...]
  for (const entry of found.runs) {
    const add = (id, text) => runs.set(id, [...(runs.get(id) || []), text]);
    entry.used.forEach((id) => add(id, entry.run));
    entry.possibly.forEach((id) => add(id, `${entry.run} (possibly: ${entry.standing} since)`));
  }
  for (const card of cards) {
    const names = [...new Set(runs.get(Number(card.dataset.id)) || [])];
    card.querySelector(".lineage")?.remove();
    card.append(element("div", { class: "lineage" }, names.length ? `trained into ${names.join(", ")}` : "in no run"));
  }
}

// --- kNN search ------------------------------------------------------------------------------
function resultCard(result, modality) {
  const image = element("img", { alt: result.caption || "", loading: "lazy" });
  image.addEventListener("error", () => { image.hidden = true; });  // missing images are hidden
  if (result.url) image.src = result.url;
  return element("div", { class: "result", "data-id": result.id, title: "search by this image",
                          onclick: () => navigate({ id: result.id, modality, num: $("num").value }) },
    image, element("div", { class: "caption" }, result.caption || ""),
    element("div", { class: "score" }, `similarity ${fmt(result.similarity)}`));
}

async function search(body, label) {
  const modality = body.modality;
  status(`searching ${label}…`);
  $("results").replaceChildren();
  const results = await call("/knn-service", { ...body, indice_name: info.index, inline_images: false });
  const grid = element("div", { class: "grid" }, ...results.map((r) => resultCard(r, modality)));
  $("results").replaceChildren(element("h2", {}, `${results.length} results for ${label}`), grid);
  status("");
  await showLineage($("results"));
}

function searchParams(params) {
  const modality = params.get("modality") || "image";
  const num = Math.max(1, Math.min(Number(params.get("num") || 40), info.max_num_images || 1000));
  $("modality").value = modality;
  $("num").value = num;
  return { modality, num_images: num, num_result_ids: num };
}

async function searchById(id, params) {
  const found = await call(`/api/embedding/${encodeURIComponent(id)}?kind=image`);
  await search({ ...searchParams(params), embedding_input: found.embedding }, `the image of pair ${id}`);
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// --- retrieved sets: report cards, one class's pairs, curation ---------------------------------
function histogram(counts, edges, mode) {
  const width = 120, height = 28, max = Math.max(1, ...counts);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "hist");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  counts.forEach((n, i) => {
    const bar = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    const h = (n / max) * height, w = width / counts.length;
    bar.setAttribute("x", i * w); bar.setAttribute("y", height - h);
    bar.setAttribute("width", Math.max(1, w - 1)); bar.setAttribute("height", h);
    bar.setAttribute("class", mode);
    const tip = document.createElementNS("http://www.w3.org/2000/svg", "title");
    tip.textContent = `${mode} ${fmt(edges[i])}–${fmt(edges[i + 1])}: ${n}`;
    bar.append(tip);
    svg.append(bar);
  });
  return svg;
}

function cardRow(set, card, edges) {
  const hists = element("td", {});
  for (const [mode, counts] of Object.entries(card.histogram)) hists.append(histogram(counts, edges[mode], mode));
  const cosine = element("td", { class: card.collapse ? "warn" : "" },
    card.prompt_cosine === null ? "–" : `${fmt(card.prompt_cosine)} (${card.nearest_class})`
      + (card.collapse ? " collapse?" : ""));
  const overlapping = card.overlapping.map((o) => `${o.class} ${Math.round(100 * o.share)}%`).join(", ");
  return element("tr", {},
    element("td", {}, element("a", { href: `/?set=${encodeURIComponent(set)}&class=${encodeURIComponent(card.class)}`,
                                      onclick: (e) => { e.preventDefault(); navigate({ set, class: card.class }); } },
                              card.class)),
    element("td", {}, String(card.count)),
    element("td", {}, Object.entries(card.by_mode).map(([m, n]) => `${m} ${n}`).join(" / ")),
    element("td", {}, card.overlap === null ? "–" : `${Math.round(100 * card.overlap)}%`),
    hists, cosine,
    element("td", {}, card.precision === null ? "–" : `${Math.round(100 * card.precision)}%`),
    element("td", {}, overlapping || "–"));
}

async function showCards(set) {
  status(`computing the report cards of ${set}…`);
  const data = await call(`/api/retrieved/${encodeURIComponent(set)}/cards`);
  const header = ["class", "pairs", "by mode", "both modes", "score histogram (t2t blue, t2i orange)",
                  `nearest class prompt cosine (warning > ${data.collapse_cosine})`, "estimated precision",
                  "most overlapping classes"];
  const table = element("table", { class: "cards" },
    element("tr", {}, ...header.map((h) => element("th", {}, h))),
    ...data.cards.map((card) => cardRow(set, card, data.bin_edges)));
  $("cards").replaceChildren(element("h2", {}, `${set}: report cards (task ${data.task || "unknown"})`),
                             ...data.notes.map((n) => element("p", {}, n)), table);
  $("cards").hidden = false;
  status("");
}

function curator() {
  return localStorage.getItem("curator") || "";
}

async function decide(set, body) {
  const action = await call(`/api/retrieved/${encodeURIComponent(set)}/curation`, { ...body, who: curator() });
  status(`${action.decision}ed ${action.pairs} pair(s) as ${action.who} at ${action.when}`);
  await showClass(set, body.class, false);
}

function pairCard(set, klass, pair) {
  const image = element("img", { alt: pair.caption || "", loading: "lazy", src: `/image/${pair.id}` });
  image.addEventListener("error", () => { image.hidden = true; });
  const found = Object.entries(pair.scores).map(([m, s]) => `${m} #${pair.ranks[m]} ${fmt(s)}`).join(", ");
  const button = (decision) => element("button", { onclick: (e) => { e.stopPropagation();
    decide(set, { decision, ids: [pair.id], class: klass }).catch((err) => status(err.message, true)); } }, decision);
  return element("div", { class: `result ${pair.decision ? pair.decision + "ed" : ""}`, "data-id": pair.id,
                          title: (pair.queries || []).join("\n"),
                          onclick: () => navigate({ id: pair.id, modality: "image" }) },
    image, element("div", { class: "caption" }, pair.caption || ""),
    element("div", { class: "score" }, found), button("reject"), button("accept"));
}

async function showClass(set, klass, announce = true) {
  if (announce) status(`reading ${klass} in ${set}…`);
  const view = await call(`/api/retrieved/${encodeURIComponent(set)}/class?klass=${encodeURIComponent(klass)}`);
  const who = element("input", { value: curator(), placeholder: "your name",
                                 onchange: (e) => localStorage.setItem("curator", e.target.value) });
  const queries = element("ul", { class: "queries" }, ...view.queries.map((q) => element("li", {},
    `${q.query} (${q.pairs} pairs)`,
    ...["reject", "accept"].map((decision) => element("button", { onclick: () =>
      decide(set, { decision, class: klass, query: q.query }).catch((err) => status(err.message, true)) },
      `${decision} all`)))));
  $("class-view").replaceChildren(
    element("h2", {}, `${set} / ${klass}: ${view.count} pairs, ${view.rejected} rejected`),
    element("label", {}, "curator ", who), element("h2", {}, "queries"), queries,
    element("h2", {}, "pairs, best first (mode #rank score)"),
    element("div", { class: "grid" }, ...view.pairs.map((p) => pairCard(set, klass, p))),
    element("h2", {}, `the ${view.noise.length} lowest-ranked (the likeliest noise)`),
    element("div", { class: "grid" }, ...view.noise.map((p) => pairCard(set, klass, p))));
  $("class-view").hidden = false;
  if (announce) status("");
  await showLineage($("class-view"));
}

// --- the page ------------------------------------------------------------------------------------
async function route() {
  const params = new URLSearchParams(location.search);
  $("cards").hidden = $("class-view").hidden = true;
  $("results").replaceChildren();
  $("query").value = params.get("query") || "";
  try {
    if (params.get("set") && params.get("class")) await showClass(params.get("set"), params.get("class"));
    else if (params.get("set")) await showCards(params.get("set"));
    if (params.get("query")) await search({ ...searchParams(params), text: params.get("query") },
                                          `“${params.get("query")}”`);
    else if (params.get("id")) await searchById(params.get("id"), params);
  } catch (err) {
    status(err.message, true);
  }
}

async function start() {
  info = await call("/api/info");
  $("about").textContent = `${info.index}: ${info.pairs} pairs, model ${info.model}`;
  $("sets").replaceChildren(...info.retrieved.map((set) => element("a", { href: `/?set=${encodeURIComponent(set)}`,
    onclick: (e) => { e.preventDefault(); navigate({ set }); } }, `retrieved set ${set}`)));
  for (const option of $("modality").options) option.disabled = !info.modalities.includes(option.value);
  $("search").addEventListener("submit", (e) => {
    e.preventDefault();
    navigate({ query: $("query").value.trim(), modality: $("modality").value, num: $("num").value });
  });
  $("image-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    try {
      history.pushState(null, "", `/?modality=${$("modality").value}&num=${$("num").value}`);
      await search({ ...searchParams(new URLSearchParams(location.search)), image: await readFile(file) }, file.name);
    } catch (err) {
      status(err.message, true);
    }
  });
  window.addEventListener("popstate", route);
  await route();
}

start().catch((err) => status(err.message, true));
