// The lab server's page: sign in, submit, watch, look, admin. Plain DOM: every text
// that comes from a user, a file or the server is set with textContent, never as HTML.

import * as api from "./api.js";
import { checkInputs, readBval, readBvec, sortDropped } from "./checks.js";
import { COLOUR_MAPS } from "./colormaps.js";
import { SliceViewer, formatValue } from "./viewer.js";

const $ = (id) => document.getElementById(id);

/** Create an element with text and attributes (no HTML parsing). */
function el(tag, { text = null, cls = null, attrs = {} } = {}, children = []) {
  const node = document.createElement(tag);
  if (text !== null && text !== undefined) node.textContent = String(text);
  if (cls) node.className = cls;
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

function showError(id, error) {
  const node = $(id);
  if (!error) { node.hidden = true; node.textContent = ""; return; }
  node.textContent = typeof error === "string" ? error : error.message;
  node.hidden = false;
}

const state = {
  me: null,
  catalogue: [],
  fitOptions: [],
  files: { dwi: null, bval: null, bvec: null, mask: null },
  view: null,
  jobs: [],
  pollTimer: null,
  job: null,
  summary: null,
  volumes: new Map(),
  uploading: null,
  armed: null,
};

// ---------------------------------------------------------------- navigation
const VIEWS = ["signin", "submit", "jobs", "job", "admin"];

function show(view, { focus = true } = {}) {
  state.view = view;
  for (const v of VIEWS) $(`view-${v}`).hidden = v !== view;
  for (const b of document.querySelectorAll("#nav [data-view]")) {
    const current = b.dataset.view === view || (view === "job" && b.dataset.view === "jobs");
    if (current) b.setAttribute("aria-current", "page"); else b.removeAttribute("aria-current");
  }
  if (view === "jobs") refreshJobs();
  if (view === "admin") refreshAdmin();
  schedulePoll();
  if (focus) {
    const heading = document.querySelector(`#view-${view} h2`);
    if (heading) { heading.setAttribute("tabindex", "-1"); heading.focus({ preventScroll: false }); }
  }
}

function banner(text) {
  const node = $("banner");
  node.textContent = text || "";
  node.hidden = !text;
  if (text) setTimeout(() => { if (node.textContent === text) { node.textContent = ""; node.hidden = true; } }, 10000);
}

// ---------------------------------------------------------------- sign in
async function signIn(key, { quiet = false } = {}) {
  try {
    const me = await api.getJSON("/v1/me", { key });
    api.setKey(key);
    state.me = me;
    $("who").textContent = `${me.name}${me.is_admin ? " (admin)" : ""}`;
    $("nav").hidden = false;
    $("nav-admin").hidden = !me.is_admin;
    showError("signin-error", null);
    $("api-key").value = "";
    await loadCatalogue();
    await loadFitOptions();
    show("jobs", { focus: !quiet });
    return true;
  } catch (error) {
    api.clearKey();
    if (!quiet) showError("signin-error", error);
    show("signin", { focus: false });
    return false;
  }
}

function signOut(message) {
  api.clearKey();
  state.me = null;
  state.volumes.clear();
  $("nav").hidden = true;
  show("signin");
  if (message) showError("signin-error", message);
  $("api-key").focus();
}

api.onUnauthorised((error) => {
  if (state.me) signOut(error.message);
});

// ---------------------------------------------------------------- fit options
// The fit options a job may set, as the server lists them (from the library's option
// specs): one input per option, named like the form field; empty means the default.
async function loadFitOptions() {
  state.fitOptions = await api.getJSON("/v1/fit-options");
  $("fit-options").replaceChildren(...state.fitOptions.map(fitOptionInput));
}

function fitOptionInput(option) {
  const id = option.name;
  const shown = option.default === null || option.default === undefined ? "default" : `default ${option.default}`;
  let input;
  if (option.choices.length) {
    input = el("select", { attrs: { id, name: id, "data-fit-option": "1", "aria-describedby": `${id}-help` } },
      [el("option", { text: `(${shown})`, attrs: { value: "" } }),
       ...option.choices.map((c) => el("option", { text: c, attrs: { value: c } }))]);
  } else if (option.kind === "text") {
    input = el("input", { attrs: { id, name: id, type: "text", "data-fit-option": "1", placeholder: shown,
                                   maxlength: "200", "aria-describedby": `${id}-help` } });
  } else {
    const attrs = { id, name: id, type: "number", "data-fit-option": "1", placeholder: shown,
                    step: option.kind === "int" ? "1" : "any", "aria-describedby": `${id}-help` };
    if (option.low !== null) attrs.min = String(option.low);
    if (option.high !== null) attrs.max = String(option.high);
    input = el("input", { attrs });
  }
  return el("div", { cls: "fit-option" }, [
    el("label", { text: option.name, attrs: { for: id } }),
    input,
    el("span", { cls: "hint", text: option.help, attrs: { id: `${id}-help` } }),
  ]);
}

// ---------------------------------------------------------------- catalogue
async function loadCatalogue() {
  state.catalogue = await api.getJSON("/v1/catalogue");
  for (const select of [$("model"), $("pb-model")]) {
    const previous = select.value;
    select.replaceChildren(...state.catalogue.map((m) => el("option", { text: m.requires_timing ? `${m.name} (needs pulse timing)` : m.name, attrs: { value: m.name } })));
    if (previous) select.value = previous;
    else if (state.catalogue.some((m) => m.name === "noddi")) select.value = "noddi";
  }
  describeModel();
  prebuildTiming();
}

function currentModel(select = $("model")) {
  return state.catalogue.find((m) => m.name === select.value) || null;
}

function describeModel() {
  const m = currentModel();
  const box = $("model-info");
  box.replaceChildren();
  if (!m) return;
  box.append(el("p", { text: m.description }));
  const needs = m.requires_timing
    ? "Scheme: needs the pulse timing (δ and Δ, in seconds) besides bval/bvec; several b-values or diffusion times help."
    : "Scheme: bval and bvec (multi-shell recommended); no pulse timing needed.";
  box.append(el("p", { text: needs, cls: "hint" }));
  const extra = [];
  if (m.maps.length) extra.push(`Maps: ${m.maps.join(", ")} (+ s0, r2, uncertainties).`);
  if (m.dictionary_size) extra.push(`Default dictionary: ${m.dictionary_size.toLocaleString("en")} atoms.`);
  if (extra.length) box.append(el("p", { text: extra.join(" "), cls: "hint" }));
  if (m.reference) box.append(el("p", { text: m.reference, cls: "hint reference" }));
  $("timing").hidden = !m.requires_timing;
}

// ---------------------------------------------------------------- submit
function setFile(field, file) {
  state.files[field] = file || null;
  const chosen = $(`chosen-${field}`);
  chosen.textContent = file ? `${file.name} (${humanBytes(file.size)})` : "";
  if (!file) $(`file-${field}`).value = "";
  $("checks").replaceChildren();
}

function humanBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1024 ** 3) return `${(n / 1024 ** 2).toFixed(1)} MiB`;
  return `${(n / 1024 ** 3).toFixed(2)} GiB`;
}

function takeDropped(fileList) {
  const { sorted, unknown } = sortDropped(Array.from(fileList));
  for (const [field, file] of Object.entries(sorted)) setFile(field, file);
  const checks = $("checks");
  for (const f of unknown) checks.append(el("li", { cls: "error", text: `${f.name}: not a NIfTI, .bval or .bvec file; it was left out.` }));
}

function renderChecks(list, results) {
  list.replaceChildren(...results.map((r) => el("li", { cls: r.level, text: r.text })));
}

async function submit(event) {
  event.preventDefault();
  showError("submit-error", null);
  const model = currentModel();
  const timing = { delta: $("delta").value, Delta: $("Delta").value, TE: $("TE").value };
  const results = await checkInputs(state.files, { needsTiming: !!(model && model.requires_timing), timing });
  renderChecks($("checks"), results);
  if (results.some((r) => r.level === "error")) {
    showError("submit-error", "Fix the problems listed above, then upload again.");
    return;
  }
  const form = new FormData();
  form.append("model", $("model").value);
  const fields = ["prefix", "b0_threshold", ...state.fitOptions.map((o) => o.name)];
  for (const name of fields) {
    const v = $(name).value.trim();
    if (v) form.append(name, v);
  }
  if (model && model.requires_timing) {
    for (const [k, v] of Object.entries(timing)) if (v) form.append(k, v);
  }
  for (const field of ["dwi", "bval", "bvec", "mask"]) {
    const f = state.files[field];
    if (f) form.append(field, f, f.name);
  }
  const bar = $("upload-progress");
  $("upload").hidden = false;
  bar.value = 0;
  $("upload-text").textContent = "starting…";
  $("submit-button").disabled = true;
  $("submit-abort").hidden = false;
  const started = performance.now();
  const job = api.upload("/v1/jobs", form, (loaded, total) => {
    const pct = total ? (100 * loaded) / total : 0;
    bar.value = pct;
    const rate = loaded / Math.max(0.001, (performance.now() - started) / 1000);
    $("upload-text").textContent = loaded >= total
      ? "uploaded; the server is checking the files…"
      : `${pct.toFixed(0)} % of ${humanBytes(total)} (${humanBytes(rate)}/s)`;
  });
  state.uploading = job;
  try {
    const created = await job.promise;
    bar.value = 100;
    $("upload-text").textContent = "accepted";
    rememberLabel(created.id, state.files.dwi ? state.files.dwi.name : "");
    for (const field of ["dwi", "bval", "bvec", "mask"]) setFile(field, null);
    banner(`Job ${created.id.slice(0, 8)} queued.`);
    show("jobs");
  } catch (error) {
    if (error.status === -1) showError("submit-error", "The upload was stopped.");
    else {
      const field = error.field ? ` (field: ${error.field})` : "";
      showError("submit-error", `${error.message}${field}`);
    }
  } finally {
    state.uploading = null;
    $("submit-button").disabled = false;
    $("submit-abort").hidden = true;
  }
}

// job labels: the DWI's file name, remembered in this tab only (the server keeps none)
const LABELS = "fingerprint.jobLabels";
function rememberLabel(id, name) {
  const labels = JSON.parse(sessionStorage.getItem(LABELS) || "{}");
  labels[id] = name;
  sessionStorage.setItem(LABELS, JSON.stringify(labels));
}
function labelOf(id) {
  return JSON.parse(sessionStorage.getItem(LABELS) || "{}")[id] || "";
}

// ---------------------------------------------------------------- jobs
function seconds(a, b) {
  if (!a) return null;
  const start = Date.parse(a);
  const end = b ? Date.parse(b) : Date.now();
  return Math.max(0, (end - start) / 1000);
}

export function duration(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "–";
  s = Math.round(s);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
}

function remaining(job) {
  if (job.status !== "running") return null;
  const elapsed = seconds(job.started, null);
  const p = job.progress;
  if (!(p > 0.02) || elapsed === null) return null;
  return (elapsed * (1 - p)) / p;
}

function jobCard(job) {
  const li = el("li", { cls: `job status-${job.status}`, attrs: { "data-job": job.id } });
  const label = labelOf(job.id);
  const head = el("div", { cls: "job-head" }, [
    el("span", { cls: "badge", text: job.status }),
    el("strong", { text: job.kind === "dictionary" ? `dictionary · ${job.model}` : job.model }),
    el("code", { text: job.id.slice(0, 8), attrs: { title: job.id } }),
  ]);
  if (label) head.append(el("span", { cls: "label", text: label }));
  li.append(head);
  const stage = job.stage || (job.status === "running" ? "running" : job.status);
  const pct = Math.round(100 * (job.progress || 0));
  const line = el("div", { cls: "job-progress" });
  const bar = el("progress", { attrs: { max: "100", value: String(pct), "aria-label": `progress of job ${job.id.slice(0, 8)}` } });
  line.append(bar, el("span", { text: `${pct} %` }));
  li.append(line);
  const facts = [`stage: ${stage}`];
  if (job.stage_progress !== undefined && job.stage_progress !== null && job.status === "running") facts.push(`${Math.round(100 * job.stage_progress)} % of the stage`);
  if (job.started) facts.push(`elapsed ${duration(seconds(job.started, job.finished))}`);
  else facts.push(`waiting ${duration(seconds(job.created, null))}`);
  const rest = remaining(job);
  if (rest !== null) facts.push(`about ${duration(rest)} left`);
  if (job.cancel_requested && job.status === "running") facts.push("stopping…");
  li.append(el("p", { cls: "facts", text: facts.join(" · ") }));
  if (job.error && job.status !== "succeeded") li.append(el("p", { cls: job.status === "failed" ? "error" : "hint", text: job.error }));
  const actions = el("div", { cls: "actions" });
  if (job.status === "succeeded" && job.kind === "fit") {
    const open = el("button", { text: "Open maps", cls: "primary", attrs: { type: "button" } });
    open.addEventListener("click", () => openJob(job.id));
    actions.append(open);
  }
  const active = job.status === "queued" || job.status === "running";
  const del = el("button", { text: active ? "Cancel" : "Delete", attrs: { type: "button", "data-action": active ? "cancel" : "delete" } });
  if (state.armed && state.armed.id === job.id && state.armed.until > Date.now()) arm(del, active);
  del.addEventListener("click", () => confirmDelete(del, job, active));
  actions.append(del);
  li.append(actions);
  return li;
}

// a first click arms the button (kept across the list's refreshes), a second deletes
function arm(button, active) {
  button.dataset.armed = "1";
  button.textContent = active ? "Confirm: cancel and delete" : "Confirm: delete the job and its maps";
  button.classList.add("danger");
}

function confirmDelete(button, job, active) {
  if (button.dataset.armed !== "1") {
    state.armed = { id: job.id, until: Date.now() + 6000 };
    arm(button, active);
    setTimeout(() => { if (state.armed && state.armed.id === job.id && state.armed.until <= Date.now()) { state.armed = null; refreshJobs(); } }, 6100);
    return;
  }
  state.armed = null;
  button.disabled = true;
  deleteJob(job.id);
}

async function deleteJob(id) {
  try {
    const response = await api.call("DELETE", `/v1/jobs/${encodeURIComponent(id)}`);
    banner(response.status === 202 ? `Job ${id.slice(0, 8)} is stopping; it will be deleted when it has.` : `Job ${id.slice(0, 8)} deleted.`);
  } catch (error) {
    showError("jobs-error", error);
  }
  refreshJobs();
}

async function refreshJobs() {
  if (!state.me) return;
  try {
    const page = await api.getJSON("/v1/jobs?limit=100");
    state.jobs = page.items;
    showError("jobs-error", null);
    const list = $("jobs-list");
    // keep keyboard focus on the same control across refreshes
    const focused = document.activeElement;
    const focusJob = focused && focused.closest ? focused.closest("[data-job]") : null;
    const focusKey = focusJob ? [focusJob.dataset.job, focused.dataset.action || focused.textContent] : null;
    list.replaceChildren(...page.items.map(jobCard));
    $("jobs-empty").hidden = page.items.length > 0;
    if (focusKey) {
      const card = list.querySelector(`[data-job="${CSS.escape(focusKey[0])}"]`);
      const again = card && Array.from(card.querySelectorAll("button")).find((b) => (b.dataset.action || b.textContent) === focusKey[1]);
      if (again) again.focus();
    }
  } catch (error) {
    if (error.status !== 401) showError("jobs-error", error);
  }
  schedulePoll();
}

function schedulePoll() {
  clearTimeout(state.pollTimer);
  if (!state.me) return;
  if (state.view === "jobs") {
    const active = state.jobs.some((j) => j.status === "queued" || j.status === "running");
    state.pollTimer = setTimeout(refreshJobs, active ? 1000 : 5000);
  } else if (state.view === "admin") {
    state.pollTimer = setTimeout(() => { refreshQueue(); schedulePoll(); }, 3000);
  }
}

// ---------------------------------------------------------------- one job: the viewer
const viewer = new SliceViewer({
  canvas: $("slice-canvas"),
  colourbar: { canvas: $("colourbar-canvas"), min: $("cbar-min"), max: $("cbar-max"), units: $("cbar-units") },
  histogram: $("hist-canvas"),
});

async function openJob(id) {
  showError("job-error", null);
  state.job = await api.getJSON(`/v1/jobs/${encodeURIComponent(id)}`).catch((e) => { showError("jobs-error", e); return null; });
  if (!state.job) return;
  const label = labelOf(id);
  $("job-title").textContent = `Job ${id.slice(0, 8)} · ${state.job.model}${label ? " · " + label : ""}`;
  show("job");
  $("download-status").textContent = "";
  const t0 = performance.now();
  try {
    state.summary = await api.getJSON(`/v1/jobs/${encodeURIComponent(id)}/summary`);
  } catch (error) {
    showError("job-error", error);
    return;
  }
  renderDetails(state.job, state.summary);
  const select = $("map-select");
  select.replaceChildren(...state.summary.maps.map((m) => el("option", { text: `${m.label}${m.kind === "direction" ? " (direction, colour-coded)" : ""}`, attrs: { value: m.label } })));
  $("file-select").replaceChildren(...state.job.files.map((f) => el("option", { text: f, attrs: { value: f } })));
  const first = state.summary.maps.find((m) => m.kind === "scalar") || state.summary.maps[0];
  if (first) {
    select.value = first.label;
    await showMap(first.label, true);
  }
  document.body.dataset.viewerMs = String(Math.round(performance.now() - t0));
}

async function showMap(label, resetSlice = false) {
  const entry = state.summary.maps.find((m) => m.label === label);
  if (!entry) return;
  const key = `${state.summary.job}/${label}`;
  let bytes = state.volumes.get(key);
  if (!bytes) {
    try {
      const response = await api.call("GET", `/v1/jobs/${encodeURIComponent(state.summary.job)}/maps/${encodeURIComponent(label)}/volume`);
      bytes = new Uint8Array(await response.arrayBuffer());
    } catch (error) {
      showError("job-error", error);
      return;
    }
    if (state.volumes.size > 12) state.volumes.delete(state.volumes.keys().next().value);
    state.volumes.set(key, bytes);
  }
  viewer.setMap(entry, bytes, state.summary.voxel_size);
  $("cmap-select").disabled = entry.kind === "direction";
  $("map-description").textContent = entry.kind === "direction"
    ? `${entry.description}. Direction-encoded colour: red = |x|, green = |y|, blue = |z| (b-vector frame).`
    : `${entry.description} · units: ${entry.units_text} · colour range ${formatValue(entry.min)} to ${formatValue(entry.max)} (min to max inside the mask)`;
  updateSlider(resetSlice);
  viewer.render();
  viewer.drawHistogram($("hist-stats"));
  $("slice-canvas").setAttribute("aria-label", `${entry.label}, ${viewer.plane} slice ${viewer.index + 1} of ${viewer.depth()}`);
  document.body.dataset.mapShown = entry.label;
}

function updateSlider(reset) {
  const slider = $("slice");
  const depth = viewer.depth();
  slider.max = String(depth - 1);
  if (reset || viewer.index >= depth) viewer.index = Math.floor(depth / 2);
  slider.value = String(viewer.index);
  $("slice-out").textContent = `${viewer.index + 1} / ${depth}`;
}

function renderDetails(job, summary) {
  const dl = $("job-details");
  dl.replaceChildren();
  const add = (term, value) => {
    if (value === null || value === undefined || value === "") return;
    dl.append(el("dt", { text: term }), el("dd", { text: value }));
  };
  add("Model", `${summary.model.name}${summary.model.class ? " (" + summary.model.class + ")" : ""}`);
  if (summary.model.description) add("Description", summary.model.description);
  const solver = summary.solver || {};
  add("Solver", [solver.name, solver.description].filter(Boolean).join(": "));
  if (solver.dictionary_atoms) add("Dictionary", `${Number(solver.dictionary_atoms).toLocaleString("en")} atoms`);
  add("Software", solver.software);
  // the fit options the job was given (the rest are the library's defaults)
  const offered = new Set(state.fitOptions.map((o) => o.name));
  const given = Object.entries(job.options || {}).filter(([k]) => offered.has(k));
  add("Fit options", given.map(([k, v]) => `${k} = ${v}`).join(", "));
  const sc = summary.scheme || {};
  if (sc.measurements) {
    const shells = (sc.shells || []).map((s) => `b=${formatValue(s.bval)} ×${s.count}`).join(", ");
    add("Scheme", `${sc.measurements} measurements: ${shells} (${sc.units})`);
  }
  if (sc.delta) add("Timing", `δ = ${sc.delta} s, Δ = ${sc.Delta} s${sc.TE ? `, TE = ${sc.TE} s` : ""}`);
  add("Grid", summary.shape.join(" × "));
  add("Voxels in the mask", summary.mask_voxels.toLocaleString("en"));
  const t = summary.timing || {};
  if (t.fitted_voxels !== undefined && t.fitted_voxels !== null) add("Fitted voxels", `${t.fitted_voxels}${t.invalid_voxels ? `, ${t.invalid_voxels} invalid` : ""}`);
  add("Fit time", t.fit_seconds !== null && t.fit_seconds !== undefined ? duration(t.fit_seconds) : null);
  add("Waited in queue", duration(t.queued_seconds));
  add("Run time", duration(t.run_seconds));
  add("Finished", job.finished ? new Date(job.finished).toLocaleString() : null);
}

// ---------------------------------------------------------------- admin
async function refreshAdmin() {
  refreshKeys();
  refreshQueue();
  refreshDictionaries();
}

async function refreshKeys() {
  try {
    const keys = await api.getJSON("/v1/admin/keys");
    showError("keys-error", null);
    $("keys-table").tBodies[0].replaceChildren(...keys.map((k) => {
      const tr = el("tr", {}, [
        el("td", { text: k.name }), el("td", {}, [el("code", { text: k.id })]),
        el("td", { text: k.is_admin ? "admin" : "user" }),
        el("td", { text: new Date(k.created).toLocaleDateString() }),
        el("td", { text: k.revoked ? "revoked" : "active" }),
      ]);
      const td = el("td");
      if (!k.revoked && (!state.me || k.id !== state.me.id)) {
        const b = el("button", { text: "Revoke", attrs: { type: "button", "aria-label": `Revoke the key ${k.name}` } });
        b.addEventListener("click", () => revokeKey(b, k));
        td.append(b);
      }
      tr.append(td);
      return tr;
    }));
  } catch (error) {
    showError("keys-error", error);
  }
}

async function revokeKey(button, key) {
  if (button.dataset.armed !== "1") {
    button.dataset.armed = "1";
    button.textContent = `Confirm: revoke ${key.name}`;
    button.classList.add("danger");
    return;
  }
  try {
    await api.call("DELETE", `/v1/admin/keys/${encodeURIComponent(key.id)}`);
    banner(`Key ${key.name} revoked.`);
  } catch (error) {
    showError("keys-error", error);
  }
  refreshKeys();
}

async function createKey(event) {
  event.preventDefault();
  showError("keys-error", null);
  try {
    const created = await (await api.call("POST", "/v1/admin/keys", { json: { name: $("key-name").value.trim(), admin: $("key-admin").checked } })).json();
    $("key-created-name").textContent = created.name;
    $("key-created-value").value = created.key;
    $("key-created").hidden = false;
    $("key-name").value = "";
    $("key-admin").checked = false;
    $("key-created-value").focus();
    $("key-created-value").select();
  } catch (error) {
    showError("keys-error", error);
  }
  refreshKeys();
}

async function refreshQueue() {
  if (state.view !== "admin") return;
  try {
    const q = await api.getJSON("/v1/admin/queue");
    showError("queue-error", null);
    const dl = $("queue-executor");
    const ex = q.executor;
    dl.replaceChildren(
      el("dt", { text: "Executor" }), el("dd", { text: `${ex.healthy ? "healthy" : "NOT healthy"}: ${ex.message}` }),
      el("dt", { text: "Workers" }), el("dd", { text: `${ex.workers} job(s) at a time, ${ex.threads_per_job} thread(s) each${ex.dask_scheduler ? ", Dask " + ex.dask_scheduler : ""}` }),
      el("dt", { text: "Queue" }), el("dd", { text: `${q.running.length} running, ${q.queued.length} queued (at most ${q.limits.max_jobs_per_key} per key)` }),
    );
    $("queue-table").tBodies[0].replaceChildren(...[...q.running, ...q.queued].map((j) => el("tr", {}, [
      el("td", {}, [el("code", { text: j.id.slice(0, 8), attrs: { title: j.id } })]), el("td", { text: j.owner }), el("td", { text: j.kind }),
      el("td", { text: j.model }), el("td", { text: j.stage ? `${j.status} (${j.stage})` : j.status }),
      el("td", { text: `${Math.round(100 * j.progress)} %` }),
    ])));
  } catch (error) {
    showError("queue-error", error);
  }
}

async function refreshDictionaries() {
  try {
    const list = await api.getJSON("/v1/dictionaries");
    showError("dicts-error", null);
    const rows = list.map((d) => {
      const det = d.details || {};
      const model = typeof det.name === "string" ? det.name : "–";
      const atoms = typeof det.atoms === "number" ? det.atoms.toLocaleString("en") : "–";
      const extra = [];
      if (typeof det.measurements === "number") extra.push(`${det.measurements} measurements`);
      if (typeof det.size_bytes === "number") extra.push(humanBytes(det.size_bytes));
      return el("tr", {}, [el("td", { text: model }), el("td", { text: atoms }),
        el("td", {}, [el("code", { text: d.name, attrs: { title: String(det.key || "") } }), el("span", { cls: "hint", text: extra.length ? ` ${extra.join(", ")}` : "" })]),
        el("td", { text: d.valid ? "ready" : "incomplete" })]);
    });
    $("dicts-table").tBodies[0].replaceChildren(...(rows.length ? rows : [el("tr", {}, [el("td", { text: "No dictionary stored yet.", attrs: { colspan: "4" } })])]));
  } catch (error) {
    showError("dicts-error", error);
  }
}

function prebuildTiming() {
  const m = currentModel($("pb-model"));
  for (const node of document.querySelectorAll(".pb-timing")) node.hidden = !(m && m.requires_timing);
}

async function prebuild(event) {
  event.preventDefault();
  showError("pb-error", null);
  $("pb-status").textContent = "";
  const bval = $("pb-bval").files[0];
  const bvec = $("pb-bvec").files[0];
  const results = [];
  if (!bval) results.push({ level: "error", text: "Choose a b-value file." });
  if (!bvec) results.push({ level: "error", text: "Choose a b-vector file." });
  if (bval && bvec) {
    const b = await readBval(bval);
    const v = await readBvec(bvec);
    if (b.error) results.push({ level: "error", text: b.error });
    if (v.error) results.push({ level: "error", text: v.error });
    if (!b.error && !v.error && b.values.length !== v.count) results.push({ level: "error", text: `${bval.name} has ${b.values.length} b-values but ${bvec.name} has ${v.count} directions: they must agree.` });
  }
  const m = currentModel($("pb-model"));
  if (m && m.requires_timing && (!$("pb-delta").value || !$("pb-Delta").value)) results.push({ level: "error", text: `${m.name} needs δ and Δ in seconds.` });
  renderChecks($("pb-checks"), results);
  if (results.length) return;
  const form = new FormData();
  form.append("model", $("pb-model").value);
  if ($("pb-size").value) form.append("size", $("pb-size").value);
  if (m && m.requires_timing) { form.append("delta", $("pb-delta").value); form.append("Delta", $("pb-Delta").value); }
  form.append("bval", bval, bval.name);
  form.append("bvec", bvec, bvec.name);
  try {
    const job = await api.upload("/v1/dictionaries", form, () => {}).promise;
    rememberLabel(job.id, `dictionary for ${bval.name}`);
    $("pb-status").textContent = `Build queued as job ${job.id.slice(0, 8)}; follow it under Jobs.`;
    refreshQueue();
  } catch (error) {
    showError("pb-error", error);
  }
}

// ---------------------------------------------------------------- wiring
function wire() {
  $("signin-form").addEventListener("submit", (e) => { e.preventDefault(); signIn($("api-key").value.trim()); });
  $("sign-out").addEventListener("click", () => signOut());
  for (const b of document.querySelectorAll("#nav [data-view]")) b.addEventListener("click", () => { banner(""); show(b.dataset.view); });
  $("jobs-to-submit").addEventListener("click", () => show("submit"));
  $("jobs-refresh").addEventListener("click", refreshJobs);
  $("job-back").addEventListener("click", () => show("jobs"));
  $("model").addEventListener("change", describeModel);
  $("pb-model").addEventListener("change", prebuildTiming);
  for (const field of ["dwi", "bval", "bvec", "mask"]) {
    $(`file-${field}`).addEventListener("change", (e) => setFile(field, e.target.files[0]));
  }
  $("drop-picker").addEventListener("change", (e) => takeDropped(e.target.files));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); takeDropped(e.dataTransfer.files); });
  // dropping anywhere else must not navigate away from the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("submit-form").addEventListener("submit", submit);
  $("submit-abort").addEventListener("click", () => state.uploading && state.uploading.abort());

  $("cmap-select").replaceChildren(...COLOUR_MAPS.map((n) => el("option", { text: n, attrs: { value: n } })));
  $("map-select").addEventListener("change", (e) => showMap(e.target.value));
  $("cmap-select").addEventListener("change", (e) => { viewer.cmap = e.target.value; viewer.render(); viewer.drawHistogram($("hist-stats")); });
  for (const radio of document.querySelectorAll("input[name=plane]")) {
    radio.addEventListener("change", (e) => { viewer.plane = e.target.value; updateSlider(true); viewer.render(); });
  }
  $("slice").addEventListener("input", (e) => {
    viewer.index = Number(e.target.value);
    $("slice-out").textContent = `${viewer.index + 1} / ${viewer.depth()}`;
    viewer.render();
  });
  // the value under the pointer (from the map's bytes: within 1/254 of its range)
  $("slice-canvas").addEventListener("mousemove", (e) => {
    const entry = viewer.entry;
    const at = viewer.voxelAt(e.offsetX, e.offsetY);
    if (!entry || !at) { $("probe").textContent = ""; return; }
    let value;
    if (entry.kind === "direction") value = at.bytes.every((b) => b === 0) ? "outside the mask" : `|x|, |y|, |z| ≈ ${at.bytes.map((b) => (b / 255).toFixed(2)).join(", ")}`;
    else value = at.bytes[0] === 0 ? "outside the mask" : `≈ ${formatValue(entry.min + ((at.bytes[0] - 1) / 254) * (entry.max - entry.min))} ${entry.units === "n/a" ? "" : entry.units}`;
    $("probe").textContent = `voxel (${at.x}, ${at.y}, ${at.z}): ${value}`;
  });
  $("slice-canvas").addEventListener("mouseleave", () => { $("probe").textContent = ""; });
  window.addEventListener("resize", () => { if (state.view === "job") { viewer.render(); viewer.drawHistogram($("hist-stats")); } });
  $("download-zip").addEventListener("click", async () => {
    const id = state.job.id;
    $("download-status").textContent = "Preparing the ZIP…";
    try {
      const size = await api.download(`/v1/jobs/${encodeURIComponent(id)}/results`, `${id}.zip`);
      $("download-status").textContent = `Downloaded ${id}.zip (${humanBytes(size)}).`;
    } catch (error) { $("download-status").textContent = error.message; }
  });
  $("download-file").addEventListener("click", async () => {
    const name = $("file-select").value;
    if (!name) return;
    try {
      const size = await api.download(`/v1/jobs/${encodeURIComponent(state.job.id)}/results/${encodeURIComponent(name)}`, name);
      $("download-status").textContent = `Downloaded ${name} (${humanBytes(size)}).`;
    } catch (error) { $("download-status").textContent = error.message; }
  });

  $("key-form").addEventListener("submit", createKey);
  $("key-copy").addEventListener("click", async () => {
    try { await navigator.clipboard.writeText($("key-created-value").value); $("key-copy").textContent = "Copied"; }
    catch (_) { $("key-created-value").select(); }
  });
  $("key-hide").addEventListener("click", () => { $("key-created-value").value = ""; $("key-created").hidden = true; $("key-copy").textContent = "Copy"; });
  $("queue-refresh").addEventListener("click", refreshQueue);
  $("prebuild-form").addEventListener("submit", prebuild);
}

async function start() {
  wire();
  const key = api.getKey();
  if (key) {
    const ok = await signIn(key, { quiet: true });
    if (!ok) showError("signin-error", "Your session's key is no longer accepted: it may have been revoked. Sign in again.");
  } else {
    show("signin", { focus: false });
  }
  document.body.dataset.ready = "1";
}

start();
