// seglock console: plain JavaScript, same origin as the API, no dependencies.
// The token lives in sessionStorage only and travels only in the Authorization header.
"use strict";

const TOKEN_KEY = "seglock.token";
const BLOCK_MODES = ["shf", "np", "ffx"];
const PROTECTED_MODES = ["cp", "shf", "np", "ffx", "per-image"];
const METRICS_EVERY_MS = 3000;

const state = { me: null, models: [], adminModels: [], audit: { offset: 0 }, metricsTimer: null, lastMetrics: null };

const $ = (id) => document.getElementById(id);

// -- the PASCAL VOC colour map, as the server's palette PNGs use (client/imaging.py voc_colormap) --
const PALETTE = (() => {
  const colours = [];
  for (let i = 0; i < 256; i++) {
    let r = 0, g = 0, b = 0, c = i;
    for (let shift = 7; shift >= 0; shift--) {
      r |= (c & 1) << shift; g |= ((c >> 1) & 1) << shift; b |= ((c >> 2) & 1) << shift;
      c >>= 3;
    }
    colours.push([r, g, b]);
  }
  return colours;
})();
const COLOUR_INDEX = new Map(PALETTE.map(([r, g, b], i) => [(r << 16) | (g << 8) | b, i]));
const css = ([r, g, b]) => `rgb(${r}, ${g}, ${b})`;

// -- talking to the API ------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(path, { method = "GET", body = null, accept = "application/json", auth = true } = {}) {
  const headers = { Accept: accept };
  if (auth) headers.Authorization = `Bearer ${token()}`;
  if (body !== null && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" });
  } catch (err) {
    throw new ApiError(0, "the server cannot be reached");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const data = await response.json();
      if (data && data.error && data.error.message) message = data.error.message;
    } catch (err) { /* not JSON: keep the status line */ }
    if (response.status === 401 && auth) signOut(message);
    throw new ApiError(response.status, message);
  }
  return response;
}

const apiJson = async (path, options) => (await api(path, options)).json();

// -- showing things --------------------------------------------------------------------------

function show(el, on = true) { el.hidden = !on; }

function showError(id, err) {
  const el = $(id);
  if (!err) { el.textContent = ""; show(el, false); return; }
  el.textContent = err instanceof ApiError || err instanceof Error ? err.message : String(err);
  show(el, true);
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "—" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function when(epoch) {
  if (epoch === null || epoch === undefined) return "—";
  return new Date(epoch * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function percent(part, whole) { return whole ? `${((100 * part) / whole).toFixed(1)} %` : "—"; }

function swatch(row, index) {
  const td = document.createElement("td");
  const box = document.createElement("span");
  box.className = "swatch";
  box.style.backgroundColor = css(PALETTE[index]);
  box.setAttribute("aria-hidden", "true");
  td.appendChild(box);
  row.appendChild(td);
}

function confirmDialog(title, text, okLabel) {
  const dialog = $("confirm-dialog");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = okLabel;
  return new Promise((resolve) => {
    const done = (answer) => { dialog.close(); cleanup(); resolve(answer); };
    const ok = () => done(true), cancel = () => done(false), esc = () => { cleanup(); resolve(false); };
    const cleanup = () => {
      $("confirm-ok").removeEventListener("click", ok);
      $("confirm-cancel").removeEventListener("click", cancel);
      dialog.removeEventListener("cancel", esc);
    };
    $("confirm-ok").addEventListener("click", ok);
    $("confirm-cancel").addEventListener("click", cancel);
    dialog.addEventListener("cancel", esc);
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}

// -- signing in and out, and pages -----------------------------------------------------------

async function signIn(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
  try {
    state.me = await apiJson("/v1/whoami");
  } catch (err) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.me = null;
    throw err;
  }
  const who = $("who");
  who.textContent = `${state.me.name} · ${state.me.scopes.join(" + ")}`;
  who.title = `token id ${state.me.id}`;
  show(who); show($("signout")); show($("nav"));
  for (const link of document.querySelectorAll("#nav a")) {
    const needs = link.dataset.needs;
    show(link, !needs || state.me.scopes.includes(needs));
  }
  route();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.me = null;
  stopMetrics();
  for (const id of ["who", "signout", "nav"]) show($(id), false);
  $("token-input").value = "";
  $("secret-value").textContent = "";
  for (const id of ["try-result", "thief-result"]) show($(id), false);
  for (const table of ["models-table", "tokens-table", "audit-table", "try-legend", "thief-legend"]) {
    $(table).querySelector("tbody").replaceChildren();
  }
  if (location.hash) history.replaceState(null, "", location.pathname);
  showPage("signin");
  showError("signin-error", message || null);
}

function allowed(page) {
  if (!state.me) return page === "signin";
  const link = document.querySelector(`#nav a[data-page="${page}"]`);
  return Boolean(link) && !link.hidden;
}

function route() {
  if (!state.me) { showPage("signin"); return; }
  let page = location.hash.replace(/^#/, "");
  if (!allowed(page)) {
    const first = [...document.querySelectorAll("#nav a")].find((a) => !a.hidden);
    page = first.dataset.page;
  }
  showPage(page);
}

const LOADERS = {
  try: loadTry, thief: loadThief, models: loadModels, tokens: loadTokens, audit: () => loadAudit(0), metrics: startMetrics,
};

function showPage(page) {
  for (const section of document.querySelectorAll(".page")) show(section, section.id === `page-${page}`);
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.page === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.body.dataset.page = page;
  if (page !== "metrics") stopMetrics();
  showError("global-error", null);
  const load = LOADERS[page];
  if (load) load().catch((err) => showError("global-error", err));
}

// -- images and masks ------------------------------------------------------------------------

async function bitmapOf(blob, options = {}) {
  try {
    return await createImageBitmap(blob, options);
  } catch (err) {
    throw new Error("this file is not an image the browser can show (PNG, JPEG or WebP)");
  }
}

// A palette PNG mask -> {width, height, classes: Uint8Array, colours: canvas with background transparent}
async function decodeMask(blob) {
  // exact palette colours: no colour management, no premultiplication
  const bitmap = await bitmapOf(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width; canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const classes = new Uint8Array(canvas.width * canvas.height);
  const data = pixels.data;
  for (let p = 0, i = 0; p < classes.length; p++, i += 4) {
    const index = COLOUR_INDEX.get((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]) ?? 0;
    classes[p] = index;
    data[i + 3] = index === 0 ? 0 : 255;  // background stays see-through
  }
  ctx.putImageData(pixels, 0, 0);
  return { width: canvas.width, height: canvas.height, classes, colours: canvas };
}

function classCounts(mask) {
  const counts = new Map();
  for (const index of mask.classes) counts.set(index, (counts.get(index) || 0) + 1);
  return counts;
}

function drawOverlay(canvas, image, mask, opacity) {
  const scale = Math.min(1, 1024 / Math.max(mask.width, mask.height));
  canvas.width = Math.max(1, Math.round(mask.width * scale));
  canvas.height = Math.max(1, Math.round(mask.height * scale));
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.filter = "grayscale(100%)";  // the image in grey, so the class colours stand out
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  ctx.filter = "none";
  ctx.globalAlpha = opacity;
  ctx.drawImage(mask.colours, 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = 1;
  canvas.dataset.drawn = "true";
}

async function sampleImage() {
  const response = await api("/ui/sample.png", { accept: "image/png", auth: false });
  const blob = await response.blob();
  return new File([blob], "sample.png", { type: "image/png" });
}

function setupImageInput({ fileId, sampleId, dropId, onImage }) {
  $(fileId).addEventListener("change", () => {
    const file = $(fileId).files[0];
    if (file) onImage(file);
    $(fileId).value = "";
  });
  $(sampleId).addEventListener("click", () => sampleImage().then(onImage).catch((err) => onImage(null, err)));
  if (!dropId) return;
  const drop = $(dropId);
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) onImage(file);
  });
  drop.addEventListener("click", () => $(fileId).click());
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $(fileId).click(); }
  });
}

// -- try a model -----------------------------------------------------------------------------

function fillModelSelect(select, models, preferred) {
  const current = select.value;
  select.replaceChildren(...models.map((m) => {
    const option = document.createElement("option");
    option.value = m.name;
    option.textContent = `${m.name} (${m.protection.mode || m.mode})`;
    return option;
  }));
  const names = models.map((m) => m.name);
  if (names.includes(current)) select.value = current;
  else if (names.includes(preferred)) select.value = preferred;
}

async function loadTry() {
  state.models = (await apiJson("/v1/models")).models;
  fillModelSelect($("try-model"), state.models, "demo-cp");
  if (!state.models.length) showError("try-error", "this token is granted no model");
  modeNote();
}

function modeNote() {
  const model = state.models.find((m) => m.name === $("try-model").value);
  const note = $("try-mode-note");
  if (!model) { show(note, false); return; }
  const mode = model.protection.mode;
  if (BLOCK_MODES.includes(mode)) {
    note.textContent = `${model.name} is ${mode}-protected: this page uploads the plain image and the server encrypts ` +
      "it with the model's block key before the model sees it. The SDK (seglock-client) encrypts on your machine instead, " +
      "so the server never sees the plain image.";
  } else if (mode === "per-image") {
    note.textContent = `${model.name} is per-image-protected: this page uploads the plain image and the server encrypts ` +
      "it with a fresh random key for this one image. The SDK does that on your machine instead.";
  } else if (mode === "cp") {
    note.textContent = `${model.name} is cp-protected: its key is a channel permutation kept in the server's keystore ` +
      "and folded into the weights in memory; the image is sent as it is.";
  } else {
    note.textContent = `${model.name} is not protected.`;
  }
  show(note);
}

const tried = { image: null, mask: null };

async function segmentFile(file, err) {
  showError("try-error", err || null);
  if (!file) return;
  const name = $("try-model").value;
  if (!name) { showError("try-error", "choose a model first"); return; }
  show($("try-busy"));
  try {
    const image = await bitmapOf(file);
    const form = new FormData();
    form.append("image", file, file.name || "image");
    const started = performance.now();
    const response = await api(`/v1/models/${encodeURIComponent(name)}/segment`, { method: "POST", body: form, accept: "image/png" });
    const maskBlob = await response.blob();
    const elapsed = performance.now() - started;
    const mask = await decodeMask(maskBlob);
    tried.image = image; tried.mask = mask;
    redrawTry();
    const model = state.models.find((m) => m.name === name);
    fillLegend($("try-legend"), model.class_names, [classCounts(mask)], mask.classes.length);
    fillFacts($("try-facts"), [
      ["Model", name],
      ["Protection", model.protection.mode],
      ["Model version", response.headers.get("X-Seglock-Model-Version")],
      ["Key version", response.headers.get("X-Seglock-Key-Version") || "none (no stored key)"],
      ["Request time", `${elapsed.toFixed(0)} ms (round trip, this browser)`],
      ["Mask size", `${mask.width} × ${mask.height} px`],
      ["Request id", response.headers.get("X-Request-Id")],
    ]);
    show($("try-result"));
  } catch (error) {
    showError("try-error", error);
  } finally {
    show($("try-busy"), false);
  }
}

function redrawTry() {
  if (tried.mask) drawOverlay($("try-canvas"), tried.image, tried.mask, $("try-opacity").value / 100);
}

function fillLegend(table, classNames, countsList, total) {
  const body = table.querySelector("tbody");
  body.replaceChildren();
  classNames.forEach((name, index) => {
    const row = document.createElement("tr");
    row.dataset.class = name;
    swatch(row, index);
    cell(row, name, "class-name");
    for (const counts of countsList) cell(row, percent(counts.get(index) || 0, total), "share");
    body.appendChild(row);
  });
}

function fillFacts(dl, facts) {
  dl.replaceChildren();
  for (const [term, value] of facts) {
    const dt = document.createElement("dt"); dt.textContent = term;
    const dd = document.createElement("dd"); dd.textContent = value ?? "—";
    dd.dataset.fact = term;
    dl.append(dt, dd);
  }
}

// -- what a thief sees -----------------------------------------------------------------------

async function loadAdminModels() {
  state.adminModels = (await apiJson("/admin/models")).models;
  return state.adminModels;
}

async function loadThief() {
  const models = (await loadAdminModels()).filter((m) => PROTECTED_MODES.includes(m.mode));
  fillModelSelect($("thief-model"), models, "demo-cp");
  if (!models.length) showError("thief-error", "no protected model is hosted");
}

const thiefSeen = { image: null, keyed: null, stolen: null };

function base64Blob(text) {
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: "image/png" });
}

async function thiefFile(file, err) {
  showError("thief-error", err || null);
  if (!file) return;
  const name = $("thief-model").value;
  if (!name) { showError("thief-error", "choose a model first"); return; }
  show($("thief-busy"));
  try {
    const image = await bitmapOf(file);
    const form = new FormData();
    form.append("image", file, file.name || "image");
    const view = await apiJson(`/admin/models/${encodeURIComponent(name)}/thief-view`, { method: "POST", body: form });
    thiefSeen.image = image;
    thiefSeen.keyed = await decodeMask(base64Blob(view.with_key.mask_png));
    thiefSeen.stolen = await decodeMask(base64Blob(view.without_key.mask_png));
    redrawThief();
    const total = view.height * view.width;
    fillLegend($("thief-legend"), view.class_names, [classCounts(thiefSeen.keyed), classCounts(thiefSeen.stolen)], total);
    $("thief-keyed-caption").textContent = `(model version ${view.model_version}, key version ${view.key_version ?? "—"})`;
    $("thief-stolen-caption").textContent = `(${view.without_key_means})`;
    $("thief-summary").textContent = `${view.model} (${view.mode}): the two masks agree on ` +
      `${(100 * view.agreement).toFixed(1)} % of the pixels.`;
    fillAdvantage(view.advantage);
    show($("thief-result"));
  } catch (error) {
    showError("thief-error", error);
  } finally {
    show($("thief-busy"), false);
  }
}

function redrawThief() {
  if (!thiefSeen.keyed) return;
  const opacity = $("thief-opacity").value / 100;
  drawOverlay($("thief-keyed"), thiefSeen.image, thiefSeen.keyed, opacity);
  drawOverlay($("thief-stolen"), thiefSeen.image, thiefSeen.stolen, opacity);
}

function fmt(value, digits = 1) { return typeof value === "number" ? value.toFixed(digits) : "—"; }

function fillAdvantage(report) {
  const box = $("thief-advantage");
  box.replaceChildren();
  const p = document.createElement("p");
  if (!report) {
    p.textContent = "No suite report for this model. Run `seglock attack suite --model M --data D --json " +
      "HOME/models/M/suite.json` to measure what a thief with data gains from the stolen file.";
    box.appendChild(p);
    return;
  }
  p.textContent = `Largest thief's advantage: ${fmt(report.advantage)} mIoU points over the best honest alternative` +
    (typeof report.fraction === "number" ? `, with ${fmt(100 * report.fraction, 0)} % of the training data.` : ".");
  box.appendChild(p);
  const table = document.createElement("table");
  table.id = "advantage-table";
  const head = table.createTHead().insertRow();
  for (const label of ["Who", "mIoU", "Advantage (points)", "Seconds"]) {
    const th = document.createElement("th"); th.scope = "col"; th.textContent = label; head.appendChild(th);
  }
  const body = table.createTBody();
  const add = (who, miou, advantage, seconds) => {
    const row = body.insertRow();
    cell(row, who); cell(row, fmt(miou)); cell(row, fmt(advantage)); cell(row, fmt(seconds, 0));
  };
  const mean = (entry) => (entry && typeof entry === "object" ? entry.mIoU : undefined);
  add("owner, with the key", mean(report.owner));
  add("thief, stolen file, no key", mean(report.no_key));
  for (const [name, entry] of Object.entries(report.alternatives || {})) {
    if (entry) add(`honest alternative: ${name}`, mean(entry));
  }
  for (const attack of report.attacks || []) add(`attack: ${attack.name}`, attack.mIoU, attack.advantage, attack.seconds);
  box.appendChild(table);
}

// -- models and keys -------------------------------------------------------------------------

async function loadModels() {
  const models = await loadAdminModels();
  const body = $("models-table").querySelector("tbody");
  body.replaceChildren();
  for (const m of models) {
    const row = body.insertRow();
    row.dataset.model = m.name;
    const th = document.createElement("th"); th.scope = "row"; th.textContent = m.name; row.appendChild(th);
    const params = Object.entries(m.protection).filter(([k]) => k !== "mode").map(([k, v]) => `${k} ${v}`).join(", ");
    cell(row, params ? `${m.mode} (${params})` : m.mode);
    cell(row, `r${m.model_version}`, "model-version");
    cell(row, m.key_version === null ? "none" : `v${m.key_version}`, "key-version");
    cell(row, m.revisions.map((r) => `r${r}`).join(", "));
    cell(row, m.key_versions.map((k) => `v${k.version} ${k.state}`).join(", ") || "none");
    const td = row.insertCell();
    if (m.rotatable) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Rotate key";
      button.className = "rotate";
      button.setAttribute("aria-label", `Rotate the key of ${m.name}`);
      button.addEventListener("click", () => rotate(m));
      td.appendChild(button);
    } else {
      td.textContent = m.mode === "none" ? "no key" : "key fixed by training";
    }
  }
}

async function rotate(model) {
  const ok = await confirmDialog(`Rotate the key of ${model.name}?`,
    `A new key version replaces v${model.key_version}; the weights are re-indexed exactly (masks stay the same) ` +
    "and the old key is destroyed. Copies of the model made before keep working only with the old key, which no " +
    "longer exists.", "Rotate");
  if (!ok) return;
  showError("models-error", null);
  $("models-status").textContent = `Rotating ${model.name}…`;
  try {
    const result = await apiJson(`/admin/models/${encodeURIComponent(model.name)}/rotate-key`, { method: "POST" });
    await loadModels();
    $("models-status").textContent = `${result.model}: key version ${result.previous_key_version} → ${result.key_version} ` +
      `in ${result.seconds} s.`;
  } catch (error) {
    $("models-status").textContent = "";
    showError("models-error", error);
  }
}

// -- tokens ----------------------------------------------------------------------------------

async function loadTokens() {
  const [tokens, models] = await Promise.all([apiJson("/admin/tokens"), loadAdminModels()]);
  const picker = $("new-token-models");
  if (!picker.childElementCount || picker.dataset.models !== models.map((m) => m.name).join(",")) {
    picker.dataset.models = models.map((m) => m.name).join(",");
    picker.replaceChildren(...["*", ...models.map((m) => m.name)].map((name) => {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox"; box.value = name; box.className = "model-choice";
      label.append(box, ` ${name === "*" ? "all models (*)" : name}`);
      return label;
    }));
  }
  const body = $("tokens-table").querySelector("tbody");
  body.replaceChildren();
  const now = Date.now() / 1000;
  for (const t of tokens.tokens) {
    const row = body.insertRow();
    row.dataset.token = t.id;
    cell(row, t.id, "mono");
    cell(row, t.name);
    cell(row, t.scopes.join(", "));
    cell(row, t.models.join(", ") || "—");
    cell(row, when(t.created_at));
    cell(row, when(t.expires_at));
    const status = t.revoked ? "revoked" : t.expires_at !== null && t.expires_at <= now ? "expired" : "active";
    cell(row, status, `status ${status}`);
    const td = row.insertCell();
    if (status === "active") {
      const button = document.createElement("button");
      button.type = "button"; button.className = "revoke secondary"; button.textContent = "Revoke";
      button.setAttribute("aria-label", `Revoke token ${t.name} (${t.id})`);
      if (t.id === state.me.id) {
        button.disabled = true;
        button.title = "this is the token you are signed in with";
      }
      button.addEventListener("click", () => revoke(t));
      td.appendChild(button);
    }
  }
}

async function createToken(event) {
  event.preventDefault();
  showError("token-form-error", null);
  const scopes = ["segment", "admin"].filter((s) => $(`scope-${s}`).checked);
  const models = [...document.querySelectorAll(".model-choice:checked")].map((box) => box.value);
  const hours = $("new-token-hours").value.trim();
  const body = { name: $("new-token-name").value.trim(), scopes, models };
  if (hours) body.expires_in_s = Number(hours) * 3600;
  try {
    const made = await apiJson("/admin/tokens", { method: "POST", body });
    $("secret-value").textContent = made.token;
    $("secret-copied").textContent = "";
    $("secret-dialog").showModal();
    $("secret-copy").focus();
    $("token-form").reset();
    await loadTokens();
    $("tokens-status").textContent = `Made token ${made.name} (${made.id}).`;
  } catch (error) {
    showError("token-form-error", error);
  }
}

async function copySecret() {
  const text = $("secret-value").textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("secret-copied").textContent = "Copied to the clipboard.";
  } catch (err) {
    const range = document.createRange();
    range.selectNodeContents($("secret-value"));
    const selection = window.getSelection();
    selection.removeAllRanges(); selection.addRange(range);
    $("secret-copied").textContent = "Selected: press Ctrl+C (⌘C) to copy.";
  }
}

function forgetSecret() {
  $("secret-value").textContent = "";
  $("secret-copied").textContent = "";
}

async function revoke(t) {
  const ok = await confirmDialog(`Revoke token ${t.name}?`,
    `Token ${t.id} stops working on its next request, in every worker. This cannot be undone.`, "Revoke");
  if (!ok) return;
  showError("tokens-error", null);
  try {
    await api(`/admin/tokens/${encodeURIComponent(t.id)}`, { method: "DELETE" });
    await loadTokens();
    $("tokens-status").textContent = `Revoked token ${t.name} (${t.id}).`;
  } catch (error) {
    showError("tokens-error", error);
  }
}

// -- audit -----------------------------------------------------------------------------------

async function loadAudit(offset) {
  const limit = Number($("audit-limit").value);
  const params = new URLSearchParams({ offset: String(Math.max(0, offset)), limit: String(limit) });
  const action = $("audit-action").value.trim(), actor = $("audit-actor").value.trim();
  if (action) params.set("action", action);
  if (actor) params.set("actor", actor);
  showError("audit-error", null);
  let page;
  try {
    page = await apiJson(`/admin/audit?${params}`);
  } catch (error) {
    showError("audit-error", error);
    return;
  }
  state.audit = { offset: page.offset, limit: page.limit, total: page.total };
  const body = $("audit-table").querySelector("tbody");
  body.replaceChildren();
  for (const e of page.entries) {
    const row = body.insertRow();
    cell(row, when(e.time)); cell(row, e.actor, "mono"); cell(row, e.action);
    cell(row, e.target, "mono"); cell(row, e.outcome, `outcome ${e.outcome}`); cell(row, e.detail);
  }
  const first = page.total ? page.offset + 1 : 0;
  $("audit-range").textContent = `${first}–${page.offset + page.entries.length} of ${page.total}`;
  $("audit-prev").disabled = page.offset === 0;
  $("audit-next").disabled = page.offset + page.entries.length >= page.total;
}

// -- metrics ---------------------------------------------------------------------------------

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const pair of (match[2] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

function startMetrics() {
  stopMetrics();
  const tick = async () => {
    if (document.body.dataset.page !== "metrics") return;
    try {
      const text = await (await api("/metrics", { accept: "text/plain" })).text();  // admin-only since issue 13
      showError("metrics-error", null);
      renderMetrics(parseMetrics(text));
      $("metrics-updated").textContent = `Updated ${new Date().toLocaleTimeString()}.`;
    } catch (error) {
      showError("metrics-error", error);
    }
  };
  state.metricsTimer = setInterval(tick, METRICS_EVERY_MS);
  return tick();
}

function stopMetrics() {
  if (state.metricsTimer !== null) clearInterval(state.metricsTimer);
  state.metricsTimer = null;
}

function renderMetrics(samples) {
  const routes = new Map();
  const route = (labels) => {
    const key = `${labels.method} ${labels.route}`;
    if (!routes.has(key)) routes.set(key, { method: labels.method, route: labels.route, total: 0, c4: 0, c5: 0, sum: 0, count: 0 });
    return routes.get(key);
  };
  const models = new Map();
  const model = (name) => {
    if (!models.has(name)) models.set(name, { batches: 0, images: 0, seconds: 0, depth: 0 });
    return models.get(name);
  };
  for (const s of samples) {
    if (s.name === "seglock_requests_total") {
      const r = route(s.labels);
      r.total += s.value;
      if (s.labels.status.startsWith("4")) r.c4 += s.value;
      if (s.labels.status.startsWith("5")) r.c5 += s.value;
    } else if (s.name === "seglock_request_duration_seconds_sum") route(s.labels).sum += s.value;
    else if (s.name === "seglock_request_duration_seconds_count") route(s.labels).count += s.value;
    else if (s.name === "seglock_batch_size_sum") model(s.labels.model).images += s.value;
    else if (s.name === "seglock_batch_size_count") model(s.labels.model).batches += s.value;
    else if (s.name === "seglock_inference_seconds_sum") model(s.labels.model).seconds += s.value;
    else if (s.name === "seglock_queue_depth") model(s.labels.model).depth = s.value;
  }
  const now = performance.now();
  const before = state.lastMetrics;
  const body = $("metrics-routes").querySelector("tbody");
  body.replaceChildren();
  for (const [key, r] of [...routes].sort((a, b) => b[1].total - a[1].total)) {
    const row = body.insertRow();
    row.dataset.route = key;
    cell(row, r.method); cell(row, r.route, "mono"); cell(row, r.total, "num");
    cell(row, `${r.c4} / ${r.c5}`, "num");
    cell(row, r.count ? `${((1000 * r.sum) / r.count).toFixed(1)} ms` : "—", "num");
    const previous = before && before.routes.get(key);
    const rate = previous ? (r.total - previous.total) / ((now - before.at) / 1000) : null;
    cell(row, rate === null ? "—" : `${rate.toFixed(2)} /s`, "num");
  }
  const mbody = $("metrics-models").querySelector("tbody");
  mbody.replaceChildren();
  for (const [name, m] of [...models].sort()) {
    const row = mbody.insertRow();
    row.dataset.model = name;
    cell(row, name); cell(row, m.batches, "num"); cell(row, m.images, "num");
    cell(row, m.batches ? (m.images / m.batches).toFixed(2) : "—", "num");
    cell(row, m.batches ? `${((1000 * m.seconds) / m.batches).toFixed(1)} ms` : "—", "num");
    cell(row, m.depth, "num queue-depth");
  }
  state.lastMetrics = { at: now, routes };
}

// -- wiring ----------------------------------------------------------------------------------

function init() {
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token-input").value.trim();
    $("token-input").value = "";  // the field never keeps the token
    if (!value) { showError("signin-error", "paste a token first"); return; }
    showError("signin-error", null);
    signIn(value).catch((err) => showError("signin-error", err));
  });
  $("signout").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", route);

  $("try-model").addEventListener("change", modeNote);
  $("try-opacity").addEventListener("input", redrawTry);
  setupImageInput({ fileId: "try-file", sampleId: "try-sample", dropId: "try-drop", onImage: segmentFile });

  $("thief-opacity").addEventListener("input", redrawThief);
  setupImageInput({ fileId: "thief-file", sampleId: "thief-sample", onImage: thiefFile });

  $("token-form").addEventListener("submit", createToken);
  $("secret-copy").addEventListener("click", copySecret);
  $("secret-done").addEventListener("click", () => { $("secret-dialog").close(); });
  $("secret-dialog").addEventListener("close", forgetSecret);

  $("audit-form").addEventListener("submit", (event) => { event.preventDefault(); loadAudit(0); });
  $("audit-prev").addEventListener("click", () => loadAudit(state.audit.offset - state.audit.limit));
  $("audit-next").addEventListener("click", () => loadAudit(state.audit.offset + state.audit.limit));

  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && document.body.dataset.page === "metrics") startMetrics();
    else if (document.visibilityState !== "visible") stopMetrics();
  });

  const saved = token();
  if (saved) signIn(saved).catch((err) => signOut(err.message));
  else showPage("signin");
}

document.addEventListener("DOMContentLoaded", init);
