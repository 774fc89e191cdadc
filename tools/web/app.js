// vqgen's page: four panels over the JSON API of tools/webapp.py. Plain browser JavaScript, no libraries.
// window.vqgen keeps what the browser tests read: click-to-picture times of Sample, and the last answers.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const vqgen = (window.vqgen = { sampleMs: [], last: {} });
let info = null;

// ------------------------------------------------------------------------------------------ helpers
async function api(path, body) {
  const response = await fetch(path, body ? { method: "POST", body } : {});
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    throw new Error(`the server answered ${response.status} without a message`);
  }
  if (!response.ok) throw new Error(data.error || data.detail || `the server answered ${response.status}`);
  return data;
}

// Runs one request of a panel ("sample", "repair", ...): its button disabled meanwhile, then its error line
// (the server's one-line message) or its status line.
async function run(name, work) {
  const error = $(`#${name}-error`), status = $(`#${name}-status`), button = $(`#${name}-go`);
  error.hidden = true;
  status.textContent = "working ...";
  button.disabled = true;
  try {
    status.textContent = (await work()) || "";
  } catch (e) {
    error.textContent = e.message;
    error.hidden = false;
    status.textContent = "";
  } finally {
    button.disabled = false;
  }
}

function figure(src, caption, role) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = src;
  img.className = "pixelated";
  img.dataset.role = role;
  img.width = info.image_size * Math.max(1, Math.floor(info.scale / 2));
  fig.append(img);
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  fig.append(cap);
  return fig;
}

const kb = (n) => (n < 1000 ? `${n} bytes` : `${(n / 1000).toFixed(1)} kB`);
const db = (x) => (x === null || !isFinite(x) ? "identical" : `${x.toFixed(1)} dB`);

// ------------------------------------------------------------------------------------------ tabs
for (const tab of document.querySelectorAll("[role=tab]")) {
  tab.addEventListener("click", () => {
    for (const other of document.querySelectorAll("[role=tab]")) other.setAttribute("aria-selected", other === tab);
    for (const panel of document.querySelectorAll("[role=tabpanel]")) panel.hidden = panel.id !== tab.dataset.tab;
  });
}

// ------------------------------------------------------------------------------------------ sample
const sampleForm = $("#sample-form");
$("#sample-dice").addEventListener("click", () => {
  sampleForm.elements.seed.value = Math.floor(Math.random() * 1e9);
});
sampleForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const t0 = performance.now();
  run("sample", async () => {
    const data = await api("/api/sample", new FormData(sampleForm));
    const img = $("#sample-grid");
    await new Promise((resolve, reject) => {
      img.onload = resolve;
      img.onerror = () => reject(new Error("the browser could not show the grid"));
      img.src = data.grid;
    });
    const ms = performance.now() - t0;
    vqgen.sampleMs.push(ms);
    vqgen.last.sample = data;
    img.style.width = `${img.naturalWidth * (info.image_size < 64 ? 2 : 1)}px`;
    const all = sampleForm.elements.label.value === "-1" && info.classes.length;
    $("#sample-columns").textContent = all ? `left to right: ${info.classes.slice(0, data.n).join(" · ")}` : "";
    $("#sample-png").href = data.grid;
    $("#sample-npz").href = data.npz;
    $("#sample-result").hidden = false;
    return `${data.n} samples: ${(ms / 1000).toFixed(2)} s from click to picture (models ${data.model_seconds.toFixed(2)} s)`;
  });
});

// ------------------------------------------------------------------------------------------ repair
const imageCanvas = $("#repair-image"), maskCanvas = $("#repair-mask");
let repairSource = null; // {test: index} or {file: File}
let lastPixel = null;

function setupCanvases() {
  for (const c of [imageCanvas, maskCanvas]) {
    c.width = c.height = info.image_size; // one canvas pixel per image pixel: the mask is exact
    c.style.width = c.style.height = `${info.image_size * info.scale}px`;
  }
}

function drawSource(img) {
  const ctx = imageCanvas.getContext("2d"), s = info.image_size;
  const side = Math.min(img.naturalWidth, img.naturalHeight); // centre crop, as the server reads images
  ctx.clearRect(0, 0, s, s);
  ctx.drawImage(img, (img.naturalWidth - side) / 2, (img.naturalHeight - side) / 2, side, side, 0, 0, s, s);
  maskCanvas.getContext("2d").clearRect(0, 0, s, s);
}

function paintAt(event) {
  const rect = maskCanvas.getBoundingClientRect(), s = info.image_size;
  const x = Math.floor(((event.clientX - rect.left) / rect.width) * s);
  const y = Math.floor(((event.clientY - rect.top) / rect.height) * s);
  const r = Number($("#repair-brush").value) - 0.5, ctx = maskCanvas.getContext("2d");
  const from = lastPixel || [x, y], steps = Math.max(Math.abs(x - from[0]), Math.abs(y - from[1]), 1);
  ctx.fillStyle = "rgb(255, 0, 0)"; // opaque: a painted pixel is one whose alpha is not 0
  for (let i = 0; i <= steps; i++) {
    const cx = Math.round(from[0] + ((x - from[0]) * i) / steps), cy = Math.round(from[1] + ((y - from[1]) * i) / steps);
    for (let dy = -Math.ceil(r); dy <= Math.ceil(r); dy++)
      for (let dx = -Math.ceil(r); dx <= Math.ceil(r); dx++)
        if (dx * dx + dy * dy <= r * r) ctx.fillRect(cx + dx, cy + dy, 1, 1);
  }
  lastPixel = [x, y];
}

maskCanvas.addEventListener("pointerdown", (e) => {
  lastPixel = null;
  maskCanvas.setPointerCapture(e.pointerId);
  paintAt(e);
});
maskCanvas.addEventListener("pointermove", (e) => {
  if (e.buttons & 1) paintAt(e);
});
maskCanvas.addEventListener("pointerup", () => (lastPixel = null));
$("#repair-clear").addEventListener("click", () => maskCanvas.getContext("2d").clearRect(0, 0, info.image_size, info.image_size));

function chooseTest(index, thumb) {
  repairSource = { test: index };
  $("#repair-file").value = "";
  for (const t of document.querySelectorAll("#repair-tests img")) t.classList.toggle("chosen", t === thumb);
  drawSource(thumb);
}

$("#repair-file").addEventListener("change", () => {
  const file = $("#repair-file").files[0];
  if (!file) return;
  repairSource = { file };
  const img = new Image();
  img.onload = () => drawSource(img);
  img.onerror = () => imageCanvas.getContext("2d").clearRect(0, 0, info.image_size, info.image_size);
  img.src = URL.createObjectURL(file);
});

async function loadTests() {
  for (let tries = 0; info.test_message.startsWith("loading") && tries < 30; tries++) {
    await new Promise((r) => setTimeout(r, 500));
    info = await api("/api/info");
  }
  const box = $("#repair-tests");
  box.textContent = info.test_images ? "" : info.test_message;
  for (let i = 0; i < info.test_images; i++) {
    const img = document.createElement("img");
    img.src = `/api/test_image/${i}`;
    img.className = "pixelated";
    img.dataset.index = i;
    img.title = `test image ${i}`;
    img.addEventListener("click", () => chooseTest(i, img));
    if (i === 0) img.addEventListener("load", () => repairSource || chooseTest(0, img), { once: true });
    box.append(img);
  }
}

$("#repair-form").addEventListener("submit", (event) => {
  event.preventDefault();
  run("repair", async () => {
    if (!repairSource) throw new Error("choose an image first: a test image or an upload");
    const form = new FormData($("#repair-form"));
    if (repairSource.file) form.append("image", repairSource.file);
    else form.append("test_index", repairSource.test);
    form.append("mask", await new Promise((r) => maskCanvas.toBlob(r, "image/png")), "mask.png");
    const data = await api("/api/repair", form);
    vqgen.last.repair = data;
    const out = $("#repair-result");
    out.replaceChildren(figure(data.original, "original", "original"), figure(data.painted, "painted", "painted"),
      ...data.repairs.map((src, i) => figure(src, `repair ${i + 1}`, "repair")));
    const label = Number(form.get("label")), towards = label >= 0 ? ` towards ${info.classes[label]}` : "";
    return `${data.repairs.length} repairs${towards}, ${data.codes_redrawn} of ${data.codes} codes drawn again, ${data.seconds.toFixed(2)} s`;
  });
});

// ------------------------------------------------------------------------------------------ compress
$("#compress-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const link = $("#compress-vqz");
  run("compress", async () => {
    link.hidden = true;
    if (!$("#compress-file").files.length) throw new Error("choose an image file to compress");
    const data = await api("/api/compress", new FormData($("#compress-form")));
    vqgen.last.compress = data;
    const vq = data.vq, other = (name, x) =>
      `${name} quality ${x.quality}: ${kb(x.bytes)}, ${db(x.psnr)}` + (x.fits ? "" : ` (even quality 1 is larger than ${kb(vq.bytes)})`);
    $("#compress-result").replaceChildren(
      figure(data.original, "original", "original"),
      figure(vq.png, `.vqz: ${kb(vq.bytes)} (codes ${vq.payload_bytes}, header and checks ${vq.bytes - vq.payload_bytes}), ` +
        `${vq.bpp.toFixed(3)} bits/pixel, ${db(vq.psnr)}`, "vq"),
      figure(data.jpeg.data, other("JPEG", data.jpeg), "jpeg"),
      figure(data.webp.data, other("WebP", data.webp), "webp"));
    link.href = data.vqz;
    link.download = data.name;
    link.textContent = `download ${data.name} (${kb(vq.bytes)})`;
    link.hidden = false;
    return `compressed in ${data.seconds.toFixed(2)} s; PSNR against the original`;
  });
});

$("#decompress-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = $("#decompress-form");
  run("decompress", async () => {
    if (!$("#decompress-file").files.length) throw new Error("choose a .vqz file to decompress");
    const data = await api("/api/decompress", new FormData(form));
    vqgen.last.decompress = data;
    $("#decompress-result").replaceChildren(...data.images.map((src, i) => figure(src, data.names[i], "decoded")));
    return `${data.count} image(s), ${data.bpp.toFixed(3)} bits/pixel, ${data.seconds.toFixed(2)} s`;
  });
});

// ------------------------------------------------------------------------------------------ anomaly
$("#anomaly-form").addEventListener("submit", (event) => {
  event.preventDefault();
  run("anomaly", async () => {
    if (!$("#anomaly-files").files.length) throw new Error("choose one or more image files to score");
    const data = await api("/api/anomaly", new FormData($("#anomaly-form")));
    vqgen.last.anomaly = data;
    const table = $("#anomaly-result"), head = document.createElement("tr");
    for (const name of ["image", "and its surprise", ...data.scores]) {
      const th = document.createElement("th");
      th.textContent = name.replaceAll("_", " ");
      head.append(th);
    }
    $("thead", table).replaceChildren(head);
    $("tbody", table).replaceChildren(...data.rows.map((row) => {
      const tr = document.createElement("tr"), name = document.createElement("td"), heat = document.createElement("td");
      name.textContent = row.name;
      const img = document.createElement("img");
      img.src = row.heat;
      img.className = "pixelated heat";
      heat.append(img);
      tr.append(name, heat, ...data.scores.map((k) => {
        const td = document.createElement("td");
        td.textContent = row.scores[k].toPrecision(4);
        return td;
      }));
      return tr;
    }));
    table.hidden = false;
    return `${data.rows.length} image(s) scored in ${data.seconds.toFixed(2)} s, most anomalous by `
      + `${data.ranked_by.replaceAll("_", " ")} first`;
  });
});

// ------------------------------------------------------------------------------------------ start
(async () => {
  try {
    info = await api("/api/info");
  } catch (e) {
    $("#models").textContent = `cannot reach the server: ${e.message}`;
    return;
  }
  $("#models").textContent = `prior ${info.prior}, stage 1 ${info.stage1}: ${info.image_size}px, ` +
    `${info.channels === 1 ? "greyscale" : "colour"}, ${info.grid_shape.join("x")} codes of ${info.codebook_size}, on ${info.device}`;
  const select = $("#sample-label");
  if (!info.classes.length) select.replaceChildren(new Option("unconditional", "-1"));
  info.classes.forEach((name, i) => select.append(new Option(name, i)));
  info.classes.forEach((name, i) => $("#repair-label").append(new Option(name, i))); // after "none (unconditional)"
  for (const label of document.querySelectorAll(".conditional-only")) {
    label.hidden = !info.classes.length; // an unconditional prior: no class to repair towards, nothing to guide
  }
  for (const [name, value] of Object.entries(info.sample_defaults)) { // serve --temperature / --cfg_scale
    $(`#sample-form [name=${name}]`).value = value;
  }
  for (const label of document.querySelectorAll(".masked-only")) {
    label.hidden = !info.masked; // a masked prior decodes in a number of parallel steps
    $("input", label).value = info.default_steps;
  }
  setupCanvases();
  document.body.dataset.ready = "1";
  loadTests();
})();
