// cnnlab explore: the page talks to the local server's JSON API; every number and picture is computed there.
"use strict";

const $ = (id) => document.getElementById(id);
// source: "pad", {image}, or {test_index}; padShows: "drawing" or "image" (a test image or upload drawn onto the pad);
// mark: the explained pixel [x, y] of the selected map (recomputed for every new input).
const state = { info: null, source: null, selected: null, pending: false, again: false, padShows: "drawing", mark: null };

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const res = await fetch(path, opts);
  const data = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
  return data;
}

// --- tabs -----------------------------------------------------------------------------------------------------------
document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
  document.querySelectorAll(".panel").forEach((p) => p.classList.toggle("active", p.id === tab.dataset.tab));
  if (tab.dataset.tab === "run") loadRunTab();
  if (tab.dataset.tab === "kernels" && !$("k-out").src) runKernel();
}));

// --- drawing pad ------------------------------------------------------------------------------------------------------
const pad = $("pad");
const ctx = pad.getContext("2d");
function clearPad() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, pad.width, pad.height);
}
clearPad();
let drawing = false, last = null;
function padPoint(e) {
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}
pad.addEventListener("pointerdown", (e) => {
  if (state.padShows === "image") clearPad();  // drawing replaces the test image or upload shown on the pad
  state.padShows = "drawing";
  drawing = true; last = padPoint(e); pad.setPointerCapture(e.pointerId); state.source = "pad"; stroke(last);
});
pad.addEventListener("pointermove", (e) => { if (drawing) stroke(padPoint(e)); });
["pointerup", "pointercancel"].forEach((t) => pad.addEventListener(t, () => { drawing = false; last = null; predict(); }));
function stroke(p) {
  ctx.strokeStyle = "#fff"; ctx.lineCap = "round"; ctx.lineJoin = "round"; ctx.lineWidth = +$("brush").value;
  ctx.beginPath(); ctx.moveTo(...(last || p)); ctx.lineTo(...p); ctx.stroke();
  last = p;
  predict();  // live: at most one request in flight, the latest drawing follows
}
$("clear").addEventListener("click", () => { clearPad(); state.padShows = "drawing"; state.source = "pad"; predict(); });

// --- other inputs -----------------------------------------------------------------------------------------------------
function readFile(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result); r.onerror = () => reject(r.error); r.readAsDataURL(file);
  });
}
async function useUpload(file) {
  if (!file) return;
  state.source = { image: await readFile(file) };
  predict();
}
$("upload").addEventListener("change", (e) => useUpload(e.target.files[0]));
pad.addEventListener("dragover", (e) => { e.preventDefault(); pad.classList.add("drop"); });
pad.addEventListener("dragleave", () => pad.classList.remove("drop"));
pad.addEventListener("drop", (e) => { e.preventDefault(); pad.classList.remove("drop"); useUpload(e.dataTransfer.files[0]); });
document.addEventListener("paste", (e) => {
  const item = [...(e.clipboardData || {}).items || []].find((i) => i.type.startsWith("image/"));
  if (item) useUpload(item.getAsFile());
});
$("load-test").addEventListener("click", () => { state.source = { test_index: +$("test-index").value }; predict(); });

function currentInput() {
  if (state.source === "pad" || state.source === null) {
    return { image: pad.toDataURL("image/png"), center: !!(state.info.run && state.info.run.digits) };
  }
  return { ...state.source };
}

// --- prediction and activation maps -------------------------------------------------------------------------------
async function predict() {
  if (!state.info || !state.info.run) return;
  if (state.pending) { state.again = true; return; }
  state.pending = true;
  const t0 = performance.now();
  try {
    const source = state.source;
    const out = await api("/api/predict", currentInput());
    showPrediction(out, source);
    $("status").textContent = `round trip ${Math.round(performance.now() - t0)} ms`;
  } catch (err) {
    $("status").textContent = err.message;
  } finally {
    state.pending = false;
    if (state.again) { state.again = false; predict(); }
  }
}

// What the pad shows and what is predicted agree: a test image or upload is drawn onto the pad, with a line saying
// what it is (and a test image's true label).
function showSource(out, source) {
  if (source === "pad" || source === null) {
    $("source-line").textContent = "your drawing";
    return;
  }
  const img = new Image();
  img.onload = () => {
    if (state.source !== source) return;  // the user started drawing meanwhile
    ctx.imageSmoothingEnabled = false; clearPad(); ctx.drawImage(img, 0, 0, pad.width, pad.height);
    state.padShows = "image";
  };
  img.src = out.input;
  $("source-line").textContent = source.test_index !== undefined
    ? `test image ${source.test_index}, true label: ${out.truth}. Draw on the pad to replace it.`
    : "your image. Draw on the pad to replace it.";
}

function showPrediction(out, source) {
  $("seen").src = out.input;
  showSource(out, source);
  const chosen = out.multi_label ? out.top.filter((t) => t.predicted) : out.top.slice(0, 1);
  $("top1").textContent = chosen.length
    ? `prediction: ${chosen.map((t) => `${t.label} (${(100 * t.prob).toFixed(1)}%)`).join(", ")}`
    : "prediction: no label reaches its threshold";
  // A multi-label run: each bar is its own yes/no (a sigmoid); the labels that reach their thresholds are marked.
  const mark = (t, i) => (out.multi_label ? t.predicted : i === 0);
  $("bars").innerHTML = out.top.map((t, i) => `
    <div class="bar${mark(t, i) ? " first" : ""}"><span class="label" title="${esc(t.label)}">${esc(t.label)}</span>
      <div class="track"><div class="fill" style="width:${(100 * t.prob).toFixed(1)}%"></div></div>
      <span>${(100 * t.prob).toFixed(1)}%${out.multi_label ? (t.predicted ? " ✓" : "") : ""}</span></div>`).join("");
  const layers = $("layers");
  layers.innerHTML = "";
  for (const layer of out.layers) {
    const div = document.createElement("div");
    div.className = "layer";
    const more = layer.shape[0] > layer.maps.length ? ` (first ${layer.maps.length} maps)` : "";
    div.innerHTML = `<h3>${esc(layer.name)} <span class="hint">${esc(layer.kind)}</span> ${layer.shape.join("×")}${more}</h3>`;
    const maps = document.createElement("div");
    maps.className = "maps";
    layer.maps.forEach((src, c) => {
      const img = new Image();
      img.src = src; img.alt = `${layer.name} map ${c}`; img.title = `${layer.name} map ${c}`;
      img.dataset.layer = layer.name; img.dataset.channel = c;
      if (state.selected && state.selected.layer === layer.name && state.selected.channel === c) {
        img.classList.add("selected"); showDetail(layer, c, src, false, state.mark);
        if (state.mark) explainPixel(...state.mark);  // the weighted sum of the new input, never the old one's
      }
      img.addEventListener("click", () => {
        document.querySelectorAll(".maps img").forEach((m) => m.classList.remove("selected"));
        img.classList.add("selected");
        showDetail(layer, c, src, true);
      });
      maps.appendChild(img);
    });
    div.appendChild(maps);
    layers.appendChild(div);
  }
}

function showDetail(layer, channel, src, fresh, mark = null) {
  state.selected = { layer: layer.name, channel, kind: layer.kind, shape: layer.shape, src };
  $("detail").hidden = false;
  $("detail-title").textContent = `${layer.name} map ${channel} (${layer.shape[1]}×${layer.shape[2]})`;
  const big = $("big"), g = big.getContext("2d");
  const img = new Image();
  img.onload = () => {
    g.imageSmoothingEnabled = false; g.drawImage(img, 0, 0, big.width, big.height);
    if (mark) {  // the explained pixel
      const cw = big.width / layer.shape[2], ch = big.height / layer.shape[1];
      g.strokeStyle = "#ff3b30"; g.lineWidth = 2; g.strokeRect(mark[0] * cw + 1, mark[1] * ch + 1, cw - 2, ch - 2);
    }
  };
  img.src = src;
  if (!fresh) return;
  state.mark = null;
  $("explain").innerHTML = layer.kind === "Conv2d"
    ? `<p class="hint">Click a pixel of the map to see the weighted sum behind it.</p>` : "";
  if (layer.kind !== "Conv2d") { $("kernel-view").innerHTML = `<p class="hint">${esc(layer.kind)}: no weights.</p>`; return; }
  api(`/api/kernel-weights?layer=${encodeURIComponent(layer.name)}&channel=${channel}`).then((k) => {
    const shown = k.weights.slice(0, 4);
    $("kernel-view").innerHTML = `<p class="hint">kernel of this map: ${k.in_channels} input channel(s) of `
      + `${k.weights[0].length}×${k.weights[0][0].length} weights, bias ${fmt(k.bias)}`
      + (k.in_channels > shown.length ? ` (first ${shown.length} shown)` : "") + "</p>"
      + shown.map((m, i) => `<p class="hint">input channel ${i}</p>` + matrix(m)).join("");
  }).catch((err) => { $("kernel-view").textContent = err.message; });
}

$("big").addEventListener("click", (e) => {
  const sel = state.selected;
  if (!sel || sel.kind !== "Conv2d") return;
  const r = e.target.getBoundingClientRect();
  const x = Math.floor((e.clientX - r.left) / r.width * sel.shape[2]);
  const y = Math.floor((e.clientY - r.top) / r.height * sel.shape[1]);
  state.mark = [x, y];
  showDetail({ name: sel.layer, kind: sel.kind, shape: sel.shape }, sel.channel, sel.src, false, [x, y]);
  explainPixel(x, y);
});

let explainSeq = 0;  // only the newest answer is shown: an older one may arrive later
async function explainPixel(x, y) {
  const sel = state.selected, seq = ++explainSeq;
  try {
    const ex = await api("/api/explain", { ...currentInput(), layer: sel.layer, channel: sel.channel, x, y });
    if (seq !== explainSeq) return;
    const first = ex.terms.slice(0, 3);
    $("explain").innerHTML = `<h3>pixel (x=${x}, y=${y}) of map ${sel.channel}</h3>`
      + `<p class="hint">window: the layer's input under the kernel (for the first layer: the normalised pixels); `
      + `zero padding included</p>`
      + first.map((t) => `<p class="hint">input channel ${t.input_channel}: window × kernel, products sum to `
        + `${fmt(t.subtotal)}</p><div class="row">${matrix(t.window, "window")}${matrix(t.kernel, "kernel")}`
        + `${matrix(t.products, "products")}</div>`).join("")
      + (ex.terms.length > first.length ? `<p class="hint">… ${ex.terms.length - first.length} more input channels: `
        + ex.terms.slice(first.length).map((t) => fmt(t.subtotal)).join(" + ") + "</p>" : "")
      + `<p class="explain-total">${ex.terms.map((t) => fmt(t.subtotal)).slice(0, 8).join(" + ")}`
      + `${ex.terms.length > 8 ? " + …" : ""} + bias ${fmt(ex.bias)} = <b>${fmt(ex.total)}</b> `
      + `<span class="hint">(the layer's output there: ${fmt(ex.output)})</span></p>`;
  } catch (err) { if (seq === explainSeq) $("explain").textContent = err.message; }
}

// --- kernel playground ---------------------------------------------------------------------------------------------
let kImage = null, kTimer = null, kNamed = null;  // kNamed: a named kernel, sent by name (composites need it)
let kNote = "";  // what stays under the controls while it holds (a composite kernel's note); errors replace it
function scheduleKernel() { clearTimeout(kTimer); kTimer = setTimeout(runKernel, 150); }
// One row per line (blank lines and a trailing ';' ignored) -> rows joined by ';'; an empty row typed as ';;' stays
// (the server refuses it by name rather than guessing what was meant).
function matrixText(text) {
  return text.split("\n").map((l) => l.trim().replace(/;$/, "").trim()).filter((l) => l).join(";");
}
async function runKernel() {
  try {
    const out = await api("/api/kernel", {
      image: kImage, kernel: kNamed || matrixText($("k-matrix").value), pool: $("k-pool").value || null,
      size: +$("k-size").value, mode: $("k-mode").value, gray: $("k-gray").checked,
    });
    $("k-in").src = out.input; $("k-out").src = out.output;
    $("k-caption").textContent = `output ${out.shape.join("×")}`;
    $("k-status").textContent = kNote;  // a fixed error, or a note that no longer holds, goes away
  } catch (err) { $("k-status").textContent = err.message; }
}
$("kernel-name").addEventListener("change", () => {
  const k = state.info.kernels.find((k) => k.name === $("kernel-name").value);
  kNamed = k ? k.name : null;
  $("k-matrix").value = k ? k.matrix.map((r) => r.map((v) => +v.toFixed(4)).join(" ")).join("\n") : "";
  kNote = k && k.matrices > 1
    ? `${k.name} combines ${k.matrices} matrices as a gradient magnitude; the first is shown. Edit it to use it alone.` : "";
  $("k-status").textContent = kNote;
  scheduleKernel();
});
$("k-matrix").addEventListener("input", () => { kNamed = null; kNote = ""; $("kernel-name").value = ""; scheduleKernel(); });
["k-pool", "k-size", "k-mode", "k-gray"].forEach((id) => $(id).addEventListener("input", scheduleKernel));
$("k-upload").addEventListener("change", async (e) => { if (e.target.files[0]) { kImage = await readFile(e.target.files[0]); runKernel(); } });
$("k-sample").addEventListener("click", () => { kImage = null; runKernel(); });
$("k-drawn").addEventListener("click", () => { kImage = pad.toDataURL("image/png"); runKernel(); });

// --- the run tab ----------------------------------------------------------------------------------------------------
let runLoaded = false;
async function loadRunTab() {
  if (runLoaded || !state.info.run) return;
  runLoaded = true;
  try {
    const s = await api("/api/summary");
    $("summary").innerHTML = `<table><tr><th class="name">layer</th><th class="name">type</th><th>output</th>`
      + `<th>params</th><th>MACs</th></tr>` + s.rows.map((r) => `<tr><td class="name">${esc(r.name)}</td>`
      + `<td class="name">${esc(r.kind)}</td><td>${r.shape.join("×")}</td><td>${r.params.toLocaleString()}</td>`
      + `<td>${r.macs.toLocaleString()}</td></tr>`).join("")
      + `<tr><th class="name" colspan="3">total</th><th>${s.params.toLocaleString()}</th>`
      + `<th>${s.macs.toLocaleString()}</th></tr></table>`;
  } catch (err) { $("summary").textContent = err.message; }
  $("curves").src = "/api/picture/curves";
  if (state.info.run.multi_label) {  // no single predicted class per image: no confusion matrix
    $("confusion-card").hidden = true;
    $("mistakes-title").textContent = "Images with a wrong label";
  } else {
    $("confusion").src = "/api/picture/confusion";
  }
  $("mistakes").src = "/api/picture/misclassified";
}

// --- helpers and start ----------------------------------------------------------------------------------------------
function esc(s) { return String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`); }
function fmt(v) { return Math.abs(v) >= 1000 || (Math.abs(v) < 0.001 && v !== 0) ? v.toExponential(2) : (+v.toFixed(3)).toString(); }
function matrix(m, title) {
  return `<table class="grid">${title ? `<caption class="hint">${title}</caption>` : ""}`
    + m.map((row) => `<tr>${row.map((v) => `<td>${fmt(v)}</td>`).join("")}</tr>`).join("") + "</table>";
}

(async function start() {
  state.info = await api("/api/info");
  $("kernel-name").innerHTML = `<option value="">(type a matrix)</option>`
    + state.info.kernels.map((k) => `<option title="${esc(k.description)}">${esc(k.name)}</option>`).join("");
  $("kernel-name").value = "sharpen";
  $("kernel-name").dispatchEvent(new Event("change"));
  const run = state.info.run;
  if (!run) {  // the playground is all there is: open on it, with nothing that needs a network or the pad
    $("run-line").textContent = "no run: the kernel playground works; start `cnnlab explore runs/NAME` to look "
      + "inside a trained network";
    $("no-run").hidden = false; $("network-body").hidden = true; $("k-drawn").hidden = true;
    document.querySelector('[data-tab="run"]').hidden = true;
    $("tab-network").hidden = true;
    document.querySelector('[data-tab="kernels"]').click();
    return;
  }
  $("run-line").textContent = `${run.model} trained on ${run.data} (${run.classes.length} classes, `
    + `${run.channels}×${run.image_size}×${run.image_size} input) — ${run.name}`;
  $("test-index").max = Math.max(0, run.test_size - 1);
  state.source = { test_index: 0 };
  predict();
})().catch((err) => { $("run-line").textContent = `cannot reach the server: ${err.message}`; });
