// cnnlab explore: the page talks to the local server's JSON API; every number and picture is computed there.
// In a static site (`cnnlab explore RUN --export DIR`) static.js answers the same calls in the browser.
"use strict";

const STATIC = !!window.CNNLAB_STATIC;

const $ = (id) => document.getElementById(id);
// source: "pad", {image}, or {test_index}; padShows: "drawing" or "image" (a test image or upload drawn onto the pad);
// mark: the explained pixel [x, y] of the selected map (recomputed for every new input).
const state = { info: null, source: null, selected: null, pending: false, again: false, padShows: "drawing", mark: null,
  scale: "layer", layers: [] };

async function api(path, body) {
  if (STATIC) return staticApi(path, body);  // eslint-disable-line no-undef
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const res = await fetch(path, opts);
  const data = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
  return data;
}

// --- tabs -----------------------------------------------------------------------------------------------------------
function visibleTabs() { return [...document.querySelectorAll(".tab")].filter((t) => !t.hidden); }
document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("keydown", (e) => {
  // The tab list's keys (WAI-ARIA): left and right move between tabs.
  const tabs = visibleTabs(), step = { ArrowLeft: -1, ArrowRight: 1 }[e.key];
  if (!step) return;
  const next = tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length];
  next.focus(); next.click();
}));
document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => {
  document.querySelectorAll(".tab").forEach((t) => {
    t.classList.toggle("active", t === tab); t.setAttribute("aria-selected", String(t === tab));
    t.tabIndex = t === tab ? 0 : -1;
  });
  document.querySelectorAll(".panel").forEach((p) => p.classList.toggle("active", p.id === tab.dataset.tab));
  if (tab.dataset.tab === "run") loadRunTab();
  if (tab.dataset.tab === "pipeline") loadPipeline();
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
$("scale").addEventListener("change", () => { state.scale = $("scale").value; predict(); });
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
    const out = await api("/api/predict", { ...currentInput(), scale: state.scale });
    showPrediction(out, source);
    if ($("pipeline").classList.contains("active")) loadPipeline();
    $("status").textContent = `${STATIC ? "computed in this browser in" : "round trip"} `
      + `${Math.round(performance.now() - t0)} ms`;
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
  state.layers = out.layers;
  const layers = $("layers");
  layers.innerHTML = "";
  for (const layer of out.layers) {
    const div = document.createElement("div");
    div.className = "layer";
    const more = layer.shape[0] > layer.maps.length ? ` (first ${layer.maps.length} maps)` : "";
    const scale = state.scale === "map" ? "colour: each map its own" : `colour ±${fmt(layer.bounds[0])}`;
    const lecture = (state.info.run.lecture || {})[layer.name];
    div.innerHTML = `<h3>${lecture ? `${esc(lecture)} · ` : ""}${esc(layer.name)} <span class="hint">${esc(layer.kind)}</span> ${layer.shape.join("×")}${more}`
      + ` <span class="hint">${scale}</span></h3>`;
    const maps = document.createElement("div");
    maps.className = "maps";
    layer.maps.forEach((src, c) => {
      // A button per map: focusable, named for screen readers, opened with Enter or a click.
      const button = document.createElement("button");
      button.className = "map"; button.type = "button";
      button.setAttribute("aria-label", `${layer.name} map ${c} of ${layer.shape[0]}, colour ±${fmt(layer.bounds[c])}`);
      button.title = `${layer.name} map ${c}`;
      button.dataset.layer = layer.name; button.dataset.channel = c;
      const img = new Image();
      img.src = src; img.alt = "";
      button.appendChild(img);
      if (state.selected && state.selected.layer === layer.name && state.selected.channel === c) {
        button.classList.add("selected"); showDetail(layer, c, false);
        if (state.mark) explainPixel(...state.mark);  // the weighted sum of the new input, never the old one's
      }
      button.addEventListener("click", () => {
        document.querySelectorAll(".maps .map").forEach((m) => m.classList.remove("selected"));
        button.classList.add("selected");
        showDetail(layer, c, true);
        $("detail").scrollIntoView({ block: "start" });  // the enlarged map, not the list, is what comes next
        $("big").focus({ preventScroll: true });  // the arrow keys move the explained pixel at once
      });
      maps.appendChild(button);
    });
    div.appendChild(maps);
    layers.appendChild(div);
  }
}

const EXPLAINED = ["Conv2d", "MaxPool2d", "AvgPool2d"];  // layers whose pixels the page explains

// Draw a map's PNG on a canvas, pixelated, with the explained pixel outlined.
function paint(canvas, src, shape, mark) {
  const g = canvas.getContext("2d"), img = new Image();
  img.onload = () => {
    g.imageSmoothingEnabled = false; g.drawImage(img, 0, 0, canvas.width, canvas.height);
    if (mark) {
      const cw = canvas.width / shape[2], ch = canvas.height / shape[1];
      g.strokeStyle = "#111"; g.lineWidth = 2; g.strokeRect(mark[0] * cw + 1, mark[1] * ch + 1, cw - 2, ch - 2);
    }
  };
  img.src = src;
}

function colorbar(bound) {
  return `<div class="colorbar" role="img" aria-label="colour scale from ${fmt(-bound)} (blue) through 0 (white) to `
    + `${fmt(bound)} (red)"><div class="ramp" style="background: linear-gradient(to right, `
    + `${state.info.colormap.join(", ")})"></div><div class="ticks"><span>${fmt(-bound)}</span><span>0</span>`
    + `<span>${fmt(bound)}</span></div></div>`;
}

function showDetail(layer, channel, fresh) {
  state.selected = { layer: layer.name, channel, kind: layer.kind, shape: layer.shape };
  $("detail").hidden = false;
  $("detail-title").textContent = `${layer.name} map ${channel} (${layer.shape[1]}×${layer.shape[2]})`;
  if (fresh) state.mark = null;
  paint($("big"), layer.maps[channel], layer.shape, state.mark);
  $("big-caption").textContent = `${layer.kind} output`;
  $("post-figure").hidden = !layer.post;
  if (layer.post) {  // the same map after the activation that follows, on the same colours: ReLU's effect shows
    paint($("big-post"), layer.post.maps[channel], layer.shape, null);
    $("post-caption").textContent = `after ${layer.post.name} (${layer.post.kind})`;
  }
  $("detail-colorbar").innerHTML = colorbar(layer.bounds[channel]);
  if (!fresh) return;
  $("channel-view").innerHTML = ""; $("detects-status").textContent = "";
  $("explain").innerHTML = EXPLAINED.includes(layer.kind)
    ? `<p class="hint">Move over the map (or focus it and use the arrow keys) to see how each pixel is computed.</p>`
    : "";
  if (layer.kind !== "Conv2d") {
    $("kernel-view").innerHTML = `<p class="hint">${esc(layer.kind)}: no weights${layer.kind.includes("Pool")
      ? "; each pixel is the " + (layer.kind === "MaxPool2d" ? "largest" : "mean") + " value of its window" : ""}.</p>`;
    return;
  }
  api(`/api/kernel-weights?layer=${encodeURIComponent(layer.name)}&channel=${channel}`).then((k) => {
    const shown = k.weights.slice(0, 4);
    $("kernel-view").innerHTML = `<p class="hint">kernel of this map: ${k.in_channels} input channel(s) of `
      + `${k.weights[0].length}×${k.weights[0][0].length} weights, bias ${fmt(k.bias)}`
      + (k.in_channels > shown.length ? ` (first ${shown.length} shown)` : "") + "</p>"
      + shown.map((m, i) => `<p class="hint">input channel ${i}</p>` + matrix(m)).join("");
  }).catch((err) => { $("kernel-view").textContent = err.message; });
}

// What a channel detects: the test images that excite it most, and an input optimised to excite it.
$("detects").addEventListener("click", async () => {
  const sel = state.selected;
  if (!sel) return;
  $("detects-status").textContent = "searching the test images and optimising an input…";
  try {
    const v = await api(`/api/channel?layer=${encodeURIComponent(sel.layer)}&channel=${sel.channel}`);
    $("detects-status").textContent = "";
    $("channel-view").innerHTML = `<h3>${esc(v.layer)} map ${v.channel}: what excites it</h3><div class="row">`
      + (v.visualisation ? `<figure class="vis"><img src="${v.visualisation}" alt="an input optimised to excite `
        + `this channel"><figcaption class="hint">an input optimised for it: the map's mean ${fmt(v.start)} → `
        + `${fmt(v.reached)} (the images' numbers are peaks, the map's largest value)</figcaption></figure>`
        : `<p class="hint">(a feature visualisation of inputs this large: on the live server)</p>`)
      + `<div><p class="hint">the ${v.top.length} test images (of the first ${v.scanned}) `
      + `where it peaks highest, its peak under each:</p><div class="thumbs">${thumbs(v.top, "peak")}</div></div></div>`;
    wireThumbs($("channel-view"));
  } catch (err) { $("detects-status").textContent = err.message; }
});

// The explained pixel follows the pointer (hover, or a tap on a phone) and the arrow keys.
function pointAt(x, y) {
  const sel = state.selected;
  if (!sel || !EXPLAINED.includes(sel.kind)) return;
  x = Math.max(0, Math.min(sel.shape[2] - 1, x)); y = Math.max(0, Math.min(sel.shape[1] - 1, y));
  if (state.mark && state.mark[0] === x && state.mark[1] === y) return;
  state.mark = [x, y];
  const layer = state.layers.find((l) => l.name === sel.layer);
  paint($("big"), layer.maps[sel.channel], sel.shape, state.mark);
  explainPixel(x, y);
}
function eventPixel(e) {
  const sel = state.selected, r = $("big").getBoundingClientRect();
  return [Math.floor((e.clientX - r.left) / r.width * sel.shape[2]),
    Math.floor((e.clientY - r.top) / r.height * sel.shape[1])];
}
$("big").addEventListener("pointermove", (e) => { if (state.selected) pointAt(...eventPixel(e)); });
$("big").addEventListener("click", (e) => { if (state.selected) pointAt(...eventPixel(e)); });
$("big").addEventListener("keydown", (e) => {
  const step = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] }[e.key];
  if (!step || !state.selected) return;
  e.preventDefault();
  const [x, y] = state.mark || [0, 0];
  pointAt(state.mark ? x + step[0] : 0, state.mark ? y + step[1] : 0);
});

// One request at a time: while one is out, only the newest pixel waits (a fast pointer sends no backlog).
let explainSeq = 0, explainBusy = false, explainNext = null;
async function explainPixel(x, y) {
  if (explainBusy) { explainNext = [x, y]; return; }
  explainBusy = true;
  const sel = state.selected, seq = ++explainSeq, t0 = performance.now();
  try {
    const ex = await api("/api/explain", { ...currentInput(), layer: sel.layer, channel: sel.channel, x, y });
    if (seq === explainSeq && !explainNext) showExplain(ex, sel, x, y, performance.now() - t0);
  } catch (err) {
    if (seq === explainSeq && !explainNext) $("explain").textContent = err.message;
  } finally {
    explainBusy = false;
    if (explainNext) { const next = explainNext; explainNext = null; explainPixel(...next); }
  }
}

// The input maps the window slides over, the window outlined on each (the part outside is zero padding).
function inputMaps(ex) {
  const [, h, w] = ex.input_shape, side = 112;
  return `<div class="inputs">` + ex.inputs.map((m) => `<figure><canvas class="input-map" width="${side}" `
    + `height="${side}" data-src="${m.map}" role="img" aria-label="input channel ${m.channel} with the window `
    + `outlined"></canvas><figcaption>input ${m.channel}</figcaption></figure>`).join("") + "</div>"
    + `<p class="hint">window at rows ${ex.origin[0]}..${ex.origin[0] + ex.size[0] - 1}, columns `
    + `${ex.origin[1]}..${ex.origin[1] + ex.size[1] - 1} of the ${h}×${w} input`
    + `${ex.kind === "conv" ? " (outside it: zero padding)" : ex.kind === "max" ? " (padding, if any, never wins)" : ""}; `
    + `input colours ±${fmt(ex.input_bound)}</p>`;
}
function drawInputWindows(ex) {
  const [, h, w] = ex.input_shape;
  document.querySelectorAll("#explain canvas.input-map").forEach((c) => {
    const g = c.getContext("2d"), img = new Image(), cw = c.width / w, ch = c.height / h;
    img.onload = () => {
      g.imageSmoothingEnabled = false; g.drawImage(img, 0, 0, c.width, c.height);
      g.strokeStyle = "#111"; g.lineWidth = 2;
      g.strokeRect(ex.origin[1] * cw, ex.origin[0] * ch, ex.size[1] * cw, ex.size[0] * ch);
    };
    img.src = c.dataset.src;
  });
}

function showExplain(ex, sel, x, y, ms) {
  const head = `<h3>pixel (x=${x}, y=${y}) of map ${sel.channel}</h3>`;
  const tail = ` <span class="hint">(the layer's output there: ${fmt(ex.output)})</span>`
    + ` <span class="hint timing">${Math.round(ms)} ms</span></p>`;
  if (ex.kind !== "conv") {
    $("explain").innerHTML = head + inputMaps(ex)
      + `<div class="row">${matrix(ex.window, "window", ex.winner ? [ex.winner] : null)}</div>`
      + `<p class="explain-total">${ex.kind === "max" ? "the largest value of the window (outlined)"
        : `the mean of ${ex.count} values`} = <b>${fmt(ex.total)}</b>${tail}`;
    drawInputWindows(ex);
    return;
  }
  const first = ex.terms.slice(0, 6);
  const products = ex.terms.length * ex.size[0] * ex.size[1];
  $("explain").innerHTML = head + inputMaps(ex)
    + `<p>${ex.terms.length} input map${ex.terms.length > 1 ? "s" : ""} × ${ex.size[0]}×${ex.size[1]} weights = `
    + `<b>${products} products</b>, summed, plus one bias.</p>`
    + `<p class="hint">window: the layer's input under the kernel (for the first layer: the normalised pixels); `
    + `zero padding included. Each grid is coloured on its own range (its largest magnitude), centred at zero.</p>`
    + first.map((t) => `<p class="hint">input channel ${t.input_channel}: window × kernel, products sum to `
      + `${fmt(t.subtotal)}</p><div class="row">${matrix(t.window, "window")}${matrix(t.kernel, "kernel")}`
      + `${matrix(t.products, "products")}</div>`).join("")
    + (ex.terms.length > first.length ? `<p class="hint">… ${ex.terms.length - first.length} more input channels: `
      + ex.terms.slice(first.length).map((t) => fmt(t.subtotal)).join(" + ") + "</p>" : "")
    + `<p class="explain-total">${ex.terms.map((t) => fmt(t.subtotal)).slice(0, 8).join(" + ")}`
    + `${ex.terms.length > 8 ? " + …" : ""} + bias ${fmt(ex.bias)} = <b>${fmt(ex.total)}</b>${tail}`;
  drawInputWindows(ex);
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
    if (kPixel) explainKernelPixel(...kPixel);  // the explained pixel follows a new kernel, range or image
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
$("k-matrix").addEventListener("input", () => {
  kNamed = null; kNote = ""; $("kernel-name").value = ""; scheduleKernel(); syncGrid();
});

// The kernel as a grid of number fields, kept in step with the matrix text.
function syncGrid() {
  const grid = $("k-grid");
  if (!grid.rows.length) return;
  const rows = $("k-matrix").value.split("\n").map((l) => l.trim().split(/[\s,]+/).filter((v) => v));
  [...grid.querySelectorAll("input")].forEach((inp) => {
    const v = (rows[+inp.dataset.r] || [])[+inp.dataset.c];
    if (document.activeElement !== inp) inp.value = v === undefined ? "0" : v;
  });
}
function makeGrid(n) {
  const rows = $("k-matrix").value.split("\n").map((l) => l.trim().split(/[\s,]+/).filter((v) => v));
  $("k-grid").innerHTML = Array.from({ length: n }, (_, r) => "<tr>" + Array.from({ length: n }, (_, c) => {
    const v = rows.length === n && rows[r] && rows[r][c] !== undefined ? rows[r][c] : (r === (n - 1) / 2 && c === r ? "1" : "0");
    return `<td><input type="text" inputmode="decimal" data-r="${r}" data-c="${c}" value="${esc(v)}" `
      + `aria-label="kernel row ${r + 1}, column ${c + 1}"></td>`;
  }).join("") + "</tr>").join("");
  $("k-grid").querySelectorAll("input").forEach((inp) => inp.addEventListener("input", gridToText));
  gridToText();
}
function gridToText() {
  const n = $("k-grid").rows.length, cells = [...$("k-grid").querySelectorAll("input")];
  $("k-matrix").value = Array.from({ length: n }, (_, r) => cells.slice(r * n, r * n + n).map((i) => i.value.trim() || "0").join(" ")).join("\n");
  kNamed = null; kNote = ""; $("kernel-name").value = ""; scheduleKernel();
}
$("k-grid3").addEventListener("click", () => makeGrid(3));
$("k-grid5").addEventListener("click", () => makeGrid(5));

// Click a pixel of the output: its weighted sum, per channel, as `cnnlab filter --explain` prints it.
let kPixel = null;  // the playground's explained output pixel [x, y]
$("k-out").addEventListener("click", (e) => {
  const r = e.target.getBoundingClientRect(), img = e.target;
  kPixel = [Math.floor((e.clientX - r.left) / r.width * img.naturalWidth),
    Math.floor((e.clientY - r.top) / r.height * img.naturalHeight)];
  explainKernelPixel(...kPixel);
});
async function explainKernelPixel(x, y) {
  if ($("k-pool").value) { $("k-explain").innerHTML = `<p class="hint">Set pool to none to explain a pixel: with `
    + `pooling each output pixel is a window of filtered pixels.</p>`; return; }
  try {
    const ex = await api("/api/kernel-explain", { image: kImage, kernel: kNamed || matrixText($("k-matrix").value),
      mode: $("k-mode").value, gray: $("k-gray").checked, x, y });
    $("k-explain").innerHTML = `<h3>output pixel (x=${x}, y=${y})</h3>` + ex.channels.map((ch) =>
      `<p class="hint">${ch.name}: window × kernel${ex.composite ? " for each part" : ""} (zero padding)</p>`
      + ch.parts.map((p) => `<div class="row">${matrix(p.window, "window")}${matrix(p.kernel, "kernel")}`
        + `${matrix(p.products, "products")}</div><p>sum of the products = <b>${fmt(p.total)}</b></p>`).join("")
      + (ex.composite ? `<p>magnitude = √(${ch.parts.map((p) => `(${fmt(p.total)})²`).join(" + ")}) = `
        + `<b>${fmt(ch.value)}</b></p>` : "")
      + `<p class="explain-total">${ch.name} = <b>${fmt(ch.value)}</b>, shown as ${fmt(ch.shown)} `
      + `<span class="hint">(range ${esc(ex.mode)})</span></p>`).join("");
  } catch (err) { $("k-explain").textContent = err.message; }
}
["k-pool", "k-size", "k-mode", "k-gray"].forEach((id) => $(id).addEventListener("input", scheduleKernel));
$("k-upload").addEventListener("change", async (e) => { if (e.target.files[0]) { kImage = await readFile(e.target.files[0]); runKernel(); } });
$("k-sample").addEventListener("click", () => { kImage = null; runKernel(); });
$("k-drawn").addEventListener("click", () => { kImage = pad.toDataURL("image/png"); runKernel(); });

// --- output size: padding, stride, dilation --------------------------------------------------------------------------
// torch's formula, out = floor((n + 2p - d(k - 1) - 1) / s) + 1, drawn: the padded input with the kernel's window at
// one output position, and the output grid. Step or play through the positions.
const size = { pos: 0, timer: null };
function sizeValues() {
  const get = (id) => { const el = $(id), v = parseInt(el.value, 10);
    return Math.max(+el.min, Math.min(+el.max, Number.isNaN(v) ? +el.min : v)); };
  return { n: get("sz-n"), k: get("sz-k"), p: get("sz-p"), s: get("sz-s"), d: get("sz-d") };
}
function drawSize() {
  const { n, k, p, s, d } = sizeValues();
  const out = Math.floor((n + 2 * p - d * (k - 1) - 1) / s) + 1;
  const math = `out = ⌊(n + 2p − d(k − 1) − 1) / s⌋ + 1 = ⌊(${n} + 2·${p} − ${d}·(${k} − 1) − 1) / ${s}⌋ + 1`;
  const gin = $("sz-in").getContext("2d"), gout = $("sz-out").getContext("2d");
  gin.clearRect(0, 0, 300, 300); gout.clearRect(0, 0, 300, 300);
  if (out < 1) {
    $("sz-formula").textContent = `${math}: no output. The window spans d(k − 1) + 1 = ${d * (k - 1) + 1} pixels, `
      + `the padded input n + 2p = ${n + 2 * p}.`;
    $("sz-where").textContent = "";
    return;
  }
  $("sz-formula").textContent = `${math} = ${out}`;
  size.pos %= out * out;
  const oy = Math.floor(size.pos / out), ox = size.pos % out, m = n + 2 * p, cell = 300 / m;
  for (let r = 0; r < m; r++) for (let c = 0; c < m; c++) {
    const padding = r < p || c < p || r >= p + n || c >= p + n;
    gin.fillStyle = padding ? "#d9dde5" : "#fff"; gin.fillRect(c * cell, r * cell, cell, cell);
    gin.strokeStyle = "#b8bfcc"; gin.strokeRect(c * cell, r * cell, cell, cell);
  }
  gin.fillStyle = "rgba(47, 111, 222, 0.55)";
  for (let i = 0; i < k; i++) for (let j = 0; j < k; j++) {
    gin.fillRect((ox * s + j * d) * cell + 1, (oy * s + i * d) * cell + 1, cell - 2, cell - 2);
  }
  const oc = 300 / out;
  for (let r = 0; r < out; r++) for (let c = 0; c < out; c++) {
    const done = r * out + c < size.pos;
    gout.fillStyle = r === oy && c === ox ? "#2f6fde" : done ? "#c9d7f3" : "#fff";
    gout.fillRect(c * oc, r * oc, oc, oc); gout.strokeStyle = "#b8bfcc"; gout.strokeRect(c * oc, r * oc, oc, oc);
  }
  const top = oy * s - p, left = ox * s - p, span = d * (k - 1);
  $("sz-where").textContent = `output pixel (x=${ox}, y=${oy}) of ${out}×${out}: the window covers input rows `
    + `${top}..${top + span}, columns ${left}..${left + span}${d > 1 ? `, every ${d}th` : ""} (negative or ≥ ${n}: padding)`;
}
["sz-n", "sz-k", "sz-p", "sz-s", "sz-d"].forEach((id) => $(id).addEventListener("input", () => { size.pos = 0; drawSize(); }));
$("sz-step").addEventListener("click", () => { size.pos += 1; drawSize(); });
$("sz-play").addEventListener("click", () => {
  const playing = size.timer === null;
  if (playing) size.timer = setInterval(() => { size.pos += 1; drawSize(); }, 500);
  else { clearInterval(size.timer); size.timer = null; }
  $("sz-play").textContent = playing ? "Pause" : "Play";
  $("sz-play").setAttribute("aria-pressed", String(playing));
});
drawSize();

// --- the whole pipeline -------------------------------------------------------------------------------------------------
let pipelineSeq = 0;
async function loadPipeline() {
  if (!state.info || !state.info.run) return;
  const seq = ++pipelineSeq;
  try {
    const p = await api("/api/pipeline", { ...currentInput(), scale: state.scale });
    if (seq === pipelineSeq) showPipeline(p);
  } catch (err) { $("pipeline-status").textContent = err.message; }
}
function showPipeline(p) {
  // One cell size for every row: the widest map fits in about 300 px.
  const widest = Math.max(...p.rows.filter((r) => r.shape.length === 3).map((r) => r.shape[2]), 8);
  const px = Math.max(2, Math.min(8, Math.floor(300 / widest)));
  const folded = p.rows.filter((r) => r.collapsible).length;
  const params = p.rows.reduce((a, r) => a + r.params, 0);
  $("pipeline-status").textContent = `${p.rows.length} stages, ${params.toLocaleString("en-US")} parameters in all, `
    + `each cell ${px}×${px} pixels`
    + (folded ? `; ${folded} rows of long stages folded (expand them on the stage's last row)` : "");
  const root = $("pipeline-rows");
  root.innerHTML = "";
  p.rows.forEach((r, i) => {
    const row = document.createElement("div");
    row.className = "stage-row" + (r.collapsible ? " folded" : "");
    row.dataset.stage = r.stage; row.dataset.name = r.name;
    const geometry = r.kernel ? `, kernel ${r.kernel.join("×")}, stride ${r.stride.join("×")}, padding `
      + (Array.isArray(r.padding) ? r.padding.join("×") : esc(r.padding)) : "";
    const hidden = p.rows.filter((q, j) => j < i && q.stage === r.stage && q.collapsible).length;
    row.innerHTML = `<div class="meta">${r.lecture ? `<b>${esc(r.lecture)}</b> ` : ""}${esc(r.name)} `
      + `<span class="hint">${esc(r.kind)}${geometry}</span><br>→ ${r.shape.join("×")}`
      + `${r.params ? `, ${r.params.toLocaleString()} parameters` : ""}`
      + `${r.maps && r.shape[0] > r.maps.length ? ` <span class="hint">(first ${r.maps.length} maps)</span>` : ""}`
      + `${hidden && !r.collapsible ? `<br><button type="button" class="expand" data-stage="${r.stage}" `
        + `aria-expanded="false">show the ${hidden} rows before it</button>` : ""}</div><div class="cells"></div>`;
    const cells = row.querySelector(".cells");
    if (r.maps) {
      r.maps.forEach((src, c) => {
        const img = new Image();
        img.src = src; img.alt = `${r.name} map ${c}`;
        img.width = r.shape[2] * px; img.height = r.shape[1] * px;
        cells.appendChild(img);
      });
    } else {
      cells.appendChild(vectorCanvas(r.values, r.bound, widest, px, r.name));
    }
    root.appendChild(row);
  });
  const bars = document.createElement("div");
  bars.className = "stage-row";
  bars.innerHTML = `<div class="meta"><b>${p.multi_label ? "sigmoid" : "softmax"}</b><br>→ the probability of every `
    + `class</div><div>` + p.probabilities.map((t) => `<div class="bar"><span class="label">${esc(t.label)}</span>`
      + `<div class="track"><div class="fill" style="width:${(100 * t.prob).toFixed(1)}%"></div></div>`
      + `<span>${(100 * t.prob).toFixed(1)}%</span></div>`).join("") + "</div>";
  root.appendChild(bars);
  root.querySelectorAll(".expand").forEach((b) => b.addEventListener("click", () => {
    const open = b.getAttribute("aria-expanded") !== "true";
    root.querySelectorAll(`.stage-row[data-stage="${b.dataset.stage}"]`).forEach((r) => {
      if (r.querySelector(".expand") !== b) r.classList.toggle("folded", !open);
    });
    b.setAttribute("aria-expanded", String(open));
  }));
}
// A vector (flatten, linear) as cells of the same size as the maps', wrapped at the widest map's width.
function vectorCanvas(values, bound, widest, px, name) {
  const perRow = Math.max(widest, 10), rows = Math.ceil(values.length / perRow);
  const c = document.createElement("canvas");
  c.width = perRow * px; c.height = rows * px;
  c.setAttribute("role", "img"); c.setAttribute("aria-label", `${name}: ${values.length} values`);
  const g = c.getContext("2d");
  values.forEach((v, i) => {
    g.fillStyle = colorOf(v, bound || 1);
    g.fillRect((i % perRow) * px, Math.floor(i / perRow) * px, px, px);
  });
  return c;
}

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
  $("curves").src = picture("curves");
  if (state.info.run.multi_label) {  // no single predicted class per image: no confusion matrix
    $("confusion-card").hidden = true;
    $("mistakes-title").textContent = "Images with a wrong label";
    $("mistakes-scroll").hidden = false;
    $("mistakes").src = picture("misclassified");
    return;
  }
  try {
    const c = await api("/api/confusion");
    $("confusion").innerHTML = confusionTable(c);
    $("confusion").querySelectorAll("button").forEach((b) => b.addEventListener("click", () => openCell(+b.dataset.t, +b.dataset.p)));
    $("mistake-list").innerHTML = c.mistakes.length ? thumbs(c.mistakes) : `<p class="hint">no mistakes on the test split</p>`;
    wireThumbs($("mistake-list"));
  } catch (err) { $("confusion").textContent = err.message; }
}

// The confusion matrix as a table of buttons, each cell shaded by its share of the row (the class's recall there).
function confusionTable(c) {
  const head = `<tr><th class="name" scope="col">true \\ predicted</th>`
    + c.classes.map((k) => `<th scope="col">${esc(k)}</th>`).join("") + "</tr>";
  const rows = c.confusion.map((row, t) => {
    const total = row.reduce((a, b) => a + b, 0) || 1;
    return `<tr><th class="name" scope="row">${esc(c.classes[t])}</th>` + row.map((n, p) => {
      const share = n / total, tint = n ? Math.max(0.15, Math.min(1, 3 * share)) : 0;  // any mistake shows
      const bg = t === p ? blend("#1f4fa8", share) : blend("#b2182b", tint);
      return `<td><button type="button" data-t="${t}" data-p="${p}" style="background:${bg};color:${ink(bg)}" `
        + `aria-label="true ${esc(c.classes[t])}, predicted ${esc(c.classes[p])}: ${n} images">${n || ""}</button></td>`;
    }).join("") + "</tr>";
  }).join("");
  return `<table class="confusion">${head}${rows}</table>`;
}
async function openCell(t, p) {
  try {
    const cell = await api(`/api/cell?true=${t}&predicted=${p}`);
    $("cell-title").textContent = `true ${cell.true}, predicted ${cell.predicted}: ${cell.count} test image(s)`
      + (cell.count > cell.images.length ? `, the ${cell.images.length} most confident shown` : "");
    $("cell-images").innerHTML = thumbs(cell.images);
    wireThumbs($("cell-images"));
  } catch (err) { $("cell-title").textContent = err.message; }
}
function thumbs(items, show = "verdict") {
  // The accessible name starts with the visible text (WCAG's label-in-name), then says it in words.
  return items.map((m) => {
    const shown = show === "peak" ? `peak ${fmt(m.peak)}`
      : `${esc(m.true)} → ${esc(m.predicted)} ${(100 * m.confidence).toFixed(0)}%`;
    return `<button type="button" class="thumb" data-index="${m.index}" aria-label="${shown} #${m.index}: test `
      + `image ${m.index}, true ${esc(m.true)}, predicted ${esc(m.predicted)}; open it in the network view">`
      + `<img src="${m.image}" alt=""><span>${shown}</span><span class="hint">#${m.index}</span></button>`;
  }).join("");
}
// A test image chosen on the run tab goes through the network: its maps, prediction and true label.
function wireThumbs(root) {
  root.querySelectorAll(".thumb").forEach((b) => b.addEventListener("click", () => {
    $("test-index").value = b.dataset.index;
    document.querySelector('[data-tab="network"]').click();
    state.source = { test_index: +b.dataset.index };
    predict();
    $("pad").scrollIntoView({ block: "center" });
  }));
}

// --- helpers and start ----------------------------------------------------------------------------------------------
function picture(what) { return STATIC ? `pictures/${what}.png` : `/api/picture/${what}`; }
function esc(s) { return String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`); }
function fmt(v) { return Math.abs(v) >= 1000 || (Math.abs(v) < 0.001 && v !== 0) ? v.toExponential(2) : (+v.toFixed(3)).toString(); }
// A grid of numbers, each cell coloured on the diverging map centred at zero (the grid's own max |value|);
// `marked` cells ([row, column]) are outlined (max pooling's winner).
function matrix(m, title, marked = null) {
  const bound = Math.max(...m.flat().map(Math.abs)) || 1;
  const color = (v) => colorOf(v, bound);
  const isMarked = (r, c) => marked && marked.some(([mr, mc]) => mr === r && mc === c);
  return `<table class="grid">${title ? `<caption class="hint">${title}</caption>` : ""}`
    + m.map((row, r) => `<tr>${row.map((v, c) => `<td style="background:${color(v)};color:${ink(color(v))}"`
      + `${isMarked(r, c) ? ' class="winner"' : ""}>${fmt(v)}</td>`).join("")}</tr>`).join("") + "</table>";
}
// The diverging colour map's stop for value v on the scale -bound..+bound (blue, white at 0, red).
function colorOf(v, bound) {
  const stops = state.info.colormap, last = stops.length - 1;
  return stops[Math.round((0.5 + Math.max(-1, Math.min(1, v / bound)) / 2) * last)];
}
// White blended towards `hex` by `share` (0..1), as a hex colour.
function blend(hex, share) {
  return "#" + [1, 3, 5].map((i) => Math.round(255 + (parseInt(hex.slice(i, i + 2), 16) - 255) * share)
    .toString(16).padStart(2, "0")).join("");
}
// Black or white text, whichever reads on this background (WCAG contrast: white below luminance 0.18).
function ink(hex) {
  const lin = (i) => { const c = parseInt(hex.slice(i, i + 2), 16) / 255; return c <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
  return 0.2126 * lin(1) + 0.7152 * lin(3) + 0.0722 * lin(5) < 0.18 ? "#fff" : "#000";
}

(async function start() {
  state.info = await api("/api/info");
  if (STATIC) {  // no server to filter photos: the playground's place says so; the output-size widget stays
    $("playground-card").hidden = true; $("static-note").hidden = false;
  }
  if (!STATIC) $("kernel-name").innerHTML = `<option value="">(type a matrix)</option>`
    + state.info.kernels.map((k) => `<option title="${esc(k.description)}">${esc(k.name)}</option>`).join("");
  if (!STATIC) { $("kernel-name").value = "sharpen"; $("kernel-name").dispatchEvent(new Event("change")); }
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
    + `${run.channels}×${run.image_size}×${run.image_size} input) — ${run.name}`
    + (STATIC ? " · a static copy: the network runs in this browser" : "");
  $("test-index").max = Math.max(0, run.test_size - 1);
  state.source = { test_index: 0 };
  predict();
})().catch((err) => { $("run-line").textContent = `${STATIC ? "cannot load the site" : "cannot reach the server"}: ${err.message}`; });
