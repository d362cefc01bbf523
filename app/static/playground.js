// The playground: generate with a cache and watch each step, read the routers' plans, train a router.
// Plain browser JavaScript against the public API; nothing is loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const COMPUTE = "#1d3557", REUSE = "#a8dadc", ACCENT = "#e76f51";

const keyInput = $("api-key");
keyInput.value = localStorage.getItem("harmonica-key") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("harmonica-key", keyInput.value); loadAll(); });

function headers(extra = {}) {
  const key = keyInput.value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// A JSON API call; a problem answer (RFC 9457) becomes an error that says what to change.
async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    throw new Error(body?.detail ? `${body.title}: ${body.detail}` : `${response.status} ${response.statusText}`);
  }
  return body;
}

// A job's Server-Sent Events, read with fetch (EventSource cannot send the Authorization header).
async function follow(jobId, onEvent) {
  const response = await fetch(`/jobs/${jobId}/events`, { headers: headers() });
  if (!response.ok) throw new Error(`events of job ${jobId}: ${response.status}`);
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { type: "message", data: "" };
      for (const line of frame.split("\n")) {
        const colon = line.indexOf(":");
        if (colon <= 0) continue;  // a comment (ping) or nothing
        const [name, value] = [line.slice(0, colon), line.slice(colon + 1).trimStart()];
        if (name === "event") event.type = value;
        if (name === "data") event.data += value;
      }
      if (event.data) onEvent(event.type, JSON.parse(event.data));
    }
  }
}

// POST a job and follow its events until it ends, the button disabled meanwhile: `onEvent` gets the progress
// events and the success; any other state is written to `status`.
async function runJob(path, body, button, status, onEvent) {
  button.disabled = true;
  try {
    const job = await api(path, { method: "POST", body: JSON.stringify(body),
                                  headers: { "Content-Type": "application/json" } });
    status.textContent = `job ${job.id}: ${job.status}`;
    await follow(job.id, async (type, data) => {
      if (type === "progress" || data.status === "succeeded") await onEvent(type, data);
      else status.textContent = `job ${data.id ?? job.id}: ${data.status}` + (data.error ? ` (${data.error.message})` : "");
    });
  } catch (error) {
    showError(error.message);
  } finally {
    button.disabled = false;
  }
}

// ---- tabs
for (const button of document.querySelectorAll("nav button")) {
  button.addEventListener("click", () => {
    for (const other of document.querySelectorAll("nav button")) other.classList.toggle("active", other === button);
    for (const section of document.querySelectorAll("main section")) section.hidden = section.id !== button.dataset.tab;
  });
}

// ---- models and routers
let models = [], routers = [];

async function loadAll() {
  try {
    [models, routers] = await Promise.all([api("/models"), api("/routers")]);
    showError("");
  } catch (error) {
    showError(error.message);
    return;
  }
  for (const select of [$("gen-model"), $("train-model")]) {
    select.replaceChildren(...models.map((m) => new Option(`${m.id} (${m.family})`, m.id)));
  }
  updateGenerateForm();
  drawRouterTable();
}

function updateGenerateForm() {
  const model = models.find((m) => m.id === $("gen-model").value);
  const method = $("gen-method").value;
  const learned = method === "harmonica" || method === "l2c";
  const usable = routers.filter((r) => r.model === model?.id && r.method === method);
  const previous = $("gen-router").value;
  $("gen-router").replaceChildren(...usable.map((r) => new Option(`${r.id} (T=${r.steps})`, r.id)));
  if (usable.some((r) => r.id === previous)) $("gen-router").value = previous;
  $("gen-router-label").hidden = !learned;
  $("gen-interval-label").hidden = method !== "fora";
  $("gen-labels-label").hidden = model?.family !== "dit";
  $("gen-prompt-label").hidden = model?.family === "dit";
  const chosen = usable.find((r) => r.id === $("gen-router").value);
  if (learned && chosen) $("gen-steps").value = chosen.steps;  // a router runs at the steps it was trained for
}
$("gen-model").addEventListener("change", updateGenerateForm);
$("gen-method").addEventListener("change", updateGenerateForm);
$("gen-router").addEventListener("change", updateGenerateForm);

// ---- charts: plain canvas drawing
function label(ctx, text, x, y) {
  ctx.fillStyle = "#333";
  ctx.font = "11px sans-serif";
  ctx.fillText(text, x, y);
}

// ---- generate
function drawSteps(steps) {
  const canvas = $("gen-steps-chart"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!steps.length) return;
  const total = steps[0].total, width = canvas.width / total, height = canvas.height - 14;
  for (const s of steps) {
    const all = s.computed_branches + s.reused_branches, x = (s.step - 1) * width;
    const computed = (height * s.computed_branches) / all;
    ctx.fillStyle = REUSE;
    ctx.fillRect(x + 1, 0, width - 2, height - computed);
    ctx.fillStyle = COMPUTE;
    ctx.fillRect(x + 1, height - computed, width - 2, computed);
  }
  label(ctx, "branches computed (dark) and reused (light) per step", 2, canvas.height - 2);
  canvas.dataset.steps = steps.length;
}

$("generate-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target), method = form.get("method");
  const model = models.find((m) => m.id === form.get("model"));
  const body = { model: model.id, steps: Number(form.get("steps")), seed: Number(form.get("seed")) };
  if (model.family === "dit") body.class_labels = form.get("class_labels").split(",").map((v) => Number(v.trim()));
  else body.prompts = [form.get("prompt")];
  body.acceleration = { method };
  if (method === "fora") body.acceleration.interval = Number(form.get("interval"));
  if (method === "harmonica" || method === "l2c") body.acceleration.router_id = form.get("router_id");
  const steps = [];
  $("gen-result").hidden = true;
  $("gen-progress").hidden = false;
  $("gen-bar").style.width = "0";
  drawSteps(steps);
  await runJob("/generate", body, $("gen-submit"), $("gen-status"), async (type, data) => {
    if (type === "progress") {
      steps.push(data);
      $("gen-bar").style.width = `${(100 * data.step) / data.total}%`;
      $("gen-status").textContent = `step ${data.step} of ${data.total}: ${data.computed_branches} branches ` +
        `computed, ${data.reused_branches} reused, ${(1000 * data.step_seconds).toFixed(0)} ms`;
      drawSteps(steps);
      return;
    }
    const r = data.result;
    const grid = await fetch(data.links.grid, { headers: headers() });
    $("gen-grid").src = URL.createObjectURL(await grid.blob());
    $("gen-summary").textContent = `${r.images.length} images in ${r.latency_s.toFixed(2)} s; ` +
      `cache use ${(100 * r.cache_usage_rate).toFixed(1)} %, theoretical speedup ${r.theoretical_speedup.toFixed(2)}x ` +
      `(${r.execution_mode} mode)`;
    $("gen-result").hidden = false;
    $("gen-status").textContent = `job ${data.id}: succeeded`;
  });
});

// ---- routers: table, plan heatmap, quality against speedup
function drawRouterTable() {
  const rows = routers.map((r) => {
    const q = r.quality || {}, tr = document.createElement("tr");
    const cells = [r.id, r.model, r.steps, q.cache_usage_rate === undefined ? "" : `${(100 * q.cache_usage_rate).toFixed(1)} %`,
                   q.theoretical_speedup ? `${q.theoretical_speedup.toFixed(2)}x` : "", q.psnr ? q.psnr.toFixed(1) : "",
                   q.samples ?? ""];
    tr.replaceChildren(...cells.map((text) => Object.assign(document.createElement("td"), { textContent: text })));
    tr.dataset.router = r.id;
    tr.addEventListener("click", () => showRouter(r.id, tr));
    return tr;
  });
  $("router-table").tBodies[0].replaceChildren(...rows);
  drawScatter();
}

async function showRouter(id, row) {
  for (const other of $("router-table").tBodies[0].rows) other.classList.toggle("selected", other === row);
  try {
    drawHeatmap(await api(`/routers/${id}`));
  } catch (error) {
    showError(error.message);
  }
}

function drawHeatmap(router) {
  const canvas = $("router-heatmap"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const plan = router.plan, layout = router.branch_layout;
  if (!plan.length) {
    $("heatmap-caption").textContent = `${router.id}: this router file does not record its plan.`;
    return;
  }
  const left = 34, top = 22, width = (canvas.width - left) / layout.length, height = (canvas.height - top) / plan.length;
  let computed = 0;
  plan.forEach((row, k) => row.forEach((computes, i) => {
    computed += computes;
    ctx.fillStyle = computes ? COMPUTE : REUSE;
    ctx.fillRect(left + i * width, top + k * height, Math.max(1, width - 1), Math.max(1, height - 1));
  }));
  layout.forEach((name, i) => {  // a block's number above its first branch
    const [block] = name.split(".");
    if (i === 0 || layout[i - 1].split(".")[0] !== block) label(ctx, `b${block}`, left + i * width + 1, 12);
  });
  const every = Math.ceil(plan.length / 20);
  plan.forEach((_, k) => { if (k % every === 0) label(ctx, String(k), 4, top + k * height + Math.min(height, 11)); });
  canvas.dataset.router = router.id;
  canvas.dataset.computed = computed;
  const kinds = [...new Set(layout.map((name) => name.split(".")[1]))].join(", ");
  $("heatmap-caption").textContent = `${router.id}: ${plan.length} steps (down) x ${layout.length} branches ` +
    `(across; per block: ${kinds}). Dark: computes (${computed}), light: reuses its cached output ` +
    `(${plan.length * layout.length - computed}), at threshold ${router.threshold}.`;
}

function drawScatter() {
  const canvas = $("router-scatter"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const points = routers.filter((r) => r.quality?.psnr && r.quality?.theoretical_speedup);
  if (!points.length) return;
  const xs = points.map((r) => r.quality.theoretical_speedup), ys = points.map((r) => r.quality.psnr);
  const [x0, x1] = [1, Math.max(...xs) * 1.1], [y0, y1] = [Math.min(...ys) - 2, Math.max(...ys) + 2];
  const px = (x) => 40 + ((x - x0) / (x1 - x0)) * (canvas.width - 50);
  const py = (y) => canvas.height - 30 - ((y - y0) / (y1 - y0)) * (canvas.height - 40);
  ctx.strokeStyle = "#999";
  ctx.strokeRect(40, 10, canvas.width - 50, canvas.height - 40);
  label(ctx, "theoretical speedup", canvas.width / 2 - 40, canvas.height - 4);
  label(ctx, `${x0.toFixed(1)}x`, 36, canvas.height - 16);
  label(ctx, `${x1.toFixed(1)}x`, canvas.width - 34, canvas.height - 16);
  label(ctx, `${y1.toFixed(0)} dB`, 2, 18);
  label(ctx, `${y0.toFixed(0)} dB`, 2, canvas.height - 32);
  for (const r of points) {
    ctx.fillStyle = r.builtin ? COMPUTE : ACCENT;
    ctx.beginPath();
    ctx.arc(px(r.quality.theoretical_speedup), py(r.quality.psnr), 5, 0, 2 * Math.PI);
    ctx.fill();
    ctx.fillText(r.id.slice(0, 24), px(r.quality.theoretical_speedup) + 7, py(r.quality.psnr) + 4);
  }
}

// ---- train
function drawTraining(points) {
  const canvas = $("train-chart"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!points.length) return;
  const total = points[0].total, w = canvas.width - 20, h = canvas.height - 30;
  const losses = points.map((p) => Math.log10(p.loss)), lo = Math.min(...losses), hi = Math.max(...losses) || lo + 1;
  const line = (values, color, scale) => {
    ctx.strokeStyle = color;
    ctx.beginPath();
    points.forEach((p, i) => ctx[i ? "lineTo" : "moveTo"](10 + (w * p.iteration) / total, 10 + h - h * scale(values[i])));
    ctx.stroke();
  };
  line(losses, ACCENT, (v) => (hi === lo ? 0.5 : (v - lo) / (hi - lo)));
  line(points.map((p) => p.cache_usage_rate), COMPUTE, (v) => v);
  label(ctx, "loss (log, orange) and cache use at tau (blue, 0-100 %) per router update", 10, canvas.height - 4);
  canvas.dataset.updates = points.length;
}

$("train-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const body = { model: form.get("model"), steps: Number(form.get("steps")), iterations: Number(form.get("iterations")),
                 beta: Number(form.get("beta")), name: form.get("name") || null };
  const points = [];
  drawTraining(points);
  await runJob("/train-router", body, $("train-submit"), $("train-status"), (type, data) => {
    if (type === "progress" && data.phase === "lambdas") {
      $("train-status").textContent = `estimating the image-error weights: sampling pass ${data.lambda_pass} ` +
        `of ${data.lambda_passes} (before update ${data.iteration + 1})`;
    } else if (type === "progress") {
      points.push(data);
      $("train-status").textContent = `update ${data.iteration} of ${data.total}: loss ${data.loss.toPrecision(3)}, ` +
        `cache use ${(100 * data.cache_usage_rate).toFixed(1)} %`;
      drawTraining(points);
    } else {
      const q = data.result.quality;
      $("train-status").textContent = `router ${data.result.router_id}: cache use ${(100 * q.cache_usage_rate).toFixed(1)} %, ` +
        `theoretical speedup ${q.theoretical_speedup.toFixed(2)}x, PSNR ${q.psnr.toFixed(1)} dB; it is in the router list`;
      loadAll();
    }
  });
});

loadAll();
