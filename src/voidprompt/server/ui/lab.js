// The Lab tab: design a study (from the txt2img form or an image), queue it, watch it run, compare
// two pictures. Loaded after app.js, whose helpers ($, el, api, showView, formBody, loadStudies,
// loadStudyGrid, loadReport) it uses; the routes are described in docs/server-lab.md.
"use strict";

const LAB = "/voidprompt/v1";

// The tab and its view are built here, so the page's own markup stays the A1111 tabs'.
const labTab = el("button", { id: "tab-lab", class: "tab", "data-view": "lab" }, "Lab");
document.querySelector("header nav").append(labTab);
labTab.addEventListener("click", () => { showView("lab"); labShown(); });

const labView = el("section", { id: "view-lab", class: "view", hidden: "" });
labView.innerHTML = `
  <div class="panel" id="lab-design">
    <h3>Design a study</h3>
    <div class="row">
      <label>Name <input id="lab-name" value="my-study" pattern="[A-Za-z0-9][A-Za-z0-9._-]*"></label>
      <label>Checkpoint <select id="lab-model"></select></label>
    </div>
    <div class="row">
      <button type="button" id="lab-from-form">From the txt2img form</button>
      <label class="filepick">From an image <input type="file" id="lab-from-image" accept="image/png,image/jpeg,image/webp"></label>
    </div>
    <h4>Fixed settings</h4>
    <div id="lab-fields" class="lab-rows"></div>
    <button type="button" id="lab-add-field">Add setting</button>
    <h4>Axes <span class="muted">(A1111's X/Y/Z syntax or the lab's: 3, 5, 7 / 1-3 (+0.5) / 8 random / 1:1 @ 1, 4:3 @ 1.5)</span></h4>
    <div id="lab-axes" class="lab-rows"></div>
    <button type="button" id="lab-add-axis">Add axis</button>
    <p id="lab-error" class="error" role="alert"></p>
    <div id="lab-summary" class="lab-summary"></div>
    <div class="row">
      <label class="checkline"><input type="checkbox" id="lab-overwrite"> replace an existing file</label>
      <button type="button" id="lab-save">Save</button>
      <button type="button" id="lab-save-queue" class="primary">Save and queue</button>
      <span id="lab-saved" class="muted"></span>
    </div>
  </div>
  <div class="panel" id="lab-queue-panel">
    <h3>Queue <span id="lab-queue-live" class="muted"></span></h3>
    <div class="row">
      <label>Study <select id="lab-queue-study"></select></label>
      <button type="button" id="lab-queue-add">Queue</button>
    </div>
    <p id="lab-queue-error" class="error" role="alert"></p>
    <table id="lab-queue" class="lab-queue"><thead><tr><th>#</th><th>study</th><th>state</th><th>progress</th><th>img/min</th><th>ETA</th><th></th></tr></thead><tbody></tbody></table>
  </div>
  <div class="panel wide" id="lab-compare-panel">
    <h3>Compare two images</h3>
    <div class="row">
      <label>Study A <select id="cmp-a-study"></select></label><label>image <input id="cmp-a-image" type="number" min="1" value="1"></label>
      <label>Study B <select id="cmp-b-study"></select></label><label>image <input id="cmp-b-image" type="number" min="1" value="2"></label>
      <button type="button" id="cmp-run">Compare</button>
    </div>
    <p id="cmp-error" class="error" role="alert"></p>
    <div id="cmp-result" class="cmp"></div>
  </div>`;
document.querySelector("main").append(labView);

// ------------------------------------------------------------------------------------- design
// Rows of (name, value): the fixed settings and the axes. A check error names "[section] key"; the
// row it belongs to shows it.
function labRow(container, kind, name = "", value = "") {
  const row = el("div", { class: "lab-row", "data-kind": kind },
    el("input", { class: "lab-key", value: name, placeholder: kind === "axis" ? "axis (cfg_scale, seed, size, sampler, W...)" : "field" }),
    el("input", { class: "lab-value", value: typeof value === "string" ? value : JSON.stringify(value), placeholder: "values" }),
    el("button", { type: "button", class: "lab-remove", title: "remove", onclick: () => { row.remove(); scheduleCheck(); } }, "x"),
    el("div", { class: "error lab-row-error" }));
  row.addEventListener("input", scheduleCheck);
  container.append(row);
  return row;
}
function rowsOf(container) {
  return [...container.querySelectorAll(".lab-row")].map((row) => ({
    row, key: row.querySelector(".lab-key").value.trim(), value: row.querySelector(".lab-value").value,
  })).filter((r) => r.key);
}
// Setting values are JSON where they read as JSON (numbers, true/false, lists), text otherwise.
function parsed(text) { try { return JSON.parse(text); } catch { return text; } }
const PROMPT_KEYS = { positive: "prompt", negative: "negative_prompt" };

function labForm() {
  const fields = Object.fromEntries(rowsOf($("#lab-fields")).map((r) => [r.key, r.key.includes("prompt") ? r.value : parsed(r.value)]));
  const axes = Object.fromEntries(rowsOf($("#lab-axes")).map((r) => [r.key, r.value]));
  const model = $("#lab-model").value ? { checkpoint: $("#lab-model").value } : {};
  return { name: $("#lab-name").value.trim() || "untitled", form: { fields, axes, model } };
}

function setFields(fields) {
  $("#lab-fields").replaceChildren();
  for (const [k, v] of Object.entries(fields)) {
    if (v === null || v === undefined || (Array.isArray(v) && v.length === 0)) continue;
    labRow($("#lab-fields"), "field", k, typeof v === "string" ? v : JSON.stringify(v));
  }
  scheduleCheck();
}

// The txt2img form as request fields: A1111's txt2img names, without what a study has no use for.
const TXT2IMG_FIELDS = ["prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "width", "height",
  "seed", "subseed", "subseed_strength", "enable_hr", "hr_upscaler", "hr_second_pass_steps", "denoising_strength", "hr_scale",
  "hr_resize_x", "hr_resize_y"];
$("#lab-from-form").addEventListener("click", () => {
  const body = formBody();
  const fields = Object.fromEntries(TXT2IMG_FIELDS.filter((k) => body[k] !== undefined).map((k) => [k, body[k]]));
  if (body.override_settings && body.override_settings.CLIP_stop_at_last_layers) fields.clip_skip = body.override_settings.CLIP_stop_at_last_layers;
  if (body.tiling) fields.tiling = true;
  if (body.styles && body.styles.length) fields.styles = body.styles;
  if (fields.subseed_strength === 0) { delete fields.subseed; delete fields.subseed_strength; }
  setFields(fields);
});
$("#lab-from-image").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  if (!file) return;
  $("#lab-error").textContent = "";
  try {
    const info = await api("POST", "/sdapi/v1/png-info", { image: await fileToB64(file) });
    if (!info.info) throw new Error("no generation parameters in that image");
    const r = await api("POST", `${LAB}/design/from-infotext`, { infotext: info.info });
    setFields(r.fields);
  } catch (err) { $("#lab-error").textContent = err.message; }
});
$("#lab-add-field").addEventListener("click", () => labRow($("#lab-fields"), "field").querySelector("input").focus());
$("#lab-add-axis").addEventListener("click", () => labRow($("#lab-axes"), "axis").querySelector("input").focus());
$("#lab-name").addEventListener("input", () => scheduleCheck());
$("#lab-model").addEventListener("change", () => scheduleCheck());

let checkTimer = null;
let checkTicket = 0;
function scheduleCheck() { clearTimeout(checkTimer); checkTimer = setTimeout(runCheck, 300); }

function rowFor(field) {
  // "[axes] W", "[settings] steps", "[prompt] positive", "[[points]] #1 W"
  const m = /^\[(\w+)\] (\S+)/.exec(field || "");
  if (!m) return null;
  const [, section, key] = m;
  const rows = section === "axes" ? rowsOf($("#lab-axes")) : rowsOf($("#lab-fields"));
  const wanted = section === "prompt" ? (PROMPT_KEYS[key.replace(/_step$/, "")] || key) : key;
  return (rows.find((r) => r.key === wanted) || {}).row || null;
}

async function runCheck() {
  const ticket = ++checkTicket;
  document.querySelectorAll(".lab-row-error").forEach((n) => { n.textContent = ""; });
  document.querySelectorAll(".lab-row.invalid").forEach((n) => n.classList.remove("invalid"));
  $("#lab-error").textContent = "";
  let r;
  try { r = await api("POST", `${LAB}/design/check`, labForm()); } catch (err) {
    if (ticket === checkTicket) { $("#lab-error").textContent = err.message; $("#lab-summary").replaceChildren(); }
    return;
  }
  if (ticket !== checkTicket) return;
  labView.dataset.valid = String(r.valid);
  if (!r.valid) {
    const row = rowFor(r.field);
    if (row) { row.classList.add("invalid"); row.querySelector(".lab-row-error").textContent = r.error; }
    else $("#lab-error").textContent = r.error;
    $("#lab-summary").replaceChildren(el("span", { class: "muted" }, r.field ? `at ${r.field}` : ""));
    return;
  }
  const estimate = r.estimated_seconds === null ? "unknown until some images are made" : duration(r.estimated_seconds);
  $("#lab-summary").replaceChildren(
    el("div", { id: "lab-jobs", class: "big" }, `${r.jobs} images`),
    el("div", {}, "shapes: " + r.shapes.map((s) => `${s.width}x${s.height} (${s.jobs})`).join(", ")),
    el("div", {}, `estimated time: ${estimate}`),
    el("ul", { id: "lab-axis-values" }, ...Object.entries(r.axes).map(([name, values]) =>
      el("li", {}, el("strong", {}, name), `: ${values.slice(0, 12).join(", ")}${values.length > 12 ? `, ... (${values.length})` : ""}`))));
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h}h ${String(m).padStart(2, "0")}m` : `${m}m ${String(s % 60).padStart(2, "0")}s`;
}

async function save(queue) {
  $("#lab-saved").textContent = "";
  $("#lab-error").textContent = "";
  try {
    const saved = await api("POST", `${LAB}/design/save`, { ...labForm(), overwrite: $("#lab-overwrite").checked });
    $("#lab-saved").textContent = `saved ${saved.path} (${saved.jobs} images)`;
    await refreshStudyLists();
    if (queue) await queueAction("POST", `${LAB}/queue`, { study: saved.study });
  } catch (err) { $("#lab-error").textContent = err.message; }
}
$("#lab-save").addEventListener("click", () => save(false));
$("#lab-save-queue").addEventListener("click", () => save(true));

// -------------------------------------------------------------------------------------- queue
async function queueAction(method, path, body) {
  $("#lab-queue-error").textContent = "";
  try { return await api(method, path, body); } catch (err) { $("#lab-queue-error").textContent = err.message; return null; }
}
$("#lab-queue-add").addEventListener("click", () => queueAction("POST", `${LAB}/queue`, { study: $("#lab-queue-study").value }));

let queueState = { items: [] };
function drawQueue(snapshot) {
  queueState = snapshot;
  const q = (id) => `${LAB}/queue/${encodeURIComponent(id)}`;
  const rows = snapshot.items.map((item, index) => {
    const act = (label, verb, extra = {}) => el("button", {
      type: "button", class: `q-${verb}`, ...extra,
      onclick: () => verb === "up" || verb === "down"
        ? queueAction("POST", `${q(item.study)}/move`, { position: Math.max(0, index + (verb === "up" ? -1 : 1)) })
        : verb === "remove" ? queueAction("DELETE", q(item.study)) : queueAction("POST", `${q(item.study)}/${verb}`),
    }, label);
    const buttons = [];
    if (item.state === "running" || item.state === "queued") buttons.push(act("Pause", "pause"));
    if (["paused", "cancelled", "failed"].includes(item.state)) buttons.push(act("Resume", "resume"));
    if (!["done", "cancelled"].includes(item.state)) buttons.push(act("Cancel", "cancel"));
    buttons.push(act("Up", "up"), act("Down", "down"));
    if (item.state !== "running") buttons.push(act("Remove", "remove"));
    buttons.push(el("button", { type: "button", class: "q-open", onclick: () => openStudy(item.study) }, "Open"));
    return el("tr", { "data-study": item.study, "data-state": item.state },
      el("td", {}, String(index + 1)), el("td", {}, item.study),
      el("td", { class: "q-state", title: item.message }, item.state),
      el("td", {}, el("progress", { max: String(item.total || 1), value: String(item.done) }), ` ${item.done}/${item.total}`),
      el("td", { class: "q-rate" }, item.images_per_minute ? item.images_per_minute.toFixed(1) : "-"),
      el("td", { class: "q-eta" }, duration(item.eta_seconds)),
      el("td", { class: "row" }, ...buttons));
  });
  $("#lab-queue tbody").replaceChildren(...rows);
  followOpenStudy(snapshot);
}

let events = null;
function connectQueue() {
  if (events) return;
  events = new EventSource(`${LAB}/queue/events`);
  events.addEventListener("queue", (e) => { $("#lab-queue-live").textContent = "live"; drawQueue(JSON.parse(e.data)); });
  events.onerror = () => { $("#lab-queue-live").textContent = "reconnecting..."; };
}

// A study open in the Studies tab while it runs: its grid and its report's plots follow the run
// (the report is rebuilt at most every 15 s; the server redraws it only when the catalog changed).
let lastRefresh = 0;
let lastDone = {};
function followOpenStudy(snapshot) {
  const open = $("#study-select") && $("#study-select").value;
  const item = snapshot.items.find((i) => i.study === open);
  if (!item || $("#view-studies").hidden || lastDone[open] === item.done) return;
  lastDone[open] = item.done;
  const now = Date.now();
  if (now - lastRefresh < 15000 && item.state === "running") return;
  lastRefresh = now;
  loadStudyGrid(false).then(() => loadReport(open, false)).catch(() => {});
}

async function openStudy(id) {
  const select = $("#study-select");
  if (![...select.options].some((o) => o.value === id)) select.append(el("option", { value: id }, id));
  select.value = id;
  showView("studies");
}

// ------------------------------------------------------------------------------------ compare
$("#cmp-run").addEventListener("click", async () => {
  $("#cmp-error").textContent = "";
  const params = new URLSearchParams({
    a_study: $("#cmp-a-study").value, a_image: $("#cmp-a-image").value,
    b_study: $("#cmp-b-study").value, b_image: $("#cmp-b-image").value,
  });
  try {
    const r = await api("GET", `${LAB}/compare?${params}`);
    const side = (s) => el("figure", { class: "cmp-side" }, el("img", { src: s.url, alt: `${s.study} #${s.image}` }),
      el("figcaption", {}, `${s.study} #${s.image}`));
    const diff = Object.entries(r.differences);
    $("#cmp-result").replaceChildren(side(r.a), side(r.b),
      el("table", { id: "cmp-diff" }, el("tr", {}, el("th", {}, "differs"), el("th", {}, "A"), el("th", {}, "B")),
        ...(diff.length ? diff.map(([k, [a, b]]) => el("tr", {}, el("td", {}, k), el("td", {}, JSON.stringify(a)), el("td", {}, JSON.stringify(b))))
          : [el("tr", {}, el("td", { colspan: "3" }, "the same request"))])));
    $("#lab-compare-panel").scrollIntoView();
  } catch (err) { $("#cmp-error").textContent = err.message; }
});

// Two pictures picked in the Studies grid (each click there picks one; the last two are kept) are
// compared with one button, which fills the Lab's compare form and runs it.
const picks = [];
const pickBar = el("div", { id: "compare-picks", class: "panel wide" },
  el("span", { id: "compare-picks-text", class: "muted" }, "Click two pictures of the grid to compare them."),
  el("button", { type: "button", id: "compare-picks-run", disabled: "" }, "Compare these two"));
document.querySelector("#view-studies").append(pickBar);
document.querySelector("#study-grid").addEventListener("click", (e) => {
  const m = e.target.tagName === "IMG" && /\/studies\/([^/]+)\/images\/(\d+)\/file/.exec(e.target.getAttribute("src") || "");
  if (!m) return;
  picks.push({ study: decodeURIComponent(m[1]), image: m[2] });
  if (picks.length > 2) picks.shift();
  $("#compare-picks-text").textContent = "Picked: " + picks.map((p) => `${p.study} #${p.image}`).join(" and ");
  if (picks.length === 2) $("#compare-picks-run").removeAttribute("disabled");
});
$("#compare-picks-run").addEventListener("click", async () => {
  showView("lab");
  await labShown();
  const [a, b] = picks;
  $("#cmp-a-study").value = a.study; $("#cmp-a-image").value = a.image;
  $("#cmp-b-study").value = b.study; $("#cmp-b-image").value = b.image;
  $("#cmp-run").click();
});

// ---------------------------------------------------------------------------------- the tab
async function refreshStudyLists() {
  const list = await api("GET", `${LAB}/studies`);
  for (const id of ["#lab-queue-study", "#cmp-a-study", "#cmp-b-study"]) {
    const select = $(id);
    const current = select.value;
    select.replaceChildren(...list.map((s) => el("option", { value: s.id }, `${s.name} (${s.images}/${s.jobs || "?"})`)));
    if (current && list.some((s) => s.id === current)) select.value = current;
  }
}

let labReady = false;
async function labShown() {
  connectQueue();
  await refreshStudyLists().catch((err) => { $("#lab-queue-error").textContent = err.message; });
  if (labReady) return;
  labReady = true;
  try {
    const models = await api("GET", "/sdapi/v1/sd-models");
    $("#lab-model").replaceChildren(...models.map((m) => el("option", { value: m.filename }, m.title)));
    const current = $("#model-select") && $("#model-select").value;
    const match = models.find((m) => m.title === current);
    if (match) $("#lab-model").value = match.filename;
  } catch (err) { $("#lab-error").textContent = err.message; }
  if (!$("#lab-fields .lab-row")) $("#lab-from-form").click();
  if (!$("#lab-axes .lab-row")) { labRow($("#lab-axes"), "axis", "cfg_scale", "3, 5, 7"); labRow($("#lab-axes"), "axis", "seed", "2 random"); }
  scheduleCheck();
}
