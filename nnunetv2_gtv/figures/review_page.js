"use strict";
// The review page: a case table in review priority and a slice viewer. Volumes arrive as mosaics of axial
// slices in display axes (superior, posterior, left; see nnunetv2_gtv/figures/slices.py), so every plane below is
// already in radiological convention: patient right on the image left, anterior / superior up.
const DATA = JSON.parse(document.getElementById("review-data").textContent);
const VIEWS = [
  {name: "axial", fixed: 0, row: 1, rowReversed: false, col: 2, edges: ["A", "P", "R", "L"]},
  {name: "coronal", fixed: 1, row: 0, rowReversed: true, col: 2, edges: ["S", "I", "R", "L"]},
  {name: "sagittal", fixed: 2, row: 0, rowReversed: true, col: 1, edges: ["S", "I", "A", "P"]},
];
const VIEW_SIZE_PX = 330;   // the longest side of the case's box, in screen pixels
const SCALE_BARS_MM = [1, 2, 5, 10, 20, 50, 100, 200];
const decoded = new Map();  // case name -> {ct, entropy, gtv} Uint8Arrays
let current = null;         // {entry, view, volumes, slice: [s, p, l], active, zoom}

const $ = (id) => document.getElementById(id);
const fmt = (value, digits) => (value === null || value === undefined) ? "–" : Number(value).toFixed(digits);

function modelVolumes(row) {
  return Object.keys(row).filter((k) => k.startsWith("volume_ml_model_"))
    .sort((a, b) => Number(a.slice(16)) - Number(b.slice(16))).map((k) => row[k]);
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function labelColumns() {
  // several labels: each label's VVC and fused volume, where the summary has them
  return DATA.labels.filter((l) => DATA.cases.some((c) => `vvc_${l.name}` in c.row));
}

function buildTable() {
  const nModels = Math.max(0, ...DATA.cases.map((c) => modelVolumes(c.row).length));
  const perLabel = labelColumns();
  const score = DATA.review && DATA.review.score !== "vvc" ? DATA.review.score : null;
  const head = ["#", "case", "review", ...(score ? [score] : []), "VVC", "fused (ml)"];
  for (const l of perLabel) head.push(`VVC ${l.name}`, `${l.name} (ml)`);
  for (let m = 1; m <= nModels; m++) head.push(`model ${m} (ml)`);
  head.push("components removed", "thumbnail", "status");
  const htr = document.createElement("tr");
  for (const h of head) { const th = document.createElement("th"); th.textContent = h; htr.appendChild(th); }
  $("case-table").tHead.appendChild(htr);
  const body = $("case-table").tBodies[0];
  DATA.cases.forEach((entry, i) => {
    const row = entry.row, tr = document.createElement("tr");
    tr.dataset.case = entry.case;
    tr.classList.toggle("flagged", !!row.review);
    tr.classList.toggle("broken", !!entry.error);
    cell(tr, String(i + 1));
    cell(tr, entry.case, "name");
    cell(tr, row.review ? "flagged" : "", "flag");
    if (score) cell(tr, fmt(row[score], 3));
    cell(tr, fmt(row.vvc, 3));
    cell(tr, fmt(row.volume_ml_fused, 2));
    for (const l of perLabel) {
      cell(tr, fmt(row[`vvc_${l.name}`], 3), row[`review_${l.name}`] ? "flag" : "");
      cell(tr, fmt(row[`volume_ml_fused_${l.name}`], 2));
    }
    const volumes = modelVolumes(row);
    for (let m = 0; m < nModels; m++) cell(tr, fmt(volumes[m], 2));
    cell(tr, row.components_removed === undefined ? "–" : String(row.components_removed));
    const thumb = cell(tr, "");
    if (entry.view) {
      const img = document.createElement("img");
      img.src = entry.view.thumbnail;
      img.alt = `${entry.case}, axial slice with the most uncertain GTV voxels`;
      thumb.appendChild(img);
    } else {
      thumb.textContent = "–";
    }
    const notes = (entry.notes || []).join("; ");
    cell(tr, entry.error ? `broken: ${entry.error}` : (notes || "ok"), "status");
    tr.addEventListener("click", () => openCase(i));
    body.appendChild(tr);
  });
  const flagged = DATA.cases.filter((c) => c.row.review).length;
  const broken = DATA.cases.filter((c) => c.error).length;
  $("about").textContent = `${DATA.cases.length} cases, ${flagged} flagged for review` +
    (broken ? `, ${broken} cannot be shown (marked)` : "") +
    (DATA.review
      ? `. Sorted by review priority: flagged first, then by ${DATA.review.score}, ${DATA.review.meaning}` +
        (DATA.review.budget !== null ? ` (flag: the riskiest ${DATA.review.budget} of the cases by it)`
          : DATA.review.threshold !== null && DATA.review.threshold !== undefined ? ` (flag: ${DATA.review.flag})`
          : ` (flag: VVC > ${DATA.vvc_threshold})`)
      : `. Sorted by review priority: flagged first, then the highest VVC (of the case or a label) descending` +
        (DATA.vvc_threshold !== null && DATA.vvc_threshold !== undefined ? ` (flag: VVC > ${DATA.vvc_threshold})` : "")) +
    `. CT window ${DATA.window_hu[0]} to ${DATA.window_hu[1]} HU; each case shows the fused GTV plus ` +
    `${DATA.margin_mm} mm. Click a row to view it.` + (DATA.command ? ` Made by: ${DATA.command}` : "");
  $("flagged-only").addEventListener("change", (event) => {
    for (const tr of body.rows) {
      const entry = DATA.cases.find((c) => c.case === tr.dataset.case);
      tr.hidden = event.target.checked && !entry.row.review && !entry.error;
    }
  });
}

async function decodeVolume(uri, shape, columns) {
  const img = new Image();
  img.src = uri;
  await img.decode();
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d", {willReadFrequently: true});
  ctx.drawImage(img, 0, 0);
  const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  const [S, P, L] = shape, out = new Uint8Array(S * P * L);
  for (let s = 0; s < S; s++) {
    const x0 = (s % columns) * L, y0 = Math.floor(s / columns) * P;
    for (let y = 0; y < P; y++) {
      const src = ((y0 + y) * canvas.width + x0) * 4, dst = (s * P + y) * L;
      for (let x = 0; x < L; x++) out[dst + x] = rgba[src + 4 * x];
    }
  }
  return out;
}

async function volumesOf(entry) {
  if (!decoded.has(entry.case)) {
    const v = entry.view;
    const [ct, entropy, gtv] = await Promise.all([v.ct, v.entropy, v.gtv].map(
      (uri) => uri ? decodeVolume(uri, v.shape, v.columns) : Promise.resolve(null)));
    decoded.set(entry.case, {ct, entropy, gtv});
  }
  return decoded.get(entry.case);
}

function voxel(shape, view, t, r, c) {
  const v = [0, 0, 0];
  v[view.fixed] = t;
  v[view.row] = view.rowReversed ? shape[view.row] - 1 - r : r;
  v[view.col] = c;
  return (v[0] * shape[1] + v[1]) * shape[2] + v[2];
}

function drawView(k) {
  const view = VIEWS[k], v = current.view, vol = current.volumes, shape = v.shape, sp = v.spacing;
  const h = shape[view.row], w = shape[view.col], t = current.slice[k];
  const layers = {ct: $("layer-ct").checked, gtv: $("layer-gtv").checked, entropy: $("layer-entropy").checked};
  const pixels = new ImageData(w, h), labels = new Uint8Array(w * h), alpha = DATA.entropy_alpha;
  for (let r = 0; r < h; r++) {
    for (let c = 0; c < w; c++) {
      const i = voxel(shape, view, t, r, c), p = (r * w + c) * 4;
      let red = 0, green = 0, blue = 0;
      if (layers.ct && vol.ct) red = green = blue = vol.ct[i];
      const code = vol.entropy[i];
      if (layers.entropy && code > 0) {
        const colour = DATA.entropy_colours[code];
        red = (1 - alpha) * red + alpha * colour[0];
        green = (1 - alpha) * green + alpha * colour[1];
        blue = (1 - alpha) * blue + alpha * colour[2];
      }
      pixels.data[p] = red; pixels.data[p + 1] = green; pixels.data[p + 2] = blue; pixels.data[p + 3] = 255;
      labels[r * w + c] = vol.gtv[i];
    }
  }
  const off = document.createElement("canvas");
  off.width = w; off.height = h;
  off.getContext("2d").putImageData(pixels, 0, 0);
  const panel = current.panels[k], canvas = panel.canvas;
  const W = Math.max(1, Math.round(w * sp[view.col] * current.zoom));
  const H = Math.max(1, Math.round(h * sp[view.row] * current.zoom));
  canvas.width = W; canvas.height = H;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, 0, 0, W, H);
  if (layers.gtv) {
    for (const l of DATA.labels) drawOutline(ctx, labels, l.value, l.colour, w, h, W / w, H / h);
  }
  drawEdges(ctx, view.edges, W, H);
  drawScaleBar(ctx, W, H);
  const axis = v.file_axes[view.fixed], display = axis.offset + t * axis.step;
  const fileIndex = axis.sign > 0 ? display : axis.n - 1 - display;
  panel.label.textContent = `${view.name} ${t + 1}/${shape[view.fixed]} (file ${axis.letter} = ${fileIndex})`;
  panel.slider.value = String(t);
  panel.element.dataset.slice = String(t);
}

function drawOutline(ctx, labels, value, colour, w, h, sx, sy) {
  const inside = (r, c) => r >= 0 && r < h && c >= 0 && c < w && labels[r * w + c] === value;
  ctx.beginPath();
  for (let r = 0; r < h; r++) {
    for (let c = 0; c < w; c++) {
      if (!inside(r, c)) continue;
      const x = c * sx, y = r * sy;
      if (!inside(r - 1, c)) { ctx.moveTo(x, y); ctx.lineTo(x + sx, y); }
      if (!inside(r + 1, c)) { ctx.moveTo(x, y + sy); ctx.lineTo(x + sx, y + sy); }
      if (!inside(r, c - 1)) { ctx.moveTo(x, y); ctx.lineTo(x, y + sy); }
      if (!inside(r, c + 1)) { ctx.moveTo(x + sx, y); ctx.lineTo(x + sx, y + sy); }
    }
  }
  ctx.strokeStyle = colour;
  ctx.lineWidth = 1.5;
  ctx.stroke();
}

function drawEdges(ctx, edges, W, H) {
  ctx.fillStyle = "yellow";
  ctx.font = "12px sans-serif";
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  ctx.fillText(edges[0], W / 2, 9);
  ctx.fillText(edges[1], W / 2, H - 9);
  ctx.fillText(edges[2], 8, H / 2);
  ctx.fillText(edges[3], W - 8, H / 2);
}

function drawScaleBar(ctx, W, H) {
  const mm = SCALE_BARS_MM.filter((length) => length * current.zoom <= W / 3).pop() || SCALE_BARS_MM[0];
  const length = mm * current.zoom, x = 10, y = H - 22;
  ctx.fillStyle = "black";
  ctx.fillRect(x - 1, y - 1, length + 2, 6);
  ctx.fillStyle = "white";
  ctx.fillRect(x, y, length, 4);
  ctx.textAlign = "left";
  ctx.textBaseline = "bottom";
  ctx.fillText(`${mm} mm`, x, y - 2);
}

function setSlice(k, t) {
  const n = current.view.shape[VIEWS[k].fixed];
  const clamped = Math.min(n - 1, Math.max(0, t));
  if (clamped !== current.slice[k]) {
    current.slice[k] = clamped;
    drawView(k);
  }
}

function setActive(k) {
  current.active = k;
  current.panels.forEach((panel, j) => panel.element.classList.toggle("active", j === k));
}

function buildPanels() {
  const views = $("views");
  views.replaceChildren();
  current.panels = VIEWS.map((view, k) => {
    const element = document.createElement("div");
    element.className = "view";
    element.dataset.view = view.name;
    const canvas = document.createElement("canvas");
    const bar = document.createElement("div");
    bar.className = "bar";
    const slider = document.createElement("input");
    slider.type = "range";
    slider.min = "0";
    slider.max = String(current.view.shape[view.fixed] - 1);
    slider.setAttribute("aria-label", `${view.name} slice`);
    const label = document.createElement("span");
    bar.append(slider, label);
    element.append(canvas, bar);
    views.appendChild(element);
    slider.addEventListener("input", () => setSlice(k, Number(slider.value)));
    element.addEventListener("mouseenter", () => setActive(k));
    canvas.addEventListener("wheel", (event) => {
      event.preventDefault();
      setActive(k);
      setSlice(k, current.slice[k] + (event.deltaY > 0 ? 1 : -1));
    }, {passive: false});
    return {element, canvas, slider, label};
  });
}

function buildLegend() {
  const legend = $("legend"), bar = document.createElement("canvas");
  bar.width = 160; bar.height = 12;
  const ctx = bar.getContext("2d");
  for (let x = 0; x < 160; x++) {
    const c = DATA.entropy_colours[Math.max(1, Math.round(x * 255 / 159))];
    ctx.fillStyle = `rgb(${c[0]},${c[1]},${c[2]})`;
    ctx.fillRect(x, 0, 1, 12);
  }
  const v = current.view;
  const swatches = DATA.labels.map((l) => {
    const item = document.createElement("span");
    item.className = "label-swatch";
    item.dataset.label = l.name;
    const box = document.createElement("span");
    box.style.borderColor = l.colour;
    item.append(box, l.name);
    return item;
  });
  legend.replaceChildren(`entropy (nats, shown where > 0) 0`, bar, `${fmt(v.entropy_scale, 3)}; fused outlines: `,
    ...swatches, `; box around the ${v.cropped_to} ` +
    `(${v.shape.map((n, d) => (n * v.spacing[d]).toFixed(0)).join(" x ")} mm S x P x L)` +
    (v.step > 1 ? `; in-plane subsampled by ${v.step} (a wide box)` : "") + (v.ct ? "" : "; no CT"));
}

function buildLevels() {
  const table = $("levels");
  table.replaceChildren();
  const head = table.createTHead().insertRow();
  for (const h of ["entropy level (nats)", "voxels inside the GTV", "voxels at the GTV border (±1 voxel)",
                   "voxels in the box"]) {
    const th = document.createElement("th"); th.textContent = h; head.appendChild(th);
  }
  const body = table.createTBody();
  for (const level of current.view.levels) {
    const tr = body.insertRow();
    cell(tr, fmt(level.entropy, 4));
    cell(tr, String(level.inside));
    cell(tr, String(level.border));
    cell(tr, String(level.box));
  }
}

async function openCase(i) {
  const entry = DATA.cases[i];
  for (const tr of $("case-table").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.case === entry.case);
  $("viewer").hidden = false;
  $("viewer-title").textContent = entry.case;
  delete document.body.dataset.shown;
  if (!entry.view) {
    current = null;
    $("viewer-message").textContent = `This case cannot be shown: ${entry.error}`;
    for (const id of ["views", "legend", "levels"]) $(id).replaceChildren();
    document.body.dataset.shown = entry.case;
    return;
  }
  const v = entry.view;
  $("viewer-message").textContent = (entry.notes || []).join("; ") +
    ` Starts at the slices with the most uncertain GTV voxels.`;
  const volumes = await volumesOf(entry);
  const extent = Math.max(...v.shape.map((n, d) => n * v.spacing[d]));
  current = {entry, view: v, volumes, slice: v.start.slice(), active: 0, zoom: VIEW_SIZE_PX / extent};
  buildPanels();
  setActive(0);
  VIEWS.forEach((_, k) => drawView(k));
  buildLegend();
  buildLevels();
  document.body.dataset.shown = entry.case;
}

document.addEventListener("keydown", (event) => {
  if (!current || (event.target instanceof HTMLInputElement && event.target.type === "range")) return;
  const steps = {ArrowUp: 1, ArrowRight: 1, ArrowDown: -1, ArrowLeft: -1, PageUp: 10, PageDown: -10};
  if (!(event.key in steps)) return;
  event.preventDefault();
  setSlice(current.active, current.slice[current.active] + steps[event.key]);
});
for (const id of ["layer-ct", "layer-gtv", "layer-entropy"]) {
  $(id).addEventListener("change", () => { if (current) VIEWS.forEach((_, k) => drawView(k)); });
}

buildTable();
const first = DATA.cases.findIndex((c) => c.view);
openCase(first >= 0 ? first : 0);
