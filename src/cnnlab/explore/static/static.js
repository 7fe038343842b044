// cnnlab explore, the static site (`cnnlab explore RUN --export DIR`): the page's API answered in the browser.
// The network runs in ONNX Runtime Web (model.onnx: the logits and, as extra outputs, every shown layer's input and
// maps, the maps after its activation, every pipeline stage); the weighted sums, pooling windows and colours are
// computed here exactly as the live server computes them; what does not depend on the input (the run's tables,
// confusion cells, what each channel detects) was computed by `cnnlab explore --export` and is read from JSON.
"use strict";

const site = { meta: null, session: null, weights: null, test: null, testAt: null, run: null, channels: null,
  last: null };

async function fetchOk(path) {
  if (location.protocol === "file:") {  // browsers refuse fetch() on file:// pages
    throw new Error("open the site through a web server, for example python -m http.server --directory SITE 8000");
  }
  const res = await fetch(path);
  if (!res.ok) throw new Error(`${path}: HTTP ${res.status} (is the whole exported folder published?)`);
  return res;
}
async function meta() {
  if (!site.meta) site.meta = await (await fetchOk("site.json")).json();
  return site.meta;
}
async function session() {
  if (!site.session) {
    if (typeof ort === "undefined") throw new Error("ONNX Runtime Web did not load (ort/ort.wasm.min.js)");
    ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
    ort.env.wasm.numThreads = 1;  // threads need cross-origin isolation, which a plain static host does not give
    site.session = await ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
  }
  return site.session;
}
async function weights() {
  if (!site.weights) site.weights = new Float32Array(await (await fetchOk("weights.bin")).arrayBuffer());
  return site.weights;
}
async function testImages() {
  if (!site.test) {
    const m = await meta();
    site.test = new Uint8Array(await (await fetchOk("test.bin")).arrayBuffer());
    site.testAt = new Map(m.test.index.map((i, k) => [i, k]));
  }
  return site.test;
}

async function staticApi(path, body) {
  const [route, query] = path.split("?");
  const q = new URLSearchParams(query || "");
  const m = await meta();
  switch (route) {
    case "/api/info": return m.info;
    case "/api/predict": return predictHere(body);
    case "/api/pipeline": return pipelineHere(body);
    case "/api/explain": return explainHere(body);
    case "/api/kernel-weights": return kernelWeights(q.get("layer"), +q.get("channel"));
    case "/api/summary": return (await runTables()).summary;
    case "/api/confusion": {
      const t = await runTables();
      if (!t.confusion) throw new Error("a multi-label run has no confusion matrix (`cnnlab evaluate` reports each label)");
      return t.confusion;
    }
    case "/api/cell": {
      const t = await runTables(), k = +q.get("true"), p = +q.get("predicted");
      const classes = m.info.run.classes;
      return t.cells[`${k},${p}`] || { true: classes[k], predicted: classes[p], count: 0, images: [] };
    }
    case "/api/channel": {
      if (!site.channels) site.channels = await (await fetchOk("channels.json")).json();
      const v = site.channels[`${q.get("layer")}/${q.get("channel")}`];
      if (!v) throw new Error("this site holds what the first maps of each layer detect; the live server has all");
      return v;
    }
    default:
      throw new Error("the kernel playground filters photos with the library: it needs the live server (cnnlab explore)");
  }
}
async function runTables() {
  if (!site.run) site.run = await (await fetchOk("run.json")).json();
  return site.run;
}
function picturePath(what) { return `pictures/${what}.png`; }

// --- the input, as the model sees it ---------------------------------------------------------------------------------
function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img); img.onerror = () => reject(new Error("image: cannot be decoded"));
    img.src = src;
  });
}
function canvasOf(w, h) { const c = document.createElement("canvas"); c.width = w; c.height = h; return c; }
// Draw a region of `src` into a w×h canvas, smoothed (the browser's resampling stands in for Pillow's antialiasing).
function resized(src, sx, sy, sw, sh, w, h, dx = 0, dy = 0, dw = w, dh = h) {
  const c = canvasOf(w, h), g = c.getContext("2d");
  g.fillStyle = "#000"; g.fillRect(0, 0, w, h);
  g.imageSmoothingEnabled = true; g.imageSmoothingQuality = "high";
  g.drawImage(src, sx, sy, sw, sh, dx, dy, dw, dh);
  return g.getImageData(0, 0, w, h).data;  // RGBA
}
// RGBA -> uint8 (C, H, W): gray as Pillow's "L" (299/587/114 per mille), or RGB.
function planes(rgba, n, channels) {
  const out = new Uint8Array(channels * n);
  for (let i = 0; i < n; i++) {
    const r = rgba[4 * i], g = rgba[4 * i + 1], b = rgba[4 * i + 2];
    if (channels === 1) out[i] = Math.floor((r * 299 + g * 587 + b * 114 + 500) / 1000);
    else { out[i] = r; out[n + i] = g; out[2 * n + i] = b; }
  }
  return out;
}
// MNIST's preprocessing of a drawn digit (service.center_digit): its bounding box scaled to 20/28 of the side, placed
// with its centre of mass at the centre.
function centerDigit(img, size) {
  const W = img.naturalWidth, H = img.naturalHeight, gray = planes(resized(img, 0, 0, W, H, W, H), W * H, 1);
  let x0 = W, y0 = H, x1 = -1, y1 = -1;
  for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) {
    if (gray[y * W + x] > 20) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  }
  const out = new Uint8Array(size * size);
  if (x1 < 0) return out;
  const cw = x1 - x0 + 1, ch = y1 - y0 + 1, box = Math.max(1, Math.round(size * 20 / 28)), scale = box / Math.max(cw, ch);
  const gw = Math.max(1, Math.round(cw * scale)), gh = Math.max(1, Math.round(ch * scale));
  const glyph = planes(resized(img, x0, y0, cw, ch, gw, gh), gw * gh, 1);
  let mass = 0, sy = 0, sx = 0;
  for (let y = 0; y < gh; y++) for (let x = 0; x < gw; x++) { const v = glyph[y * gw + x]; mass += v; sy += v * y; sx += v * x; }
  mass = mass || 1;
  const top = Math.min(Math.max(Math.round(size / 2 - sy / mass), 0), size - gh);
  const left = Math.min(Math.max(Math.round(size / 2 - sx / mass), 0), size - gw);
  for (let y = 0; y < gh; y++) for (let x = 0; x < gw; x++) out[(top + y) * size + left + x] = glyph[y * gw + x];
  return out;
}
// An image cut to the model's square by the run's resize policy (the live server's model_input).
function modelInput(img, size, channels, policy) {
  const W = img.naturalWidth, H = img.naturalHeight, n = size * size;
  if (policy === "squash") return planes(resized(img, 0, 0, W, H, size, size), n, channels);
  if (policy === "pad") {
    const s = size / Math.max(W, H), w = Math.max(1, Math.round(W * s)), h = Math.max(1, Math.round(H * s));
    return planes(resized(img, 0, 0, W, H, size, size, Math.floor((size - w) / 2), Math.floor((size - h) / 2), w, h), n, channels);
  }
  const side = Math.min(W, H) * (policy === "crop" ? 0.875 : 1);  // crop: the centre 87.5%; else the centre square
  return planes(resized(img, (W - side) / 2, (H - side) / 2, side, side, size, size), n, channels);
}
async function inputPixels(body) {
  const m = await meta(), run = m.info.run, size = run.image_size, channels = run.channels;
  if (body.test_index !== undefined) {
    const data = await testImages(), at = site.testAt.get(body.test_index), per = channels * size * size;
    if (at === undefined) {
      throw new Error(m.test.index.length === m.test.count || !(body.test_index >= 0 && body.test_index < m.test.count)
        ? `test_index: the test split has ${m.test.count} images (0..${m.test.count - 1})`
        : `test_index: this site holds test images 0..${Math.min(m.test.count, 1000) - 1} and those the run tab `
          + `shows; the live server has all ${m.test.count}`);
    }
    return { pixels: data.subarray(at * per, (at + 1) * per), truth: m.test.truth[at] };
  }
  if (!body.image) throw new Error("give an image or a test_index");
  const img = await loadImage(body.image);
  if (body.center && channels === 1) return { pixels: centerDigit(img, size) };
  return { pixels: modelInput(img, size, channels, m.resize) };
}

// --- one forward pass, kept for the explanations of the same input ------------------------------------------------
async function forward(body) {
  const key = JSON.stringify([body.image, body.test_index, body.center]);
  if (site.last && site.last.key === key) return site.last;
  const m = await meta(), run = m.info.run, size = run.image_size, C = run.channels, n = size * size;
  const { pixels, truth } = await inputPixels(body);
  const x = new Float32Array(C * n);
  for (let c = 0; c < C; c++) for (let i = 0; i < n; i++) x[c * n + i] = (pixels[c * n + i] / 255 - m.norm.mean[c]) / m.norm.std[c];
  const s = await session();
  const res = await s.run({ input: new ort.Tensor("float32", x, [1, C, size, size]) });
  const out = (i) => (i === 0 ? res.logits : res[`t${i}`]);
  site.last = { key, pixels, truth, x, out, drawn: {} };
  return site.last;
}
const dims = (t) => t.dims;
// Tensor (C, H, W) -> channel c as a Float32Array view.
function plane(t, c) { const [, h, w] = dims(t); return t.data.subarray(c * h * w, (c + 1) * h * w); }
function absMax(a) { let m = 0; for (let i = 0; i < a.length; i++) { const v = Math.abs(a[i]); if (v > m) m = v; } return m; }

// One map on the diverging colours as a PNG data URL (service.map_to_png): -bound blue, 0 white, +bound red.
function mapUrl(a, h, w, bound, lut) {
  const c = canvasOf(w, h), g = c.getContext("2d"), img = g.createImageData(w, h);
  for (let i = 0; i < h * w; i++) {
    const v = bound > 0 ? Math.min(1, Math.max(0, 0.5 + a[i] / (2 * bound))) : 0.5, rgb = lut[Math.round(v * 255)];
    img.data[4 * i] = rgb[0]; img.data[4 * i + 1] = rgb[1]; img.data[4 * i + 2] = rgb[2]; img.data[4 * i + 3] = 255;
  }
  g.putImageData(img, 0, 0);
  return c.toDataURL("image/png");
}
function pixelsUrl(p, channels, size) {
  const c = canvasOf(size, size), g = c.getContext("2d"), img = g.createImageData(size, size), n = size * size;
  for (let i = 0; i < n; i++) {
    for (let k = 0; k < 3; k++) img.data[4 * i + k] = p[(channels === 1 ? 0 : k) * n + i];
    img.data[4 * i + 3] = 255;
  }
  g.putImageData(img, 0, 0);
  return c.toDataURL("image/png");
}
// The colour bound of each of `maps` (service.bounds): its own, the layer's, or the shared one.
function boundsOf(maps, scale, shared) {
  if (scale === "map") return maps.map(absMax);
  const layer = Math.max(0, ...maps.map(absMax));
  return maps.map(() => (scale === "layer" ? layer : shared));
}
function mapsOf(t) { const [c] = dims(t); return Array.from({ length: c }, (_, i) => plane(t, i)); }

function probabilities(logits, multi) {
  const z = Array.from(logits);
  if (multi) return z.map((v) => 1 / (1 + Math.exp(-v)));
  const top = Math.max(...z), e = z.map((v) => Math.exp(v - top)), sum = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / sum);
}

async function predictHere(body) {
  const m = await meta(), run = m.info.run, f = await forward(body), lut = m.lut;
  const scale = body.scale || "layer";
  const layers = m.network.layers.map((l) => ({ l, maps: mapsOf(f.out(l.maps)) }));
  const shared = Math.max(0, ...layers.map((r) => Math.max(0, ...r.maps.map(absMax))));
  const shown = layers.map(({ l, maps }) => {
    const bound = boundsOf(maps, scale, shared), [, h, w] = dims(f.out(l.maps));
    const row = { name: l.name, kind: l.kind, shape: l.shape, bounds: bound,
      maps: maps.map((a, c) => mapUrl(a, h, w, bound[c], lut)), post: null };
    if (l.post) {
      row.post = { name: l.post.name, kind: l.post.kind,
        maps: mapsOf(f.out(l.post.maps)).map((a, c) => mapUrl(a, h, w, bound[c], lut)) };
    }
    return row;
  });
  const probs = probabilities(f.out(0).data, run.multi_label);
  const order = probs.map((p, i) => [p, i]).sort((a, b) => b[0] - a[0] || a[1] - b[1]).slice(0, Math.min(5, probs.length));
  const top = order.map(([p, i]) => {
    const t = { label: run.classes[i], prob: p };
    if (run.multi_label) { t.threshold = m.thresholds[i]; t.predicted = p >= m.thresholds[i]; }
    return t;
  });
  const out = { top, input: pixelsUrl(f.pixels, run.channels, run.image_size), layers: shown, multi_label: run.multi_label };
  if (body.test_index !== undefined) out.truth = f.truth;
  return out;
}

async function pipelineHere(body) {
  const m = await meta(), run = m.info.run, f = await forward(body), lut = m.lut, scale = body.scale || "layer";
  const size = run.image_size, C = run.channels, n = size * size;
  const inputMaps = Array.from({ length: Math.min(C, 16) }, (_, c) => f.x.subarray(c * n, (c + 1) * n));
  const shared = Math.max(absMax(f.x), ...m.network.pipeline.slice(1).map((r) => f.out(r.absmax).data[0]));
  const rows = m.network.pipeline.map((r, i) => {
    const item = { name: r.name, kind: r.kind, params: r.params, lecture: r.lecture, stage: r.stage, shape: r.shape,
      collapsible: r.collapsible };
    if (r.kernel) Object.assign(item, { kernel: r.kernel, stride: r.stride, padding: r.padding });
    if (r.shape.length === 3) {
      const maps = i === 0 ? inputMaps : mapsOf(f.out(r.values)), h = r.shape[1], w = r.shape[2];
      const bound = boundsOf(maps, scale, shared);
      item.maps = maps.map((a, c) => mapUrl(a, h, w, bound[c], lut));
      item.bound = Math.max(...bound);
    } else {
      const values = Array.from(f.out(r.values).data);
      item.values = values.map((v) => +v.toFixed(5));
      item.bound = scale !== "global" ? absMax(values) : shared;
    }
    return item;
  });
  const probs = probabilities(f.out(0).data, run.multi_label);
  return { rows, multi_label: run.multi_label, probabilities: run.classes.map((c, i) => ({ label: c, prob: probs[i] })) };
}

// --- the weighted sum behind one pixel (features.explain_conv_pixel / explain_pool_pixel) --------------------------
function grid(rows, cols, at) { return Array.from({ length: rows }, (_, r) => Array.from({ length: cols }, (_, c) => at(r, c))); }
function sumOf(g) { return g.flat().reduce((a, b) => a + b, 0); }

async function explainHere(body) {
  const m = await meta(), f = await forward(body);
  const l = m.network.layers.find((q) => q.name === body.layer);
  if (!l) throw new Error(`layer ${body.layer} is not one of the shown layers`);
  const spec = l.conv || l.pool;
  if (!spec) throw new Error(`${l.name} is a ${l.kind}: neither a convolution nor a pooling window`);
  if (!spec.explained) throw new Error("this layer uses dilation, non-zero or named padding, or rounds its size up: its sums are not shown");
  const inp = f.out(l.input), [Cin, H, W] = dims(inp), maps = f.out(l.maps), [Cm, oh, ow] = dims(maps);
  const { channel, x, y } = body;
  if (!(channel >= 0 && channel < Math.min(Cm, l.shape[0]))) throw new Error(`channel ${channel} outside 0..${Cm - 1}`);
  const [kh, kw] = spec.kernel, [sh, sw] = spec.stride, [ph, pw] = spec.padding;
  const outH = Math.floor((H + 2 * ph - kh) / sh) + 1, outW = Math.floor((W + 2 * pw - kw) / sw) + 1;
  if (!(x >= 0 && x < outW && y >= 0 && y < outH)) throw new Error(`pixel (${x}, ${y}) outside the ${outW}x${outH} output`);
  const top = y * sh - ph, left = x * sw - pw;
  const at = (c, r, q) => { const yy = top + r, xx = left + q; return yy >= 0 && yy < H && xx >= 0 && xx < W ? inp.data[(c * H + yy) * W + xx] : null; };
  let result, channels;
  if (l.conv) {
    const w = await weights(), per = l.conv.in_channels / l.conv.groups;
    const first = Math.floor(channel / (l.conv.out_channels / l.conv.groups)) * per;
    const base = l.conv.weights + channel * per * kh * kw;
    const terms = [];
    for (let i = 0; i < per; i++) {
      const window = grid(kh, kw, (r, q) => at(first + i, r, q) ?? 0);
      const kernel = grid(kh, kw, (r, q) => w[base + (i * kh + r) * kw + q]);
      const products = grid(kh, kw, (r, q) => window[r][q] * kernel[r][q]);
      terms.push({ input_channel: first + i, window, kernel, products, subtotal: sumOf(products) });
    }
    const bias = w[l.conv.bias + channel];
    result = { channel, x, y, terms, bias, kind: "conv", total: terms.reduce((a, t) => a + t.subtotal, 0) + bias,
      origin: [top, left], size: [kh, kw] };
    channels = terms.map((t) => t.input_channel);
  } else {
    const isMax = l.pool.kind === "max";
    const raw = grid(kh, kw, (r, q) => at(channel, r, q));
    const window = raw.map((row) => row.map((v) => v ?? 0));  // padding shown as 0
    result = { channel, x, y, kind: isMax ? "max" : "mean", window, origin: [top, left], size: [kh, kw] };
    if (isMax) {
      let best = -Infinity, winner = [0, 0];
      raw.forEach((row, r) => row.forEach((v, q) => { if (v !== null && v > best) { best = v; winner = [r, q]; } }));
      Object.assign(result, { winner, total: best });
    } else {
      const inside = raw.flat().filter((v) => v !== null).length;
      const count = l.pool.divisor_override || (l.pool.count_include_pad ? kh * kw : inside);
      Object.assign(result, { count, total: sumOf(window) / count });
    }
    channels = [channel];
  }
  result.output = plane(maps, channel)[y * ow + x];
  result.layer = l.name;
  const bound = absMax(inp.data), drawn = (f.drawn[l.name] ||= {});
  const shown = channels.slice(0, 8);
  for (const c of shown) if (!drawn[c]) drawn[c] = mapUrl(plane(inp, c), H, W, bound, m.lut);
  return Object.assign(result, { input_shape: [Cin, H, W], inputs: shown.map((c) => ({ channel: c, map: drawn[c] })),
    input_bound: bound });
}

async function kernelWeights(layer, channel) {
  const m = await meta(), l = m.network.layers.find((q) => q.name === layer);
  if (!l || !l.conv) throw new Error(`layer ${layer} is not a shown convolution`);
  if (!(channel >= 0 && channel < l.conv.out_channels)) throw new Error(`channel ${channel} outside 0..${l.conv.out_channels - 1}`);
  const w = await weights(), per = l.conv.in_channels / l.conv.groups, [kh, kw] = l.conv.kernel;
  const base = l.conv.weights + channel * per * kh * kw;
  const kernels = Array.from({ length: Math.min(per, 32) }, (_, i) => grid(kh, kw, (r, q) => w[base + (i * kh + r) * kw + q]));
  return { layer, channel, weights: kernels, in_channels: per, bias: w[l.conv.bias + channel] };
}
