// MEG device dashboard: a prompt form over POST /v1/generate, canvas charts of GET /v1/history, the
// throughput over time from the device's /metrics counters, and a chat panel for the split language model
// (POST /v1/chat/completions, streamed as server-sent events). Plain JS, no libraries: the device serves this
// page offline.
"use strict";

const KEY_STORAGE = "meg.apiKey";
const LAST_RESULT_STORAGE = "meg.lastResultId";   // the result this browser last showed (localStorage)
const RATE_STORAGE = "meg.rateSamples";           // throughput samples, kept across reloads (sessionStorage)
const HISTORY_POLL_MS = 5000;
const HEALTH_POLL_MS = 10000;
const RATE_POLL_MS = 2000;
const RATE_WINDOW_MS = 10000;   // each rate point averages the traffic of the last 10 s, like rate(x[10s])
const RATE_SPAN_MS = 300000;    // the chart shows at most the last 5 minutes...
const RATE_MIN_SPAN_MS = 30000; // ...and at least the last 30 s, so a fresh page is not all squeezed up
const CHART_MAX_REQUESTS = 40;
// Device counters of what went over the air (Prometheus histograms: *_sum is the running total). Payloads are
// counted in bytes (Prometheus' base unit); the page shows bits.
const BYTES_METRIC = "meg_request_payload_bytes_sum";
const SYMBOLS_METRIC = "meg_request_symbols_sum";
const RATE_SERIES = [
  { key: "bits", label: "bit/s", color: "#2f6fde" },
  { key: "symbols", label: "channel uses/s", color: "#e08a1e" },
];

// Latency stages of timings_ms, in pipeline order; "other" is total minus the named stages (REST, gRPC, queues).
const STAGES = [
  { key: "edge", label: "edge (diffusion)", color: "#2f6fde" },
  { key: "encode", label: "encode", color: "#8e5bd6" },
  { key: "channel", label: "channel", color: "#e08a1e" },
  { key: "decode", label: "decode", color: "#24a06b" },
  { key: "other", label: "other", color: "#b7bfcc" },
];
// Codec colours, kept apart from the stage colours above.
const PALETTE = ["#d6453d", "#1aa3b8", "#c23c8a", "#3d4a9e", "#9aa623", "#d1a21b", "#5f8fb8", "#8c5a2b",
                 "#3b8f3b", "#e07aa8", "#4a4a4a", "#7fc6a4", "#b89be0", "#f0a36a"];

const $ = (id) => document.getElementById(id);

const state = {
  codecs: [],          // from GET /v1/codecs
  channels: [],        // from GET /v1/channels
  history: [],         // from GET /v1/history
  rateSamples: [],     // [{t, bits, symbols}]: device counters sampled every RATE_POLL_MS
  resultShown: false,
  submitting: false,
  codecColors: new Map(),
  imageObjectUrl: null,
};

class ApiError extends Error {
  constructor(status, detail) {
    super(`HTTP ${status}: ${detail}`);
    this.status = status;
    this.detail = detail;
  }
}

// ------------------------------------------------------------------------------------------------ REST

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = localStorage.getItem(KEY_STORAGE);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let resp;
  try {
    resp = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new ApiError(0, `device unreachable (${err.message})`);
  }
  if (resp.status === 401) showKeyPanel(true);
  if (!resp.ok) {
    let detail = resp.statusText || "request failed";
    try {
      const body = await resp.json();
      if (body && body.detail !== undefined) {
        detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      } else if (body && body.error) {
        detail = describeError(body.error);  // the OpenAI-compatible routes answer {"error": {...}}
      }
    } catch (_) { /* not JSON: keep the status text */ }
    throw new ApiError(resp.status, detail);
  }
  return resp;
}

const getJson = async (path) => (await api(path)).json();

// ------------------------------------------------------------------------------------------------ API key

function showKeyPanel(visible) {
  $("key-panel").hidden = !visible;
}

function setupKeyPanel() {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    showKeyPanel(false);
    hideError();
    loadCatalogue();
  });
  $("key-forget").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    $("api-key").value = "";
  });
}

// ------------------------------------------------------------------------------------------------ form

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function fillSelect(select, names, preferred) {
  const previous = select.value;
  select.replaceChildren(...names.map((name) => new Option(name, name)));
  const pick = [previous, preferred].find((n) => n && names.includes(n));
  if (pick) select.value = pick;
}

function codecColor(name) {
  if (!state.codecColors.has(name)) {
    state.codecColors.set(name, PALETTE[state.codecColors.size % PALETTE.length]);
  }
  return state.codecColors.get(name);
}

async function loadCatalogue() {
  try {
    const [codecs, channels] = await Promise.all([getJson("/v1/codecs"), getJson("/v1/channels")]);
    state.codecs = codecs.codecs;
    state.channels = channels.channels;
    state.codecs.forEach((c) => codecColor(c.name));  // stable colours in catalogue order
    fillSelect($("codec"), state.codecs.map((c) => c.name), codecs.default);
    fillSelect($("channel"), state.channels.map((c) => c.name), "awgn");
    onCodecChange();
    onChannelChange();
    loadLlmCatalogue();  // not awaited: the image panel is ready without it (a device may serve no LLM)
    await refreshHistory();  // restores the latest result after a reload, before the page says it is ready
    document.body.dataset.ready = "true";
  } catch (err) {
    showError(`Could not load codecs and channels: ${err.message}`);
  }
}

function onCodecChange() {
  const codec = state.codecs.find((c) => c.name === $("codec").value);
  $("codec-desc").textContent = codec ? `${codec.kind}: ${codec.description}` : "";
}

function onChannelChange() {
  const channel = state.channels.find((c) => c.name === $("channel").value);
  const noisy = Boolean(channel && channel.parameters.includes("snr_db"));
  $("snr").disabled = !noisy;
  $("snr-range").disabled = !noisy;
  onLinkChange();
}

// Which link controls apply: the channel model's parameters (GET /v1/channels), and modulation / FEC only
// for digital payloads (an analog codec sends its features as analog symbols).
function onLinkChange() {
  const channel = state.channels.find((c) => c.name === $("channel").value);
  const params = channel ? channel.parameters : [];
  const codec = state.codecs.find((c) => c.name === $("codec").value);
  const digital = !codec || codec.kind !== "analog";
  $("bandwidth").disabled = !params.includes("bandwidth_hz");
  $("delay").disabled = !params.includes("delay_ms");
  const modulated = params.includes("modulation") && digital;
  $("modulation").disabled = !modulated;
  $("fec").disabled = !modulated;
  $("code-rate").disabled = !modulated || $("fec").value !== "ldpc";
  let hint = "";
  if (!digital) hint = "Analog codec: the features go over the air as analog symbols; modulation and FEC apply to digital payloads.";
  else if (!params.includes("modulation")) hint = "An ideal channel delivers every bit: no modulation or FEC to choose.";
  else if ($("fec").value === "none") hint = "Uncoded: one flipped bit can make the payload undecodable (the device then conceals it).";
  $("link-hint").textContent = hint;
}

function optionalNumber(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

function requestBody() {
  const channel = { model: $("channel").value };
  if (!$("snr").disabled) channel.snr_db = Number($("snr").value);
  const bandwidth = optionalNumber("bandwidth");
  const delay = optionalNumber("delay");
  if (bandwidth !== undefined && !$("bandwidth").disabled) channel.bandwidth_hz = bandwidth;
  if (delay !== undefined && !$("delay").disabled) channel.delay_ms = delay;
  if (!$("modulation").disabled && $("modulation").value) channel.modulation = $("modulation").value;
  if (!$("fec").disabled) channel.fec = $("fec").value;
  if (!$("code-rate").disabled && $("code-rate").value) channel.code_rate = Number($("code-rate").value);
  const body = { prompt: $("prompt").value, codec: $("codec").value, channel, reference: $("reference").checked };
  const seed = optionalNumber("seed");
  const steps = optionalNumber("steps");
  const guidance = optionalNumber("guidance");
  if (seed !== undefined) body.seed = seed;
  if (steps !== undefined) body.steps = steps;
  if (guidance !== undefined) body.guidance_scale = guidance;
  return body;
}

async function onSubmit(ev) {
  ev.preventDefault();
  hideError();
  state.submitting = true;
  $("submit").disabled = true;
  $("busy").hidden = false;
  try {
    const resp = await api("/v1/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()),
    });
    const out = await resp.json();
    await showResult(out);
  } catch (err) {
    showError(err.message);
  } finally {
    state.submitting = false;
    $("submit").disabled = false;
    $("busy").hidden = true;
    refreshHistory();
    sampleRate();
  }
}

// ------------------------------------------------------------------------------------------------ result

const fmtInt = (n) => Math.round(n).toLocaleString("en-US");
const fmtMs = (n) => `${n.toFixed(1)} ms`;

function fmtLink(ch) {
  const parts = [];
  if (Number.isFinite(ch.bandwidth_hz)) parts.push(`${shortNumber(ch.bandwidth_hz)} symbols/s`);
  if (Number.isFinite(ch.delay_ms)) parts.push(`delay ${+Number(ch.delay_ms).toFixed(3)} ms`);
  if (ch.modulation) parts.push(ch.modulation + (ch.fec === "ldpc" ? " + LDPC" : ""));
  return parts.join(" · ");
}

function stageValues(timings) {
  const named = STAGES.filter((s) => s.key !== "other").map((s) => Math.max(0, timings[s.key] || 0));
  const other = Math.max(0, timings.total - named.reduce((a, b) => a + b, 0));
  return [...named, other];
}

async function showResult(out, restored = false) {
  // Images need the API key too, so fetch the PNG and show it from a blob URL rather than a plain <img src>.
  const img = $("result-image");
  let kept = true;
  try {
    const png = await (await api(out.image_url)).blob();
    if (state.imageObjectUrl) URL.revokeObjectURL(state.imageObjectUrl);
    state.imageObjectUrl = URL.createObjectURL(png);
    img.src = state.imageObjectUrl;
  } catch (err) {
    if (!restored || err.status !== 404) throw err;
    kept = false;  // an old result from the history: the device keeps a bounded number of images
    img.removeAttribute("src");
  }
  img.dataset.id = out.id;
  state.resultShown = true;
  localStorage.setItem(LAST_RESULT_STORAGE, out.id);
  $("result").dataset.restored = String(restored);
  $("result-caption").textContent = `${out.width}×${out.height} · seed ${out.seed} · ${out.steps} steps · ` +
    `guidance ${out.guidance_scale} · decoder ${out.decoder}` + (restored ? " · from the history" : "") +
    (kept ? "" : " · image no longer kept by the device");

  const ch = out.channel;
  $("out-codec").textContent = out.codec;
  $("out-channel").textContent = ch.snr_db !== undefined ? `${ch.model} @ ${Number(ch.snr_db).toFixed(1)} dB` : ch.model;
  $("out-link").textContent = fmtLink(ch);
  $("out-bits").textContent = fmtInt(out.bits_sent);
  $("out-symbols").textContent = fmtInt(out.symbols_sent);
  $("out-airtime").textContent = `${out.airtime_ms.toFixed(3)} ms`;
  $("out-bit-errors").textContent = fmtInt(out.bit_errors) + (out.concealed ? " (payload lost, concealed)" : "");
  const q = out.quality || {};
  $("out-psnr").textContent = q.psnr_db !== undefined ? `${q.psnr_db.toFixed(2)} dB` : "— (tick reference)";
  $("out-msssim").textContent = q.ms_ssim !== undefined ? q.ms_ssim.toFixed(4) : "—";
  $("out-total").textContent = fmtMs(out.timings_ms.total);

  const values = stageValues(out.timings_ms);
  const total = Math.max(out.timings_ms.total, 1e-9);
  $("breakdown").replaceChildren(...STAGES.map((stage, i) => {
    const seg = document.createElement("div");
    seg.style.width = `${(100 * values[i]) / total}%`;
    seg.style.background = stage.color;
    seg.title = `${stage.label}: ${fmtMs(values[i])}`;
    seg.dataset.stage = stage.key;
    return seg;
  }));
  $("breakdown-legend").replaceChildren(...STAGES.map((stage, i) =>
    legendItem(stage.color, `${stage.label} ${fmtMs(values[i])}`)));

  $("result-empty").hidden = true;
  $("result").hidden = false;
}

function legendItem(color, text) {
  const span = document.createElement("span");
  span.style.setProperty("--swatch", color);
  span.textContent = text;
  return span;
}

// ------------------------------------------------------------------------------------------------ history

async function refreshHistory() {
  try {
    const body = await getJson("/v1/history");
    state.history = body.requests || [];
  } catch (err) {
    if (err.status !== 401) console.warn("history:", err.message);
    return;
  }
  $("history-count").textContent = `(${state.history.length} in memory, charts show the last ` +
    `${Math.min(state.history.length, CHART_MAX_REQUESTS)})`;
  drawCharts();
  if (!state.resultShown && !state.submitting && state.history.length > 0) await restoreLatestResult();
}

// After a reload: show the result this browser showed last when the device still holds it, else the newest.
async function restoreLatestResult() {
  const lastId = localStorage.getItem(LAST_RESULT_STORAGE);
  const entry = state.history.find((r) => r.id === lastId) || state.history[state.history.length - 1];
  try {
    await showResult(entry, true);
  } catch (err) {
    console.warn("could not restore the latest result:", err.message);
  }
}

// ------------------------------------------------------------------------------------------------ throughput

// The total of one metric over all its label sets in a Prometheus text exposition (0 when absent).
function metricTotal(text, name) {
  let total = 0;
  for (const line of text.split("\n")) {
    if (!line.startsWith(name) || !"{ ".includes(line.charAt(name.length))) continue;
    const value = Number(line.slice(line.lastIndexOf(" ") + 1));
    if (Number.isFinite(value)) total += value;
  }
  return total;
}

function loadRateSamples() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(RATE_STORAGE) || "[]");
    if (Array.isArray(saved)) state.rateSamples = saved.filter((s) => Number.isFinite(s.t));
  } catch (_) { /* a corrupt entry: start afresh */ }
}

async function sampleRate() {
  let text;
  try {
    // Plain fetch, not api(): a failed sample must not pop up the key panel; the key goes along when set.
    const headers = new Headers();
    const key = localStorage.getItem(KEY_STORAGE);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const resp = await fetch("/metrics", { headers });
    if (!resp.ok) return;
    text = await resp.text();
  } catch (_) {
    return;  // the health pill already says the device is unreachable
  }
  const now = Date.now();
  state.rateSamples.push({ t: now, bits: 8 * metricTotal(text, BYTES_METRIC), symbols: metricTotal(text, SYMBOLS_METRIC) });
  state.rateSamples = state.rateSamples.filter((s) => s.t >= now - RATE_SPAN_MS - RATE_WINDOW_MS);
  try {
    sessionStorage.setItem(RATE_STORAGE, JSON.stringify(state.rateSamples));
  } catch (_) { /* storage full or disabled: the chart still works until a reload */ }
  drawRate();
}

function pollRate() {
  if (!document.hidden) sampleRate();
  setTimeout(pollRate, RATE_POLL_MS);
}

// Rates per second at each sample: the counters' increase over the trailing window, divided by its length.
// A counter that went down was reset (the device restarted): its increase is then its new value.
function rateSeries(samples) {
  const increases = samples.map((s, i) => {
    if (i === 0) return { bits: 0, symbols: 0 };
    const p = samples[i - 1];
    return Object.fromEntries(RATE_SERIES.map(({ key }) => [key, s[key] >= p[key] ? s[key] - p[key] : s[key]]));
  });
  const points = [];
  for (let i = 1; i < samples.length; i++) {
    let j = i - 1;
    while (j > 0 && samples[j].t > samples[i].t - RATE_WINDOW_MS) j--;
    const seconds = (samples[i].t - samples[j].t) / 1000;
    if (!(seconds > 0)) continue;
    const point = { t: samples[i].t };
    for (const { key } of RATE_SERIES) {
      let sum = 0;
      for (let k = j + 1; k <= i; k++) sum += increases[k][key];
      point[key] = sum / seconds;
    }
    points.push(point);
  }
  return points;
}

function drawRate() {
  const canvas = $("chart-rate");
  const { ctx, box } = prepareCanvas(canvas);
  const now = Date.now();
  const points = rateSeries(state.rateSamples).filter((p) => p.t >= now - RATE_SPAN_MS);
  const last = state.rateSamples[state.rateSamples.length - 1];
  canvas.dataset.totalBits = last ? String(last.bits) : "";
  canvas.dataset.totalSymbols = last ? String(last.symbols) : "";
  if (points.length === 0) {
    drawEmpty(canvas, ctx, box);
    ctx.fillText("(sampling the device's counters…)", box.x + box.w / 2, box.y + box.h / 2 + 16);
    return;
  }
  const top = Math.max(...points.flatMap((p) => RATE_SERIES.map(({ key }) => p[key])), 1);
  const y = drawYAxis(ctx, box, niceTicks(0, top), "per second");
  const span = Math.min(RATE_SPAN_MS, Math.max(RATE_MIN_SPAN_MS, now - points[0].t));
  const x = (t) => box.x + box.w * (1 - (now - t) / span);
  ctx.fillStyle = AXIS_INK;
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const ticks = niceTicks(0, span / 1000, 4).filter((s) => s <= span / 1000);
  for (const s of ticks) ctx.fillText(s ? `-${s} s` : "now", x(now - s * 1000), box.y + box.h + 4);
  for (const { key, color } of RATE_SERIES) {
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(p[key])) : ctx.moveTo(x(p.t), y(p[key]))));
    ctx.stroke();
  }
  ctx.lineWidth = 1;
  canvas.dataset.points = String(points.length);
  for (const { key } of RATE_SERIES) {
    const name = key[0].toUpperCase() + key.slice(1);
    canvas.dataset[`max${name}`] = String(Math.max(...points.map((p) => p[key])));
    canvas.dataset[`now${name}`] = String(points[points.length - 1][key]);
  }
  $("rate-legend").replaceChildren(...RATE_SERIES.map(({ key, label, color }) =>
    legendItem(color, `${label}: now ${shortNumber(+points[points.length - 1][key].toPrecision(3))}`)));
}

function pollHistory() {
  if (!document.hidden) refreshHistory();
  setTimeout(pollHistory, HISTORY_POLL_MS);
}

async function pollHealth() {
  const pill = $("health");
  try {
    const resp = await fetch("/healthz");
    const body = await resp.json();
    pill.textContent = resp.ok ? "healthy" : `unavailable: ${body.reason || resp.status}`;
    pill.className = resp.ok ? "pill ok" : "pill bad";
  } catch (err) {
    pill.textContent = "device unreachable";
    pill.className = "pill bad";
  }
  setTimeout(pollHealth, HEALTH_POLL_MS);
}

// ------------------------------------------------------------------------------------------------ charts

const PAD = { left: 52, right: 12, top: 10, bottom: 30 };
const AXIS_INK = "#6b7585";
const GRID_INK = "#e6e9ef";

// A canvas sized to its CSS box at the screen's pixel ratio, cleared, with a plot box inside the padding.
function prepareCanvas(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width;
  const h = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  const box = { x: PAD.left, y: PAD.top, w: w - PAD.left - PAD.right, h: h - PAD.top - PAD.bottom };
  return { ctx, box };
}

// Round tick values (1, 2, 5 × 10^k) covering [lo, hi].
function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) hi = lo + 1;
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let v = Math.floor(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toFixed(10));
  if (ticks[ticks.length - 1] < hi) ticks.push(ticks[ticks.length - 1] + step);
  return ticks;
}

function shortNumber(v) {
  const a = Math.abs(v);
  if (a >= 1e9) return `${+(v / 1e9).toFixed(1)}G`;
  if (a >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
  if (a >= 1e3) return `${+(v / 1e3).toFixed(1)}k`;
  return `${+v.toFixed(2)}`;
}

function drawYAxis(ctx, box, ticks, label) {
  const lo = ticks[0];
  const hi = ticks[ticks.length - 1];
  const y = (v) => box.y + box.h - ((v - lo) / (hi - lo)) * box.h;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const t of ticks) {
    ctx.strokeStyle = GRID_INK;
    ctx.beginPath();
    ctx.moveTo(box.x, Math.round(y(t)) + 0.5);
    ctx.lineTo(box.x + box.w, Math.round(y(t)) + 0.5);
    ctx.stroke();
    ctx.fillStyle = AXIS_INK;
    ctx.fillText(shortNumber(t), box.x - 6, y(t));
  }
  ctx.save();
  ctx.translate(12, box.y + box.h / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "center";
  ctx.fillText(label, 0, 0);
  ctx.restore();
  return y;
}

function drawXLabel(ctx, box, text) {
  ctx.fillStyle = AXIS_INK;
  ctx.textAlign = "center";
  ctx.textBaseline = "bottom";
  ctx.fillText(text, box.x + box.w / 2, box.y + box.h + PAD.bottom - 2);
}

function drawEmpty(canvas, ctx, box, message = "no requests yet") {
  ctx.fillStyle = AXIS_INK;
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  ctx.fillText(message, box.x + box.w / 2, box.y + box.h / 2);
  canvas.dataset.points = "0";
}

// Bars, one a request (oldest left); each bar is a stack of [value, colour] segments.
function drawBars(canvas, stacks, yLabel, xLabel, emptyText = undefined) {
  const { ctx, box } = prepareCanvas(canvas);
  if (stacks.length === 0) return drawEmpty(canvas, ctx, box, emptyText);
  const top = Math.max(...stacks.map((s) => s.reduce((a, [v]) => a + v, 0)), 1e-9);
  const y = drawYAxis(ctx, box, niceTicks(0, top), yLabel);
  const slot = box.w / Math.max(stacks.length, 12);  // few requests: fixed-width bars, not one fat bar
  const barW = Math.max(2, slot * 0.75);
  stacks.forEach((segments, i) => {
    const x = box.x + i * slot + (slot - barW) / 2;
    let base = 0;
    for (const [value, color] of segments) {
      ctx.fillStyle = color;
      ctx.fillRect(x, y(base + value), barW, y(base) - y(base + value));
      base += value;
    }
  });
  drawXLabel(ctx, box, xLabel);
  canvas.dataset.points = String(stacks.length);
}

// PSNR against SNR, one dot a request coloured by codec; noiseless requests sit in an "ideal" column on the right.
function drawQuality(canvas, rows) {
  const { ctx, box } = prepareCanvas(canvas);
  const points = rows.filter((r) => r.quality && Number.isFinite(r.quality.psnr_db));
  if (points.length === 0) return drawEmpty(canvas, ctx, box);
  const snrs = points.map((r) => r.snr_db).filter((s) => s !== null && s !== undefined);
  const hasIdeal = points.some((r) => r.snr_db === null || r.snr_db === undefined);
  const xTicks = niceTicks(snrs.length ? Math.min(...snrs) - 1 : 0, snrs.length ? Math.max(...snrs) + 1 : 10, 6);
  const psnrs = points.map((r) => r.quality.psnr_db);
  const y = drawYAxis(ctx, box, niceTicks(Math.max(0, Math.min(...psnrs) - 2), Math.max(...psnrs) + 2), "PSNR dB");
  const idealW = hasIdeal ? 56 : 0;
  const plotW = box.w - idealW;
  const lo = xTicks[0];
  const hi = xTicks[xTicks.length - 1];
  const x = (v) => box.x + ((v - lo) / (hi - lo)) * plotW;
  ctx.fillStyle = AXIS_INK;
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const t of xTicks) ctx.fillText(shortNumber(t), x(t), box.y + box.h + 4);
  const idealX = box.x + plotW + idealW / 2;
  if (hasIdeal) {
    ctx.strokeStyle = GRID_INK;
    ctx.beginPath();
    ctx.moveTo(box.x + plotW + 0.5, box.y);
    ctx.lineTo(box.x + plotW + 0.5, box.y + box.h);
    ctx.stroke();
    ctx.fillText("ideal", idealX, box.y + box.h + 4);
  }
  for (const r of points) {
    const noisy = r.snr_db !== null && r.snr_db !== undefined;
    ctx.fillStyle = codecColor(r.codec);
    ctx.globalAlpha = 0.85;
    ctx.beginPath();
    ctx.arc(noisy ? x(r.snr_db) : idealX, y(r.quality.psnr_db), 4, 0, 2 * Math.PI);
    ctx.fill();
  }
  ctx.globalAlpha = 1;
  drawXLabel(ctx, box, "SNR dB");
  canvas.dataset.points = String(points.length);
}

function drawCharts() {
  const recent = state.history.slice(-CHART_MAX_REQUESTS);
  drawBars($("chart-latency"),
    recent.map((r) => stageValues(r.timings_ms).map((v, i) => [v, STAGES[i].color])),
    "ms", "request (oldest → newest)");
  // Channel uses, not bits: every request has them (an analog or JSCC request sends symbols and no bits).
  drawBars($("chart-symbols"), recent.map((r) => [[r.symbols_sent, codecColor(r.codec)]]),
    "symbols", "request (oldest → newest)");
  drawQuality($("chart-quality"), recent);
  const used = [...new Set(recent.map((r) => r.codec))];
  $("stage-legend").replaceChildren(...STAGES.map((s) => legendItem(s.color, s.label)));
  for (const legend of document.querySelectorAll(".codec-legend")) {
    legend.replaceChildren(...used.map((name) => legendItem(codecColor(name), name)));
  }
  document.body.dataset.chartsDrawn = String(recent.length);
}

// ------------------------------------------------------------------------------------------------ language model

// The chat panel: one question at a time to POST /v1/chat/completions with stream: true. The answer arrives as
// server-sent events (OpenAI chat.completion.chunk objects); each content chunk carries meg_token (the bits,
// channel uses and latency of the hidden state behind that token), the final chunk the request's meg summary,
// then "data: [DONE]". An error after the stream began comes as one {"error": {...}} event.
const LLM_SOURCE = "llm-hidden";
const LLM_LATENCY_COLOR = "#e08a1e";
const LLM_BITS_COLOR = "#2f6fde";

const llm = {
  model: null,       // GET /v1/models: the first model, with its meg figures (num_layers, default_split_layer)
  codecs: [],        // GET /v1/codecs?source=llm-hidden
  controller: null,  // AbortController of the answer being streamed (the Stop button)
  tokens: [],        // [{index, text, bits, symbols, latency_ms}] of the answer so far
  meg: null,         // the final chunk's summary
  usage: null,
  finishReason: null,
  done: false,       // "data: [DONE]" seen
};

function describeError(error) {
  if (!error || typeof error !== "object") return String(error);
  const kind = ["type", "code"].map((k) => error[k]).filter((v) => v !== undefined && v !== null && v !== "");
  return `${error.message || "unknown error"}` + (kind.length ? ` (${kind.join(", ")})` : "");
}

function showLlmError(message) {
  $("llm-error").textContent = message;
  $("llm-error").hidden = false;
}

function hideLlmError() {
  $("llm-error").hidden = true;
  $("llm-error").textContent = "";
}

async function loadLlmCatalogue() {
  try {
    const [models, codecs] = await Promise.all([getJson("/v1/models"),
      getJson(`/v1/codecs?source=${encodeURIComponent(LLM_SOURCE)}`)]);
    llm.model = (models.data || [])[0] || null;
    if (!llm.model) throw new Error("the device serves no language model (GET /v1/models is empty)");
    llm.codecs = codecs.codecs || [];
    fillSelect($("llm-codec"), llm.codecs.map((c) => c.name), codecs.default);
    const meg = llm.model.meg || {};
    // Split after layer k: the edge runs layers 1..k, the device k+1..N (at k = N only the final norm and the
    // output head), the range the API accepts.
    const layers = [];
    for (let k = 1; k <= (meg.num_layers || 1); k++) layers.push(String(k));
    fillSelect($("llm-split"), layers, String(meg.default_split_layer));
    fillSelect($("llm-channel"), state.channels.map((c) => c.name), "awgn");
    onLlmCodecChange();
    $("llm-send").disabled = false;
    document.body.dataset.llmReady = "true";
  } catch (err) {
    $("llm-send").disabled = true;
    showLlmError(`Language model unavailable: ${err.message}`);
    document.body.dataset.llmReady = "false";
  }
}

function onLlmCodecChange() {
  const codec = llm.codecs.find((c) => c.name === $("llm-codec").value);
  $("llm-codec-desc").textContent = codec ? `${codec.kind}: ${codec.description || ""}` : "";
  onLlmLinkChange();
}

// The same rules as the image form's link controls: SNR for noisy channels, modulation and FEC for digital
// payloads over channels that model them.
function onLlmLinkChange() {
  const channel = state.channels.find((c) => c.name === $("llm-channel").value);
  const params = channel ? channel.parameters : [];
  const codec = llm.codecs.find((c) => c.name === $("llm-codec").value);
  const digital = !codec || codec.kind !== "analog";
  $("llm-snr").disabled = !params.includes("snr_db");
  const modulated = params.includes("modulation") && digital;
  $("llm-modulation").disabled = !modulated;
  $("llm-fec").disabled = !modulated;
  let hint = "";
  if (!digital) hint = "Analog codec: the hidden states go over the air as analog symbols.";
  else if (!params.includes("modulation")) hint = "An ideal channel delivers every bit.";
  $("llm-link-hint").textContent = hint;
}

function llmRequestBody() {
  const channel = { model: $("llm-channel").value };
  if (!$("llm-snr").disabled) channel.snr_db = Number($("llm-snr").value);
  if (!$("llm-modulation").disabled && $("llm-modulation").value) channel.modulation = $("llm-modulation").value;
  if (!$("llm-fec").disabled) channel.fec = $("llm-fec").value;
  const body = {
    model: llm.model.id,
    messages: [{ role: "user", content: $("llm-prompt").value }],
    stream: true,
    stream_options: { include_usage: true },
    codec: $("llm-codec").value,
    channel,
    split_layer: Number($("llm-split").value),
  };
  const maxTokens = optionalNumber("llm-max-tokens");
  const temperature = optionalNumber("llm-temperature");
  const seed = optionalNumber("llm-seed");
  if (maxTokens !== undefined) body.max_tokens = maxTokens;
  if (temperature !== undefined) body.temperature = temperature;
  if (seed !== undefined) body.seed = seed;
  return body;
}

function setLlmBusy(busy) {
  $("llm-send").disabled = busy;
  $("llm-stop").hidden = !busy;
  $("llm-busy").hidden = !busy;
  $("llm-answer").classList.toggle("streaming", busy);
}

function resetLlmOutput() {
  Object.assign(llm, { tokens: [], meg: null, usage: null, finishReason: null, done: false });
  $("llm-answer").replaceChildren();
  for (const id of ["llm-bits-per-token", "llm-first-bits", "llm-tokens", "llm-ttft", "llm-tpot", "llm-bits",
                    "llm-symbols", "llm-airtime", "llm-codec-out", "llm-channel-out", "llm-finish"]) {
    $(id).textContent = "";
  }
  $("llm-empty").hidden = true;
  $("llm-result").hidden = false;
  drawLlmCharts();
}

async function onLlmSubmit(ev) {
  ev.preventDefault();
  if (llm.controller) return;  // one answer at a time
  hideLlmError();
  resetLlmOutput();
  const controller = new AbortController();
  llm.controller = controller;
  setLlmBusy(true);
  document.body.dataset.llmState = "streaming";
  try {
    const resp = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(llmRequestBody()),
      signal: controller.signal,
    });
    await readEvents(resp, onLlmEvent);
    if (!llm.done || !llm.meg) {
      throw new Error(`the stream ended before the answer was complete (${llm.done ? "no meg summary" : "no [DONE]"})`);
    }
    document.body.dataset.llmState = "done";
  } catch (err) {
    const stopped = controller.signal.aborted;
    showLlmError(stopped ? "Stopped: the answer above is what arrived before." : err.message);
    document.body.dataset.llmState = stopped ? "stopped" : "error";
  } finally {
    llm.controller = null;
    setLlmBusy(false);
    drawLlmCharts();
  }
}

// Server-sent events of a fetch Response, as the SSE rules have them: lines end at CRLF, LF or CR; an event
// ends at a blank line; its data lines are joined with "\n"; comment lines (":" first) and other fields carry
// no data. onData(data) gets each event's data and returns true to stop reading (after "[DONE]").
async function readEvents(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  const dispatch = () => {
    const stop = data.length > 0 && onData(data.join("\n"));
    data = [];
    return stop;
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      // A CR at the end may be the first half of a CRLF split across reads: keep it for the next read.
      const holdCr = !done && buffer.endsWith("\r");
      const lines = (holdCr ? buffer.slice(0, -1) : buffer).split(/\r\n|\r|\n/);
      buffer = lines.pop() + (holdCr ? "\r" : "");
      if (done && buffer) lines.push(buffer);
      for (const line of lines) {
        if (line === "") {
          if (dispatch()) return;
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "data") data.push(value);
        }
      }
      if (done) {
        dispatch();  // an event the stream closed without a blank line after
        return;
      }
    }
  } finally {
    reader.cancel().catch(() => {});  // after [DONE] or an error: release the connection
  }
}

// One event of the answer; returns true at "[DONE]". An error event or unparsable data throws (shown as text).
function onLlmEvent(data) {
  if (data.trim() === "[DONE]") {
    llm.done = true;
    return true;
  }
  let event;
  try {
    event = JSON.parse(data);
  } catch (_) {
    throw new Error(`the device sent an event that is not JSON: ${data.slice(0, 200)}`);
  }
  if (event.error) throw new Error(describeError(event.error));
  if (event.usage) llm.usage = event.usage;
  let text = "";
  for (const choice of event.choices || []) {
    text += (choice.delta && choice.delta.content) || "";
    if (choice.finish_reason) llm.finishReason = choice.finish_reason;
  }
  if (event.meg_token) addLlmToken({ ...event.meg_token, text });
  else if (text) $("llm-answer").append(text);  // content without figures: show it all the same
  if (event.meg) llm.meg = event.meg;
  showLlmFigures();
  return false;
}

function addLlmToken(figures) {
  // Figures the device left out count as 0, so one odd chunk cannot break the charts or the sums.
  const token = { ...figures, bits: Number(figures.bits) || 0, symbols: Number(figures.symbols) || 0,
                  latency_ms: Number(figures.latency_ms) || 0 };
  llm.tokens.push(token);
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = token.text;
  span.dataset.index = String(token.index);
  span.title = `token ${token.index}: ${fmtInt(token.bits)} bits, ${fmtInt(token.symbols)} channel uses, ` +
    `${fmtMs(token.latency_ms)}`;
  $("llm-answer").append(span);
  drawLlmCharts();
}

// The figures so far from the tokens; the request's totals once the final chunk's meg summary is in.
function showLlmFigures() {
  const tokens = llm.tokens;
  if (tokens.length) {
    // The first token's hidden state follows the prompt's (prefill), so its payload is apart; bits per token
    // is the mean of the decode steps after it (the first alone while it is the only one).
    const decode = tokens.length > 1 ? tokens.slice(1) : tokens;
    const mean = decode.reduce((a, t) => a + t.bits, 0) / decode.length;
    $("llm-bits-per-token").textContent = `${fmtInt(mean)} bits`;
    $("llm-first-bits").textContent = `${fmtInt(tokens[0].bits)} bits · ${fmtMs(tokens[0].latency_ms)}`;
    $("llm-tokens").textContent = String(tokens.length) +
      (llm.usage ? ` (prompt ${llm.usage.prompt_tokens})` : "");
  }
  const meg = llm.meg;
  if (!meg) return;
  $("llm-ttft").textContent = Number.isFinite(meg.ttft_ms) ? fmtMs(meg.ttft_ms) : "—";
  $("llm-tpot").textContent = Number.isFinite(meg.tpot_ms) ? fmtMs(meg.tpot_ms) : "— (one token)";
  $("llm-bits").textContent = fmtInt(meg.bits_sent);
  $("llm-symbols").textContent = fmtInt(meg.symbols_sent);
  $("llm-airtime").textContent = `${Number(meg.airtime_ms).toFixed(3)} ms`;
  $("llm-codec-out").textContent = `${meg.codec} · layer ${meg.split_layer}`;
  const ch = meg.channel || {};
  $("llm-channel-out").textContent = ch.snr_db !== undefined && ch.snr_db !== null
    ? `${ch.model} @ ${Number(ch.snr_db).toFixed(1)} dB` : String(ch.model || "");
  $("llm-finish").textContent = llm.finishReason || "";
}

function drawLlmCharts() {
  const labels = "token (first → last)";
  drawBars($("llm-chart-latency"), llm.tokens.map((t) => [[Math.max(0, t.latency_ms), LLM_LATENCY_COLOR]]),
    "ms", labels, "no tokens yet");
  drawBars($("llm-chart-bits"), llm.tokens.map((t) => [[Math.max(0, t.bits), LLM_BITS_COLOR]]),
    "bits", labels, "no tokens yet");
}

function setupLlmPanel() {
  $("llm-send").disabled = true;  // until GET /v1/models has named the model
  $("llm-form").addEventListener("submit", onLlmSubmit);
  $("llm-stop").addEventListener("click", () => { if (llm.controller) llm.controller.abort(); });
  $("llm-codec").addEventListener("change", onLlmCodecChange);
  $("llm-channel").addEventListener("change", onLlmLinkChange);
  $("llm-prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) $("llm-form").requestSubmit();
  });
  drawLlmCharts();
}

// ------------------------------------------------------------------------------------------------ start

function start() {
  setupKeyPanel();
  $("codec").addEventListener("change", () => { onCodecChange(); onLinkChange(); });
  $("channel").addEventListener("change", onChannelChange);
  $("fec").addEventListener("change", onLinkChange);
  $("snr-range").addEventListener("input", () => { $("snr").value = $("snr-range").value; });
  $("snr").addEventListener("input", () => { $("snr-range").value = $("snr").value; });
  $("gen-form").addEventListener("submit", onSubmit);
  setupLlmPanel();
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) $("gen-form").requestSubmit();
  });
  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { drawCharts(); drawRate(); drawLlmCharts(); }, 150);
  });
  loadRateSamples();
  drawCharts();
  drawRate();
  loadCatalogue();
  pollHealth();
  pollRate();
  setTimeout(pollHistory, HISTORY_POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);
