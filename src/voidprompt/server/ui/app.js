// voidprompt web UI: plain JavaScript over the server's own routes (/sdapi/v1, /voidprompt/v1).
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
};

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) { init.headers["content-type"] = "application/json"; init.body = JSON.stringify(body); }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : response.statusText);
  return data;
}

// ---------------------------------------------------------------------------------------- tabs
document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => showView(tab.dataset.view)));
function showView(name) {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.view === name));
  document.querySelectorAll(".view").forEach((v) => { v.hidden = v.id !== `view-${name}`; });
  if (name === "studies" || name === "label") loadStudies();
}

// Optional lists (styles, networks, upscalers, VAEs): a route that fails leaves its control empty
// and says why, instead of stopping the page.
async function optional(path, fallback) {
  try { return await api("GET", path); } catch (err) {
    $("#gen-error").textContent = `${path}: ${err.message}`;
    return fallback;
  }
}

// ------------------------------------------------------------------------------------ generate
let lastInfo = null;
let initImageB64 = null;
let maskB64 = null;

async function initGenerate() {
  const [samplers, schedulers, options] = await Promise.all([
    api("GET", "/sdapi/v1/samplers"), api("GET", "/sdapi/v1/schedulers"), api("GET", "/sdapi/v1/options"),
  ]);
  $("#sampler").replaceChildren(...samplers.map((s) => el("option", { value: s.name }, s.name)));
  $("#sampler").value = "Euler a";
  $("#scheduler").replaceChildren(...schedulers.map((s) => el("option", { value: s.label }, s.label)));
  $("#clip_skip").value = options.CLIP_stop_at_last_layers;
  await loadModels(options.sd_model_checkpoint);
  const [styles, upscalers, latentModes, vaes] = await Promise.all([
    optional("/sdapi/v1/prompt-styles", []), optional("/sdapi/v1/upscalers", []),
    optional("/sdapi/v1/latent-upscale-modes", []), optional("/sdapi/v1/sd-vae", []),
  ]);
  $("#styles").replaceChildren(...(styles.length ? styles.map((s) => el("option", { value: s.name, title: [s.prompt, s.negative_prompt].filter(Boolean).join(" | ") }, s.name))
    : [el("option", { disabled: "", value: "" }, "no styles: serve reads styles.csv, or --styles-file FILE")]));
  // A1111's hires list: the latent modes first, then the pixel and model upscalers.
  const hires = [...latentModes.map((m) => m.name), ...upscalers.map((u) => u.name)];
  $("#hr_upscaler").replaceChildren(...hires.map((n) => el("option", { value: n }, n)));
  $("#hr_upscaler").value = hires.includes("Latent") ? "Latent" : hires[0] || "";
  for (const id of ["#upscaler_1", "#upscaler_2"]) {
    $(id).replaceChildren(...upscalers.map((u) => el("option", { value: u.name }, u.name)));
    $(id).value = "None";
  }
  $("#vae-select").replaceChildren(...["Automatic", "None", ...vaes.map((v) => v.model_name)].map((n) => el("option", { value: n }, n)));
  $("#vae-select").value = options.sd_vae || "Automatic";
  await loadNetworks();
  updateHiresInfo();
}

// Checkpoints of every family side by side; the family comes from the file's tensor shapes.
const FAMILIES = {
  "sd1": ["SD1", 512], "sd1-inpaint": ["SD1 inpainting", 512],
  "sdxl": ["SDXL", 1024], "sdxl-inpaint": ["SDXL inpainting", 1024], "sdxl-refiner": ["SDXL refiner", 1024],
  "sd2": ["SD2 (not supported)", 768], "sd2-v": ["SD2 (not supported)", 768],
};
let models = [];
// Width and height start at the model's native size (the miniature's 128, SD1's 512, SDXL's 1024)
// and follow a checkpoint switch until the person types a size or a picture's parameters fill it.
let sizeFollowsModel = true;
["#width", "#height"].forEach((id) => $(id).addEventListener("input", (e) => { if (e.isTrusted) sizeFollowsModel = false; }));
function showModel(title) {
  $("#model-name").textContent = title || "no model";
  const model = models.find((m) => m.title === title);
  const family = model && FAMILIES[model.family];
  const side = model && (model.native_size || (family && family[1]));
  $("#model-family").textContent = family ? `${family[0]} - trained at ${side}x${side}` : (model && model.family) || "";
  if (model) $("#model-select").value = model.title;
  if (side && sizeFollowsModel) {
    $("#width").value = side; $("#height").value = side;
    updateHiresInfo();
  }
}
async function loadModels(current) {
  models = await api("GET", "/sdapi/v1/sd-models");
  $("#model-select").replaceChildren(...models.map((m) => {
    const family = FAMILIES[m.family];
    return el("option", { value: m.title, "data-family": m.family || "" }, `${m.model_name} - ${family ? family[0] : (m.family || "?")}`);
  }));
  showModel(current);
}
$("#model-select").addEventListener("change", async (e) => {
  const select = e.target;
  const previous = $("#model-name").textContent;
  select.disabled = true;
  $("#gen-error").textContent = "";
  $("#model-name").textContent = "loading...";
  try {
    await api("POST", "/sdapi/v1/options", { sd_model_checkpoint: select.value });
    showModel((await api("GET", "/sdapi/v1/options")).sd_model_checkpoint);
    await loadNetworks();  // embeddings load per model: the list follows the checkpoint
  } catch (err) {
    $("#gen-error").textContent = err.message;
    showModel(previous);
  } finally {
    select.disabled = false;
  }
});

// The VAE applies from the next picture on (A1111's sd_vae option).
$("#vae-select").addEventListener("change", async (e) => {
  const select = e.target;
  select.disabled = true;
  $("#gen-error").textContent = "";
  try {
    await api("POST", "/sdapi/v1/options", { sd_vae: select.value });
    select.value = (await api("GET", "/sdapi/v1/options")).sd_vae;
  } catch (err) {
    $("#gen-error").textContent = err.message;
  } finally {
    select.disabled = false;
  }
});

function setMode(name) {
  document.querySelector(`input[name=mode][value=${name}]`).checked = true;
  $("#img2img-fields").hidden = name !== "img2img";
  // Hires. fix is txt2img's: A1111's img2img tab has no such section.
  $("#hires-fields").hidden = name !== "txt2img";
}
document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", () => setMode(mode())));

// ------------------------------------------------------------------------------------ hires fix
$("#enable_hr").addEventListener("change", () => { $("#hires-body").hidden = !$("#enable_hr").checked; updateHiresInfo(); });
["#hr_scale", "#hr_resize_x", "#hr_resize_y", "#width", "#height"].forEach((id) => $(id).addEventListener("input", updateHiresInfo));
// The size the second pass ends at, shown as A1111 shows it ("from 512x512 to 1024x1024"); the
// server's pipeline/hires.py (A1111's calculate_target_resolution) decides the real one.
function hiresSize() {
  const w = num("#width"), h = num("#height"), rx = num("#hr_resize_x"), ry = num("#hr_resize_y");
  if (rx === 0 && ry === 0) return [Math.floor(w * num("#hr_scale")), Math.floor(h * num("#hr_scale"))];
  if (ry === 0) return [rx, Math.floor(rx * h / w)];
  if (rx === 0) return [Math.floor(ry * w / h), ry];
  return [rx, ry];
}
function updateHiresInfo() {
  const [w, h] = hiresSize();
  $("#hr-info").textContent = $("#enable_hr").checked ? `from ${num("#width")}x${num("#height")} to ${w}x${h}` : "";
}

$("#seed-extra").addEventListener("change", () => { $("#seed-extra-fields").hidden = !$("#seed-extra").checked; });

// -------------------------------------------------------------------------------- extra networks
// Cards insert A1111's tags where the cursor was in the prompt (or the negative prompt, when that was
// the last one edited): <lora:name:1>, <hypernet:name:1>, an embedding by its name.
let promptTarget = "#prompt";
["#prompt", "#negative_prompt"].forEach((id) => $(id).addEventListener("focus", () => { promptTarget = id; }));
function insertAtCursor(textarea, text) {
  const start = textarea.selectionStart ?? textarea.value.length, end = textarea.selectionEnd ?? start;
  const before = textarea.value.slice(0, start), after = textarea.value.slice(end);
  const left = before && !/[\s,(]$/.test(before) ? " " : "";
  const right = after && !/^[\s,)]/.test(after) ? " " : "";
  textarea.value = before + left + text + right + after;
  const cursor = (before + left + text).length;
  textarea.setSelectionRange(cursor, cursor);
  textarea.dispatchEvent(new Event("input"));
}
$("#networks-toggle").addEventListener("click", () => {
  const panel = $("#networks");
  panel.hidden = !panel.hidden;
  $("#networks-toggle").setAttribute("aria-expanded", String(!panel.hidden));
});
async function loadNetworks() {
  const [embeddings, hypernetworks, loras] = await Promise.all([
    optional("/sdapi/v1/embeddings", { loaded: {}, skipped: {} }), optional("/sdapi/v1/hypernetworks", []),
    optional("/sdapi/v1/loras", []),
  ]);
  const card = (kind, name, tag, title) => el("button", {
    type: "button", class: `card ${kind}`, "data-tag": tag, title,
    onclick: () => { const box = $(promptTarget); insertAtCursor(box, tag); box.focus(); },
  }, name);
  const empty = (what) => el("span", { class: "muted" }, `no ${what} in this server's folder`);
  const names = Object.keys(embeddings.loaded || {});
  $("#networks-embeddings").replaceChildren(...(names.length ? names.map((n) => card("embedding", n, n, `${embeddings.loaded[n].vectors} vectors`)) : [empty("embeddings for this model")]));
  $("#networks-hypernetworks").replaceChildren(...(hypernetworks.length ? hypernetworks.map((h) => card("hypernetwork", h.name, `<hypernet:${h.name}:1>`, h.path)) : [empty("hypernetworks")]));
  $("#networks-loras").replaceChildren(...(loras.length ? loras.map((l) => card("lora", l.alias !== l.name ? `${l.name} (${l.alias})` : l.name, `<lora:${l.name}:1>`, l.path)) : [empty("LoRAs")]));
}
const mode = () => document.querySelector("input[name=mode]:checked").value;
const num = (id) => Number($(id).value);

function fileToB64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = reject;
    reader.readAsDataURL(file);
  });
}
$("#init_image").addEventListener("change", async (e) => {
  setInitImage(e.target.files[0] ? await fileToB64(e.target.files[0]) : null);
});
$("#mask_image").addEventListener("change", async (e) => { maskB64 = e.target.files[0] ? await fileToB64(e.target.files[0]) : null; });

// ----------------------------------------------------------------------------------- mask canvas
// The canvas has the init image's own pixel size and sits over it; strokes are opaque white (shown
// half transparent), erasing clears them. The mask sent is black with white where drawn, A1111's
// "white = repaint".
const maskCanvas = $("#mask-canvas");
let maskDrawn = false;
function setInitImage(src) {
  initImageB64 = src;
  $("#mask-editor").hidden = !src;
  if (!src) return;
  const image = $("#init-preview");
  image.onload = () => {
    maskCanvas.width = image.naturalWidth;
    maskCanvas.height = image.naturalHeight;
    maskDrawn = false;
  };
  image.src = src;
}
$("#brush-size").addEventListener("input", () => { $("#brush-size-value").textContent = $("#brush-size").value; });
$("#mask-clear").addEventListener("click", () => {
  maskCanvas.getContext("2d").clearRect(0, 0, maskCanvas.width, maskCanvas.height);
  maskDrawn = false;
});
function canvasPoint(e) {
  const r = maskCanvas.getBoundingClientRect();
  return [(e.clientX - r.left) * maskCanvas.width / r.width, (e.clientY - r.top) * maskCanvas.height / r.height];
}
let stroke = null;
function paint(to) {
  const ctx = maskCanvas.getContext("2d");
  const r = maskCanvas.getBoundingClientRect();
  const erase = document.querySelector("input[name=mask-tool]:checked").value === "erase";
  ctx.globalCompositeOperation = erase ? "destination-out" : "source-over";
  ctx.strokeStyle = ctx.fillStyle = "#fff";
  // The brush size is in screen pixels, as in A1111's editor; the canvas may be shown scaled.
  ctx.lineWidth = num("#brush-size") * maskCanvas.width / r.width;
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  if (to === stroke) {
    // A click paints a dot: canvases draw nothing for a zero-length line.
    ctx.arc(to[0], to[1], ctx.lineWidth / 2, 0, 2 * Math.PI);
    ctx.fill();
  } else {
    ctx.moveTo(...stroke);
    ctx.lineTo(...to);
    ctx.stroke();
  }
  stroke = to;
  if (!erase) maskDrawn = true;
}
maskCanvas.addEventListener("pointerdown", (e) => { e.preventDefault(); stroke = canvasPoint(e); paint(stroke); });
maskCanvas.addEventListener("pointermove", (e) => { if (stroke && e.buttons) paint(canvasPoint(e)); });
["pointerup", "pointerleave"].forEach((t) => maskCanvas.addEventListener(t, () => { stroke = null; }));
function drawnMask() {
  const out = document.createElement("canvas");
  out.width = maskCanvas.width; out.height = maskCanvas.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(maskCanvas, 0, 0);
  return out.toDataURL("image/png");
}

function formBody() {
  const body = {
    prompt: $("#prompt").value, negative_prompt: $("#negative_prompt").value,
    sampler_name: $("#sampler").value, scheduler: $("#scheduler").value,
    steps: num("#steps"), cfg_scale: num("#cfg_scale"), width: num("#width"), height: num("#height"),
    batch_size: num("#batch_size"), n_iter: num("#n_iter"), seed: num("#seed"),
    subseed: num("#subseed"), subseed_strength: num("#subseed_strength"),
    override_settings: { CLIP_stop_at_last_layers: num("#clip_skip") },
    styles: [...$("#styles").selectedOptions].map((o) => o.value), tiling: $("#tiling").checked,
  };
  if (num("#seed_resize_from_w") > 0 && num("#seed_resize_from_h") > 0) {
    Object.assign(body, { seed_resize_from_w: num("#seed_resize_from_w"), seed_resize_from_h: num("#seed_resize_from_h") });
  }
  if (mode() === "txt2img" && $("#enable_hr").checked) {
    Object.assign(body, {
      enable_hr: true, hr_upscaler: $("#hr_upscaler").value, hr_second_pass_steps: num("#hr_second_pass_steps"),
      denoising_strength: num("#hr_denoising_strength"), hr_scale: num("#hr_scale"),
      hr_resize_x: num("#hr_resize_x"), hr_resize_y: num("#hr_resize_y"),
    });
  }
  if (mode() === "img2img") {
    Object.assign(body, {
      init_images: initImageB64 ? [initImageB64] : [], denoising_strength: num("#denoising_strength"),
      resize_mode: num("#resize_mode"), mask_blur: num("#mask_blur"), inpainting_fill: num("#inpainting_fill"),
      inpaint_full_res: $("#inpaint_full_res").value === "true", inpainting_mask_invert: num("#inpainting_mask_invert"),
    });
    if (maskB64) body.mask = maskB64; else if (maskDrawn) body.mask = drawnMask();
  }
  return body;
}

let polling = null;
function startPolling() {
  polling = setInterval(async () => {
    try {
      const p = await api("GET", "/sdapi/v1/progress");
      $("#progress").value = p.progress;
      if (p.state.job_count > 0) $("#progress-text").textContent = progressText(p);
      if (p.current_image) { $("#live-preview").src = "data:image/png;base64," + p.current_image; $("#live-preview").hidden = false; }
    } catch (e) { /* the next poll will tell */ }
  }, 300);
}
function stopPolling() { clearInterval(polling); $("#progress").value = 0; $("#progress-text").textContent = ""; $("#live-preview").hidden = true; }
// A1111's progress bar words: "42% ETA: 3s", a minute and over as "01:05", an hour as "01:00:05".
function etaText(seconds) {
  const whole = Math.floor(seconds), two = (n) => String(n).padStart(2, "0");
  if (seconds > 3600) return `${two(Math.floor(whole / 3600))}:${two(Math.floor(whole / 60) % 60)}:${two(whole % 60)}`;
  if (seconds > 60) return `${two(Math.floor(whole / 60))}:${two(whole % 60)}`;
  return `${whole}s`;
}
function progressText(p) {
  const parts = [];
  if (p.progress > 0) parts.push(`${(p.progress * 100).toFixed(0)}%`);
  if (p.eta_relative) parts.push(`ETA: ${etaText(p.eta_relative)}`);
  return parts.join(" ");
}

$("#gen-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("#gen-error").textContent = "";
  $("#generate").disabled = true;
  startPolling();
  try {
    // Explain runs through voidprompt's own route (A1111's has no such field); the pictures are the same.
    const body = formBody();
    const explain = $("#explain").checked;
    if (explain) body.explain = { per_token: false, preview_every: 1 };
    const data = await api("POST", `${explain ? "/voidprompt/v1" : "/sdapi/v1"}/${mode()}`, body);
    lastInfo = JSON.parse(data.info);
    showGallery(data.images, lastInfo, data.explanations || []);
  } catch (err) {
    $("#gen-error").textContent = err.message;
  } finally {
    stopPolling();
    $("#generate").disabled = false;
  }
});
$("#interrupt").addEventListener("click", () => api("POST", "/sdapi/v1/interrupt"));
$("#skip").addEventListener("click", () => api("POST", "/sdapi/v1/skip"));
$("#seed-random").addEventListener("click", () => { $("#seed").value = -1; });
$("#seed-reuse").addEventListener("click", () => { if (lastInfo) $("#seed").value = lastInfo.seed; });

let galleryFiles = [];
function showGallery(images, info, explanations = []) {
  const gallery = $("#gallery");
  gallery.replaceChildren();
  galleryFiles = images.map((b64, i) => ({ name: `${String(i).padStart(5, "0")}-${info.all_seeds[i]}.png`, b64 }));
  $("#gallery-actions").hidden = !images.length;
  $("#gen-explain").hidden = true;
  images.forEach((b64, i) => {
    const src = "data:image/png;base64," + b64;
    const seed = info.all_seeds[i];
    const explanation = explanations.find((x) => x.image === i);
    const title = `Image ${i + 1}, seed ${seed}`;
    gallery.append(el("figure", { class: "result" },
      el("img", { src, alt: `seed ${seed}` }),
      el("div", { class: "row" },
        el("button", { type: "button", class: "send-img2img", onclick: () => sendToImg2img(src) }, "Send to img2img"),
        el("button", { type: "button", class: "send-extras", onclick: () => sendToExtras(src) }, "Send to extras"),
        el("button", { type: "button", class: "reuse-seed", onclick: () => { $("#seed").value = seed; } }, `Reuse seed ${seed}`),
        ...(explanation ? [el("button", { type: "button", class: "show-explain",
          onclick: () => showExplanation($("#gen-explain"), explanation.url, title) }, "Explain")] : [])),
      el("pre", { class: "infotext" }, info.infotexts[i])));
  });
  if (explanations.length) showExplanation($("#gen-explain"), explanations[0].url, `Image 1, seed ${info.all_seeds[0]}`);
}

// --------------------------------------------------------------------------------- explanations
// One view for a generation's explanation and a study image's: a tag picker whose heatmap the
// server draws over the picture, and a step slider over the trajectory's previews (A1111's
// live-preview subjects and the map of |cond - uncond|).
const fmt = (v) => (v === null || v === undefined ? "-" : Number(v).toPrecision(3));
const SUBJECTS = [["prompt", "Prompt"], ["negative", "Negative prompt"], ["combined", "Combined"], ["difference", "Difference |cond \u2212 uncond|"]];
let explainTicket = 0;
async function showExplanation(box, url, title) {
  const ticket = ++explainTicket;
  box.hidden = false;
  box.classList.add("explain");
  box.replaceChildren(el("p", { class: "muted" }, "loading the explanation..."));
  let d;
  try {
    d = await api("GET", url);
  } catch (err) {
    if (ticket === explainTicket) box.replaceChildren(el("p", { class: "error explain-error" }, err.message));
    return;
  }
  if (ticket !== explainTicket) return;
  const tagSelect = el("select", { class: "explain-tag" });
  for (const [branch, name] of [["positive", "Prompt"], ["negative", "Negative prompt"]]) {
    const tags = d.tags.filter((t) => t.branch === branch);
    if (!tags.length) continue;
    tagSelect.append(el("optgroup", { label: name }, ...tags.map((t) =>
      el("option", { value: t.key }, `${t.part ? `AND #${t.part}: ` : ""}${t.label} \u00b7 weight ${t.weight}`))));
  }
  const windowSelect = el("select", { class: "explain-window" }, ...d.windows.map((w) => el("option", { value: w }, w)));
  const overlay = el("img", { class: "overlay explain-overlay", alt: "attention over the picture" });
  const measures = el("p", { class: "caption explain-measures" });
  function drawTag() {
    const key = tagSelect.value, win = windowSelect.value;
    const tag = d.tags.find((t) => t.key === key);
    const m = tag && tag.measures[win];
    if (!m) {
      overlay.removeAttribute("src");
      measures.textContent = tag ? `no map: the ${tag.branch} prompt's pass did not run in ${win}` : "no tags";
      return;
    }
    overlay.src = `${d.heatmap_url}?tag=${encodeURIComponent(key)}&window=${encodeURIComponent(win)}`;
    measures.textContent = `${tag.label} (weight ${tag.weight}, ${win}): attention share ${fmt(m.mass_share)}, ` +
      `peak at x ${fmt(m.peak_x)} y ${fmt(m.peak_y)}, spread ${fmt(m.spread)}; ` +
      `guidance difference ${fmt(d.guidance_differences[win])}`;
  }
  tagSelect.addEventListener("change", drawTag);
  windowSelect.addEventListener("change", drawTag);

  const last = Math.max(0, d.previews.length - 1);
  const slider = el("input", { type: "range", class: "explain-step", min: "0", max: String(last), value: String(last) });
  const stepLabel = el("span", { class: "muted explain-step-label" });
  const steps = el("div", { class: "steps explain-previews" });
  function drawStep() {
    const p = d.previews[Number(slider.value)];
    if (!p) { stepLabel.textContent = "no previews"; steps.replaceChildren(); return; }
    stepLabel.textContent = `preview ${Number(slider.value) + 1} of ${d.previews.length}: ` +
      `call ${p.call + 1} of ${d.calls.length} (${p.pass_name} pass), sigma ${fmt(p.sigma)}`;
    steps.replaceChildren(...SUBJECTS.map(([subject, name]) => el("figure", { "data-subject": subject },
      p.subjects[subject] ? el("img", { src: p.subjects[subject], alt: `${name}, preview ${Number(slider.value) + 1}` })
        : el("div", { class: "skipped" }, "the negative prompt's pass was skipped here"),
      el("figcaption", {}, name))));
  }
  slider.addEventListener("input", drawStep);

  box.replaceChildren(el("h3", {}, `Explanation: ${title}`),
    el("div", { class: "row" }, el("label", {}, "Tag ", tagSelect), el("label", { title: "the denoising calls the map averages over" }, "Window ", windowSelect)),
    overlay, measures,
    el("div", { class: "row" }, el("label", {}, "Step ", slider), stepLabel),
    steps);
  drawTag();
  drawStep();
}

function sendToImg2img(src) {
  setMode("img2img");
  setInitImage(src);
}

// ------------------------------------------------------------------------------------ save / zip
function b64ToBytes(b64) {
  const text = atob(b64), bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i += 1) bytes[i] = text.charCodeAt(i);
  return bytes;
}
function download(name, blob) {
  const a = el("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 60000);
}
const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k += 1) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}
// A store-only zip (PNGs do not compress further): local headers, the central directory, its end.
function zipStore(files) {
  const encoder = new TextEncoder(), parts = [], central = [];
  let offset = 0;
  for (const f of files) {
    const name = encoder.encode(f.name), crc = crc32(f.bytes);
    const local = new DataView(new ArrayBuffer(30));
    [[0, 0x04034b50, 4], [4, 20, 2], [8, 0, 2], [14, crc, 4], [18, f.bytes.length, 4], [22, f.bytes.length, 4], [26, name.length, 2]]
      .forEach(([at, v, n]) => (n === 4 ? local.setUint32(at, v, true) : local.setUint16(at, v, true)));
    const entry = new DataView(new ArrayBuffer(46));
    [[0, 0x02014b50, 4], [4, 20, 2], [6, 20, 2], [16, crc, 4], [20, f.bytes.length, 4], [24, f.bytes.length, 4], [28, name.length, 2], [42, offset, 4]]
      .forEach(([at, v, n]) => (n === 4 ? entry.setUint32(at, v, true) : entry.setUint16(at, v, true)));
    parts.push(local, name, f.bytes);
    central.push(entry, name);
    offset += 30 + name.length + f.bytes.length;
  }
  const size = central.reduce((n, p) => n + p.byteLength, 0);
  const end = new DataView(new ArrayBuffer(22));
  [[0, 0x06054b50, 4], [8, files.length, 2], [10, files.length, 2], [12, size, 4], [16, offset, 4]]
    .forEach(([at, v, n]) => (n === 4 ? end.setUint32(at, v, true) : end.setUint16(at, v, true)));
  return new Blob([...parts, ...central, end], { type: "application/zip" });
}
$("#save-all").addEventListener("click", () => galleryFiles.forEach((f) => download(f.name, new Blob([b64ToBytes(f.b64)], { type: "image/png" }))));
$("#zip-all").addEventListener("click", () => download("images.zip", zipStore(galleryFiles.map((f) => ({ name: f.name, bytes: b64ToBytes(f.b64) })))));

// Token counters, as A1111 shows them: tokens / the next multiple of 75.
function tokenCounter(textarea, counter) {
  let timer = null;
  textarea.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      try {
        const t = await api("POST", "/voidprompt/v1/tokens", { text: textarea.value });
        counter.textContent = `${t.token_count}/${t.target}`;
        counter.classList.toggle("over", t.chunks.length > 1);
        counter.title = t.report;
      } catch (e) { counter.textContent = "?"; }
    }, 250);
  });
}
tokenCounter($("#prompt"), $("#pos-tokens"));
tokenCounter($("#negative_prompt"), $("#neg-tokens"));

// Drop an image: its parameters fill the form (png-info parses A1111 and NovelAI metadata).
const drop = $("#drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("hover"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("hover"); }));
drop.addEventListener("drop", async (e) => {
  const file = e.dataTransfer.files[0];
  if (file) await fillFromImage(await fileToB64(file));
});
async function fillFromImage(dataUrl) {
  try {
    const info = await api("POST", "/sdapi/v1/png-info", { image: dataUrl });
    if (!info.info) { $("#gen-error").textContent = "no generation parameters in that image"; return; }
    fillForm(info.parameters);
  } catch (err) { $("#gen-error").textContent = err.message; }
}
// The form from png-info's parsed parameters (A1111's names, styles already taken out of the prompts).
function fillForm(p) {
  const set = (id, v) => { if (v !== undefined && v !== null) $(id).value = v; };
  if (p["Size-1"]) sizeFollowsModel = false;
  set("#prompt", p.Prompt); set("#negative_prompt", p["Negative prompt"]);
  set("#steps", p.Steps); set("#cfg_scale", p["CFG scale"]); set("#seed", p.Seed);
  set("#width", p["Size-1"]); set("#height", p["Size-2"]); set("#clip_skip", p["Clip skip"]);
  if (p.Sampler) set("#sampler", p.Sampler);
  if (p["Schedule type"]) set("#scheduler", p["Schedule type"]);
  if (p["Variation seed"]) set("#subseed", p["Variation seed"]);
  if (p["Variation seed strength"]) set("#subseed_strength", p["Variation seed strength"]);
  set("#seed_resize_from_w", p["Seed resize from-1"] > 0 ? p["Seed resize from-1"] : 0);
  set("#seed_resize_from_h", p["Seed resize from-2"] > 0 ? p["Seed resize from-2"] : 0);
  $("#seed-extra").checked = !!(p["Variation seed"] || p["Seed resize from-1"] > 0);
  $("#seed-extra-fields").hidden = !$("#seed-extra").checked;
  $("#tiling").checked = String(p.Tiling) === "True";
  const styles = p["Styles array"] || [];
  [...$("#styles").options].forEach((o) => { o.selected = styles.includes(o.value); });
  const hires = p["Hires upscale"] !== undefined || Number(p["Hires resize-1"]) > 0 || Number(p["Hires resize-2"]) > 0;
  $("#enable_hr").checked = hires;
  $("#hires-body").hidden = !hires;
  if (hires) {
    set("#hr_scale", p["Hires upscale"]); set("#hr_second_pass_steps", p["Hires steps"]);
    set("#hr_resize_x", p["Hires resize-1"]); set("#hr_resize_y", p["Hires resize-2"]);
    if (p["Hires upscaler"]) set("#hr_upscaler", p["Hires upscaler"]);
    set("#hr_denoising_strength", p["Denoising strength"]);
  } else if (p["Denoising strength"]) set("#denoising_strength", p["Denoising strength"]);
  updateHiresInfo();
  $("#prompt").dispatchEvent(new Event("input")); $("#negative_prompt").dispatchEvent(new Event("input"));
}

// -------------------------------------------------------------------------------------- PNG Info
let pngInfo = null;
async function readPngInfo(file) {
  $("#pnginfo-error").textContent = "";
  const dataUrl = await fileToB64(file);
  $("#pnginfo-preview").src = dataUrl; $("#pnginfo-preview").hidden = false;
  try {
    const info = await api("POST", "/sdapi/v1/png-info", { image: dataUrl });
    pngInfo = info.info ? { dataUrl, parameters: info.parameters } : null;
    const other = Object.entries(info.items || {}).filter(([k]) => k !== "parameters").map(([k, v]) => `${k}: ${v}`);
    $("#pnginfo-text").textContent = [info.info || "(no generation parameters in this picture)", ...other].join("\n\n");
  } catch (err) {
    pngInfo = null;
    $("#pnginfo-text").textContent = "";
    $("#pnginfo-error").textContent = err.message;
  }
  $("#pnginfo-to-txt2img").disabled = $("#pnginfo-to-img2img").disabled = !pngInfo;
}
$("#pnginfo-file").addEventListener("change", (e) => { if (e.target.files[0]) readPngInfo(e.target.files[0]); });
const pngDrop = $("#pnginfo-drop");
["dragenter", "dragover"].forEach((t) => pngDrop.addEventListener(t, (e) => { e.preventDefault(); pngDrop.classList.add("hover"); }));
["dragleave", "drop"].forEach((t) => pngDrop.addEventListener(t, (e) => { e.preventDefault(); pngDrop.classList.remove("hover"); }));
pngDrop.addEventListener("drop", (e) => { if (e.dataTransfer.files[0]) readPngInfo(e.dataTransfer.files[0]); });
$("#pnginfo-to-txt2img").addEventListener("click", () => {
  fillForm(pngInfo.parameters);
  setMode("txt2img");
  showView("generate");
});
$("#pnginfo-to-img2img").addEventListener("click", () => {
  fillForm(pngInfo.parameters);
  setMode("img2img");
  setInitImage(pngInfo.dataUrl);
  showView("generate");
});

// ---------------------------------------------------------------------------------------- extras
let extrasImage = null;
function sendToExtras(src) {
  extrasImage = src;
  $("#extras-preview").src = src; $("#extras-preview").hidden = false;
  showView("extras");
}
$("#extras-image").addEventListener("change", async (e) => {
  extrasImage = e.target.files[0] ? await fileToB64(e.target.files[0]) : null;
  $("#extras-preview").hidden = !extrasImage; if (extrasImage) $("#extras-preview").src = extrasImage;
});
document.querySelectorAll("input[name=extras-resize-mode]").forEach((r) => r.addEventListener("change", () => {
  const to = document.querySelector("input[name=extras-resize-mode]:checked").value === "1";
  $("#extras-scale-by").hidden = to; $("#extras-scale-to").hidden = !to;
}));
$("#extras-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("#extras-error").textContent = "";
  if (!extrasImage) { $("#extras-error").textContent = "choose a source picture first"; return; }
  $("#extras-run").disabled = true;
  try {
    const r = await api("POST", "/sdapi/v1/extra-single-image", {
      image: extrasImage, resize_mode: Number(document.querySelector("input[name=extras-resize-mode]:checked").value),
      upscaling_resize: num("#upscaling_resize"), upscaling_resize_w: num("#upscaling_resize_w"),
      upscaling_resize_h: num("#upscaling_resize_h"), upscaling_crop: $("#upscaling_crop").checked,
      upscaler_1: $("#upscaler_1").value, upscaler_2: $("#upscaler_2").value,
      extras_upscaler_2_visibility: num("#extras_upscaler_2_visibility"),
    });
    const src = "data:image/png;base64," + r.image;
    $("#extras-result").replaceChildren(el("figure", { class: "result" }, el("img", { src, alt: "upscaled", class: "extras-output" }),
      el("div", { class: "row" }, el("button", { type: "button", onclick: () => download("upscaled.png", new Blob([b64ToBytes(r.image)], { type: "image/png" })) }, "Save")),
      el("pre", { class: "extras-info" }, r.html_info.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim())));
  } catch (err) {
    $("#extras-error").textContent = err.message;
  } finally {
    $("#extras-run").disabled = false;
  }
});

// ------------------------------------------------------------------------------------- studies
let studies = [];
async function loadStudies() {
  studies = await api("GET", "/voidprompt/v1/studies");
  for (const id of ["#study-select", "#label-study"]) {
    const select = $(id);
    const current = select.value;
    select.replaceChildren(...studies.map((s) => el("option", { value: s.id }, `${s.name} (${s.images} images)`)));
    if (current && studies.some((s) => s.id === current)) select.value = current;
  }
  if (!$("#view-studies").hidden) await loadStudyGrid(true);
  if (!$("#view-label").hidden) await loadLabeling();
}

let studyData = null;
const SEED_AXES = ["seed", "seeds"];
async function loadStudyGrid(resetAxes = false) {
  const id = $("#study-select").value;
  if (!id) return;
  const filters = [...document.querySelectorAll("#study-filters select")].filter((s) => s.value !== "*")
    .map((s) => "where=" + encodeURIComponent(`${s.dataset.axis}=${s.value}`));
  studyData = await api("GET", `/voidprompt/v1/studies/${encodeURIComponent(id)}/images?limit=5000&${filters.join("&")}`);
  const axes = Object.keys(studyData.axes);
  if (resetAxes) {
    // As the report's grids: the first two axes that are not seeds, the seeds stepped through in a cell.
    const picks = [...axes.filter((a) => !SEED_AXES.includes(a)), ...axes.filter((a) => SEED_AXES.includes(a))];
    for (const [sel, idx] of [["#axis-x", 0], ["#axis-y", 1]]) {
      $(sel).replaceChildren(el("option", { value: "" }, "(none)"), ...axes.map((a) => el("option", { value: a }, a)));
      $(sel).value = picks[idx] || "";
    }
    buildFilters(axes);
  }
  drawGrid();
  if (resetAxes) loadReport(id, false);
}

// The lab's report of the study: its plots (measures by axis, outcomes) and image grid pages. The
// server builds it when it is missing or older than the catalog, so this can take a few seconds.
let reportRequest = 0;
async function loadReport(id, rebuild) {
  const ticket = ++reportRequest;
  $("#report-status").textContent = rebuild ? "rebuilding the report..." : "loading the report...";
  $("#report-error").textContent = "";
  try {
    const r = await api(rebuild ? "POST" : "GET", `/voidprompt/v1/studies/${encodeURIComponent(id)}/report`);
    if (ticket !== reportRequest) return;
    const figure = (f) => el("figure", { class: `report-figure ${f.kind}` },
      el("img", { src: f.url, alt: f.name }),
      el("figcaption", {}, f.name, ...(f.svg_url ? [" \u00b7 ", el("a", { href: f.svg_url, target: "_blank" }, "SVG")] : [])));
    $("#study-plots").replaceChildren(...r.figures.filter((f) => f.kind !== "grid").map(figure));
    $("#study-report-grids").replaceChildren(...r.figures.filter((f) => f.kind === "grid").map(figure));
    $("#report-html").hidden = !r.html_url;
    if (r.html_url) $("#report-html").href = r.html_url;
    $("#report-status").textContent = `${r.figures.length} figures, built ${r.generated}${r.built ? " (just now)" : ""}`;
  } catch (err) {
    if (ticket !== reportRequest) return;
    $("#study-plots").replaceChildren();
    $("#study-report-grids").replaceChildren();
    $("#report-html").hidden = true;
    $("#report-status").textContent = "";
    $("#report-error").textContent = err.message;
  }
}
$("#report-rebuild").addEventListener("click", () => { const id = $("#study-select").value; if (id) loadReport(id, true); });

function buildFilters(axes) {
  const box = $("#study-filters");
  box.replaceChildren(...axes.map((a) => {
    const select = el("select", { "data-axis": a, onchange: () => loadStudyGrid(false) },
      el("option", { value: "*" }, "all"), ...studyData.axes[a].map((v) => el("option", { value: String(v) }, String(v))));
    return el("label", {}, `${a} `, select);
  }));
}
// One picture per cell: the images of a cell that differ on the other axes (seeds, unfiltered
// axes) are stepped through with the cell's button, so the grid keeps its shape.
function drawGrid() {
  const x = $("#axis-x").value, y = $("#axis-y").value;
  const xs = x ? studyData.axes[x] : [null], ys = y ? studyData.axes[y] : [null];
  const table = el("table", { class: "grid" });
  table.append(el("tr", {}, el("th", { class: "corner" }, y && x ? `${y} \u2193 \u00b7 ${x} \u2192` : (x || y || "")),
    ...xs.map((v) => el("th", { class: "col", scope: "col" }, v === null ? "" : `${x} = ${v}`))));
  const picture = (im) => el("img", {
    src: im.url, loading: "lazy", alt: `seed ${im.seed}`, onclick: () => showDetail(im.id),
    title: `#${im.id} seed ${im.seed}${im.label ? ` \u00b7 ${im.label} (${im.label_source === "human" ? "by a person" : `by ${im.label_source}`})` : ""}`,
  });
  for (const yv of ys) {
    const row = el("tr", {}, el("th", { class: "rowhead", scope: "row" }, yv === null ? "" : `${y} = ${yv}`));
    for (const xv of xs) {
      const here = studyData.images.filter((im) => (x === "" || String(im.axis_values[x]) === String(xv)) && (y === "" || String(im.axis_values[y]) === String(yv)));
      const cell = el("td");
      if (here.length) {
        let index = 0;
        cell.append(picture(here[0]));
        if (here.length > 1) {
          const step = el("button", { type: "button", class: "cell-step", title: "next picture of this cell (other seeds or axis values)" }, `1/${here.length} >`);
          step.addEventListener("click", () => {
            index = (index + 1) % here.length;
            cell.querySelector("img").replaceWith(picture(here[index]));
            step.textContent = `${index + 1}/${here.length} >`;
          });
          cell.append(step);
        }
      }
      row.append(cell);
    }
    table.append(row);
  }
  $("#study-grid").replaceChildren(table);
}
$("#study-select").addEventListener("change", () => loadStudyGrid(true));
$("#axis-x").addEventListener("change", drawGrid);
$("#axis-y").addEventListener("change", drawGrid);
async function showDetail(imageId) {
  const id = $("#study-select").value;
  const d = await api("GET", `/voidprompt/v1/studies/${encodeURIComponent(id)}/images/${imageId}`);
  const box = $("#study-detail");
  box.hidden = false;
  const measures = Object.entries(d.measures).map(([k, v]) => `${k}: ${v === null ? "-" : Number(v).toPrecision(4)}`).join("\n");
  const labels = Object.entries(d.labels).map(([s, l]) => `${s}: ${l.label_class} ${l.tags.join(", ")}`).join("\n");
  const explanation = el("div", { class: "study-explain" });
  box.replaceChildren(el("img", { src: d.url, class: "thumb" }), el("h3", {}, `image ${d.id}`),
    el("pre", {}, d.infotext), el("h4", {}, "Measures"), el("pre", {}, measures || "(none)"),
    el("h4", {}, "Labels"), el("pre", {}, labels || "(none)"), explanation);
  if (d.explanation_url) showExplanation(explanation, d.explanation_url, `image ${d.id}`);
}

// ------------------------------------------------------------------------------------ labeling
let labelState = { items: [], index: 0, classes: [], undo: [], labeled: 0, total: 0 };
$("#label-study").addEventListener("change", loadLabeling);
$("#label-show-all").addEventListener("change", loadLabeling);

async function loadLabeling() {
  const id = $("#label-study").value;
  if (!id) return;
  const all = $("#label-show-all").checked;
  const data = await api("GET", `/voidprompt/v1/studies/${encodeURIComponent(id)}/images?limit=5000${all ? "" : "&unlabeled=true"}`);
  labelState = { items: data.images, index: 0, classes: data.classes, undo: [], labeled: data.labeled, total: data.all_images };
  $("#label-keys").replaceChildren(...data.classes.slice(0, 9).map((c, i) => el("span", {}, el("b", {}, String(i + 1)), ` ${c}`)));
  drawLabelGrid();
  $("#label-grid").focus();
}
function drawLabelGrid() {
  const grid = $("#label-grid");
  grid.replaceChildren(...labelState.items.map((im, i) => {
    const human = im.labels.human && im.labels.human.label_class;
    const cell = el("div", { class: "cell" + (i === labelState.index ? " selected" : "") + (human ? " done" : ""), "data-id": im.id,
      onclick: () => { labelState.index = i; updateSelection(); } },
      el("img", { src: im.url, alt: `image ${im.id}` }), el("span", { class: "tag" }, human || im.label || ""));
    return cell;
  }));
  updateProgress();
}
function updateSelection() {
  document.querySelectorAll("#label-grid .cell").forEach((c, i) => c.classList.toggle("selected", i === labelState.index));
  const selected = document.querySelector("#label-grid .cell.selected");
  if (selected) selected.scrollIntoView({ block: "nearest" });
}
// A person's labels are what the count tracks; a labeler's pre-labels (not yet confirmed by a
// person) are counted apart, per labeler.
function updateProgress() {
  const byLabeler = {};
  for (const im of labelState.items) {
    if (!(im.labels.human && im.labels.human.label_class) && im.label && im.label_source !== "human") byLabeler[im.label_source] = (byLabeler[im.label_source] || 0) + 1;
  }
  const pre = Object.entries(byLabeler).map(([source, n]) => `${n.toLocaleString("en-US")} pre-labeled by ${source}`);
  $("#label-progress").textContent = `${labelState.labeled.toLocaleString("en-US")} / ${labelState.total.toLocaleString("en-US")} labeled` +
    (pre.length ? ` by a person \u00b7 ${pre.join(", ")}` : "");
}
function columns() {
  const cells = document.querySelectorAll("#label-grid .cell");
  if (cells.length < 2) return 1;
  const top = cells[0].offsetTop;
  let n = 0;
  for (const c of cells) { if (c.offsetTop !== top) break; n += 1; }
  return Math.max(1, n);
}
async function assign(item, cell, labelClass) {
  const id = $("#label-study").value;
  await api("PUT", `/voidprompt/v1/studies/${encodeURIComponent(id)}/labels/${item.id}`, { label_class: labelClass, source: "human" });
  const before = item.labels.human ? item.labels.human.label_class : null;
  if (labelClass && !before) labelState.labeled += 1;
  if (!labelClass && before) labelState.labeled -= 1;
  if (labelClass) item.labels.human = { label_class: labelClass, tags: [] }; else delete item.labels.human;
  cell.classList.toggle("done", !!labelClass);
  cell.querySelector(".tag").textContent = labelClass || item.label || "";
  updateProgress();
}
$("#label-grid").addEventListener("keydown", async (e) => {
  const n = labelState.items.length;
  if (!n) return;
  const cells = document.querySelectorAll("#label-grid .cell");
  const move = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns(), ArrowUp: -columns() }[e.key];
  try {
    if (move !== undefined) {
      e.preventDefault();
      labelState.index = Math.min(n - 1, Math.max(0, labelState.index + move));
      updateSelection();
    } else if (/^[1-9]$/.test(e.key) && Number(e.key) <= labelState.classes.length) {
      e.preventDefault();
      const i = labelState.index;
      const item = labelState.items[i];
      const previous = item.labels.human ? item.labels.human.label_class : null;
      await assign(item, cells[i], labelState.classes[Number(e.key) - 1]);
      labelState.undo.push({ index: i, previous });
      if (labelState.index < n - 1) { labelState.index += 1; updateSelection(); }
    } else if (e.key === "z" || e.key === "Z") {
      e.preventDefault();
      const last = labelState.undo.pop();
      if (!last) return;
      await assign(labelState.items[last.index], cells[last.index], last.previous);
      labelState.index = last.index;
      updateSelection();
    }
    $("#label-error").textContent = "";
  } catch (err) { $("#label-error").textContent = err.message; }
});

initGenerate().catch((e) => { $("#gen-error").textContent = e.message; });
