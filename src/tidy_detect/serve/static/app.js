// The tidy-detect page: pick or drop images, send each to POST /v1/detect, show the verdict, the
// caption and the grounded objects' boxes coloured by discrepancy, and in a panel of its own what the
// file declares about its origin (provenance). Plain DOM, no build step, no third-party code: the
// server's Content-Security-Policy allows nothing but this origin. Every text from a record goes in
// with textContent: metadata strings come from the uploaded file and are never parsed as HTML.
"use strict";

(function () {
  const MAX_PARALLEL = 4; // the server batches concurrent requests; a few at a time keeps the page responsive
  const SVG_NS = "http://www.w3.org/2000/svg";
  const KEY_STORAGE = "tidy-detect-api-key";
  // ColorBrewer RdYlBu, reversed: blue = the crop agrees with its phrase, red = it does not.
  const STOPS = [[44, 123, 182], [171, 217, 233], [255, 255, 191], [253, 174, 97], [215, 25, 28]];

  const $ = (sel, root = document) => root.querySelector(sel);
  const statusLine = $("#server-status");
  const input = $("#file-input");
  const dropZone = $("#drop-zone");
  const results = $("#results");
  const template = $("#result-template");
  const keyInput = $("#api-key");
  const keyBox = $("#key-box");
  const legend = $("#legend");
  const randomNotice = $("#random-weights");

  const painted = []; // {value, rect, swatch}: recoloured whenever the page's range of values changes
  const queue = [];
  let active = 0;

  keyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";
  keyInput.addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, keyInput.value));

  // -- server status -------------------------------------------------------------------------------

  async function pollHealth() {
    try {
      const response = await fetch("/healthz", { cache: "no-store" });
      const body = await response.json();
      setStatus(body.status, body.status === "ready" ? "ready: models loaded"
        : body.status === "loading" ? "models are loading… images dropped now are scored once they are ready"
        : `the models failed to load: ${body.error || "see the server log"}`);
      if (body.status === "loading") setTimeout(pollHealth, 2000);
      if (body.status === "ready") checkModels();
    } catch (err) {
      setStatus("unreachable", "the server cannot be reached");
      setTimeout(pollHealth, 4000);
    }
  }

  function setStatus(state, text) {
    statusLine.dataset.status = state;
    statusLine.textContent = text;
  }

  // Whether the server's models have random weights (the tiny test bundle): its verdicts mean nothing,
  // and the page says so before anything is dropped. /v1/info may need the API key; without it the
  // first result's record tells the same (see render).
  async function checkModels() {
    const headers = {};
    if (keyInput.value) headers["X-API-Key"] = keyInput.value;
    try {
      const response = await fetch("/v1/info", { cache: "no-store", headers });
      if (!response.ok) return;
      const info = await response.json();
      showRandomWeights(info.random_weights === true, info.random_weight_models);
    } catch (err) {
      // the status line already says when the server cannot be reached
    }
  }

  function showRandomWeights(random, models) {
    if (!random) return;
    if (Array.isArray(models) && models.length) {
      $("#random-weight-models").textContent = `${models.join(", ")}: the tiny test bundle`;
    }
    randomNotice.hidden = false;
  }

  // -- picking and dropping ------------------------------------------------------------------------

  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = ""; // picking the same file again still fires "change"
  });
  for (const type of ["dragenter", "dragover"]) {
    dropZone.addEventListener(type, (event) => {
      event.preventDefault();
      dropZone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    dropZone.addEventListener(type, () => dropZone.classList.remove("dragging"));
  }
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    addFiles(event.dataTransfer.files);
  });
  dropZone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      input.click();
    }
  });

  function addFiles(files) {
    for (const file of Array.from(files || [])) {
      const card = newCard(file);
      results.append(card.root); // upload order: the first image picked is the first listed
      queue.push({ file, card });
    }
    pump();
  }

  function pump() {
    while (active < MAX_PARALLEL && queue.length) {
      const job = queue.shift();
      active += 1;
      upload(job).finally(() => {
        active -= 1;
        pump();
      });
    }
  }

  // -- one image -----------------------------------------------------------------------------------

  function newCard(file) {
    const root = template.content.firstElementChild.cloneNode(true);
    const card = {
      root,
      img: $(".photo", root),
      svg: $(".overlay", root),
      verdict: $(".verdict", root),
      pFake: $(".p-fake", root),
      caption: $(".caption", root),
      global: $(".global", root),
      table: $(".objects", root),
      noObjects: $(".no-objects", root),
      error: $(".error", root),
      provenance: $(".provenance", root),
    };
    $(".file-name", root).textContent = file.name;
    card.img.alt = `uploaded image ${file.name}`;
    card.img.src = URL.createObjectURL(file);
    card.img.addEventListener("error", () => {
      $(".figure", root).classList.add("no-image");
      $(".no-preview", root).hidden = false;
    });
    return card;
  }

  async function upload({ file, card }) {
    const form = new FormData();
    form.append("files", file, file.name);
    const headers = {};
    if (keyInput.value) headers["X-API-Key"] = keyInput.value;
    let response;
    let body;
    try {
      response = await fetch("/v1/detect", { method: "POST", body: form, headers });
      body = await response.json();
    } catch (err) {
      showError(card, `the server could not be reached or gave no JSON (${err.message})`);
      return;
    }
    if (!response.ok) {
      const error = (body && body.error) || {};
      if (response.status === 401) keyBox.open = true;
      showError(card, `${error.message || response.statusText} [${response.status} ${error.code || ""}]`);
      return;
    }
    const record = body.records[0];
    if (body.model && body.model.random_weights) showRandomWeights(true, body.model.random_weight_models);
    renderProvenance(card, record.provenance);
    if (record.error) {
      showError(card, record.error);
      return;
    }
    render(card, record);
  }

  // -- provenance: the file's own declarations, beside the verdict ---------------------------------

  const SOURCE_NAMES = { c2pa: "C2PA", xmp: "XMP", iptc: "IPTC", "png-text": "PNG text", exif: "EXIF",
    watermark: "watermark" };

  function provenanceBadge(p) {
    if (!p.checked) return ["not-read", "not read"];
    if (p.declares_ai === true) return ["ai", p.verified ? "declares AI: verified" : "declares AI: a claim"];
    if (p.declares_ai === false) return ["not-ai", p.verified ? "declares a non-AI origin: verified"
      : "declares a non-AI origin: a claim"];
    return ["none", p.findings.length ? "no AI declaration" : "nothing declared"];
  }

  function renderProvenance(card, p) {
    const panel = card.provenance;
    if (!p) return;
    panel.hidden = false;
    const [state, text] = provenanceBadge(p);
    panel.dataset.declares = state;
    const badge = $(".provenance-badge", panel);
    badge.textContent = text;
    badge.dataset.declares = state;
    $(".provenance-summary", panel).textContent = p.summary;
    const list = $(".provenance-findings", panel);
    list.replaceChildren();
    for (const f of p.findings) {
      const item = document.createElement("li");
      item.className = "finding";
      item.dataset.source = f.source;
      item.dataset.verified = String(f.verified);
      const source = document.createElement("span");
      source.className = "finding-source";
      source.textContent = SOURCE_NAMES[f.source] || f.source;
      const trust = document.createElement("span");
      trust.className = "finding-trust";
      trust.textContent = f.verified ? "verified" : "claim";
      const what = document.createElement("span");
      what.className = "finding-text";
      what.textContent = `${f.field}: ${f.value} — ${f.meaning}`;
      item.append(source, trust, what);
      list.append(item);
    }
    if (p.truncated) {
      const more = document.createElement("li");
      more.className = "finding finding-more";
      more.textContent = "… more findings than are listed";
      list.append(more);
    }
    const extra = [];
    if (p.c2pa && p.c2pa.signer) {
      extra.push(`C2PA: ${p.c2pa.status}, signed by ${p.c2pa.signer.name || p.c2pa.signer.issuer || "an unnamed signer"}`);
    }
    if (p.watermark && p.watermark.checked && !p.watermark.found) {
      extra.push("Stable Diffusion watermark: not found (it rarely survives JPEG compression or resizing, " +
        "so this says little)");
    }
    $(".provenance-extra", panel).textContent = extra.join(". ");
    const error = $(".provenance-error", panel);
    error.hidden = !p.error;
    error.textContent = p.error ? `Some metadata could not be read: ${p.error}` : "";
  }

  function showError(card, message) {
    card.root.dataset.state = "error";
    card.verdict.dataset.label = "error";
    card.verdict.textContent = "ERROR";
    card.error.hidden = false;
    card.error.textContent = message;
  }

  function render(card, record) {
    card.root.dataset.state = "done";
    card.verdict.dataset.label = record.label;
    card.verdict.textContent = record.label.toUpperCase();
    card.pFake.textContent = `p_fake ${record.p_fake.toFixed(3)}`;
    $(".random-badge", card.root).hidden = record.random_weights !== true;
    card.caption.textContent = record.caption;
    card.global.textContent = `global discrepancy (whole image vs caption): ${record.global_discrepancy.toFixed(3)}`;

    const { width, height } = record;
    card.svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const fontSize = Math.max(width, height) / 24;
    const tbody = $("tbody", card.table);
    record.objects.forEach((obj, index) => {
      const [x0, y0, x1, y1] = obj.box;
      const outline = document.createElementNS(SVG_NS, "rect");
      const rect = document.createElementNS(SVG_NS, "rect");
      for (const r of [outline, rect]) {
        r.setAttribute("x", x0);
        r.setAttribute("y", y0);
        r.setAttribute("width", Math.max(x1 - x0, 1));
        r.setAttribute("height", Math.max(y1 - y0, 1));
      }
      outline.setAttribute("class", "box-outline");
      rect.setAttribute("class", "box");
      rect.dataset.phrase = obj.phrase;
      rect.dataset.discrepancy = obj.discrepancy;
      const title = document.createElementNS(SVG_NS, "title");
      title.textContent = `${obj.phrase}: discrepancy ${obj.discrepancy.toFixed(3)}`;
      rect.appendChild(title);
      const label = document.createElementNS(SVG_NS, "text");
      label.setAttribute("class", "box-label");
      label.setAttribute("x", Math.min(x0 + fontSize * 0.3, width - fontSize * 0.8));
      label.setAttribute("y", Math.min(y0 + fontSize * 1.1, height - 2));
      label.setAttribute("font-size", fontSize);
      label.textContent = String(index + 1); // the number only: phrases would cover the image; the table names them
      card.svg.append(outline, rect, label);

      const row = document.createElement("tr");
      const swatchCell = document.createElement("td");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatchCell.append(swatch);
      row.append(swatchCell, cell(`${index + 1}. ${obj.phrase}`), cell(obj.discrepancy.toFixed(3), true),
        cell(obj.box_score.toFixed(2), true));
      // hovering a row thickens its box: with several overlapping boxes, which is which
      row.addEventListener("mouseenter", () => { rect.classList.add("active"); row.classList.add("active"); });
      row.addEventListener("mouseleave", () => { rect.classList.remove("active"); row.classList.remove("active"); });
      tbody.append(row);
      painted.push({ value: obj.discrepancy, rect, swatch });
    });
    card.table.hidden = record.objects.length === 0;
    card.noObjects.hidden = record.objects.length !== 0;
    repaint();
  }

  function cell(text, numeric = false) {
    const td = document.createElement("td");
    td.textContent = text;
    if (numeric) td.className = "num";
    return td;
  }

  // -- colour scale --------------------------------------------------------------------------------

  function repaint() {
    if (!painted.length) return;
    let low = Math.min(...painted.map((p) => p.value));
    let high = Math.max(...painted.map((p) => p.value));
    if (high - low < 0.05) { // a single value, or nearly: centre it rather than paint it one extreme
      const mid = (low + high) / 2;
      low = mid - 0.025;
      high = mid + 0.025;
    }
    for (const p of painted) {
      const colour = colourAt((p.value - low) / (high - low));
      p.rect.setAttribute("stroke", colour);
      p.swatch.style.background = colour;
    }
    $("#legend-low").textContent = low.toFixed(3);
    $("#legend-high").textContent = high.toFixed(3);
    legend.hidden = false;
  }

  function colourAt(t) {
    const x = Math.min(Math.max(t, 0), 1) * (STOPS.length - 1);
    const i = Math.min(Math.floor(x), STOPS.length - 2);
    const f = x - i;
    const rgb = STOPS[i].map((c, k) => Math.round(c + (STOPS[i + 1][k] - c) * f));
    return `rgb(${rgb.join(", ")})`;
  }

  pollHealth();
})();
