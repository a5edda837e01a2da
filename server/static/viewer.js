// The slice viewer: draws slices of a map (bytes from /v1/jobs/{id}/maps/{label}/volume)
// with a colour map, its colour bar and a histogram. Slices are cut from the volume in
// the page, so moving the slider needs no request.

import { lookupTable } from "./colormaps.js";

/** Format a value for a colour bar or histogram label. */
export function formatValue(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return Number(v.toPrecision(3)).toString();
}

/** Slice geometry: [width, height, depth] of a plane of a volume of `shape` (x, y, z). */
export function planeSize(shape, plane) {
  const [nx, ny, nz] = shape;
  if (plane === "axial") return [nx, ny, nz];
  if (plane === "coronal") return [nx, nz, ny];
  return [ny, nz, nx];
}

/** Fill `image` (ImageData of width x height) with slice `k` of `plane`. Rows are
 * flipped so that +y (axial) or +z (coronal, sagittal) points up. */
export function drawSlice(image, bytes, shape, plane, k, kind, lut) {
  const [nx, ny, nz] = shape;
  const [w, h] = planeSize(shape, plane);
  const px = image.data;
  const channels = kind === "direction" ? 3 : 1;
  for (let row = 0; row < h; row++) {
    const v = h - 1 - row;
    for (let u = 0; u < w; u++) {
      let x, y, z;
      if (plane === "axial") { x = u; y = v; z = k; }
      else if (plane === "coronal") { x = u; y = k; z = v; }
      else { x = k; y = u; z = v; }
      const index = ((x * ny + y) * nz + z) * channels;
      const o = 4 * (row * w + u);
      if (channels === 3) {
        px[o] = bytes[index]; px[o + 1] = bytes[index + 1]; px[o + 2] = bytes[index + 2]; px[o + 3] = 255;
      } else {
        const q = bytes[index];
        if (q === 0) { px[o] = 0; px[o + 1] = 0; px[o + 2] = 0; px[o + 3] = 255; }
        else {
          const c = 4 * Math.round(((q - 1) * 255) / 254);
          px[o] = lut[c]; px[o + 1] = lut[c + 1]; px[o + 2] = lut[c + 2]; px[o + 3] = 255;
        }
      }
    }
  }
}

export class SliceViewer {
  constructor({ canvas, colourbar, histogram }) {
    this.canvas = canvas;
    this.colourbar = colourbar;
    this.histogram = histogram;
    this.entry = null;
    this.bytes = null;
    this.plane = "axial";
    this.index = 0;
    this.cmap = "viridis";
    this.scratch = document.createElement("canvas");
  }

  /** Show map `entry` (from the summary) whose voxels are `bytes`; `voxelSize` (mm,
   * x, y, z) gives the aspect ratio of the pixels. */
  setMap(entry, bytes, voxelSize = [1, 1, 1]) {
    this.entry = entry;
    this.bytes = bytes;
    this.voxelSize = voxelSize;
  }

  /** Pixel size (mm) of the current plane: [horizontal, vertical]. */
  pixelSize() {
    const [sx, sy, sz] = this.voxelSize || [1, 1, 1];
    if (this.plane === "axial") return [sx, sy];
    if (this.plane === "coronal") return [sx, sz];
    return [sy, sz];
  }

  /** The voxel (x, y, z) under canvas point (px, py) in CSS pixels, and its byte value(s). */
  voxelAt(px, py) {
    const entry = this.entry;
    if (!entry || !this.bytes) return null;
    const [w, h, d] = planeSize(entry.shape, this.plane);
    const rect = this.canvas.getBoundingClientRect();
    const u = Math.floor((px / rect.width) * w);
    const v = h - 1 - Math.floor((py / rect.height) * h);
    if (u < 0 || u >= w || v < 0 || v >= h) return null;
    const k = Math.max(0, Math.min(d - 1, this.index));
    let x, y, z;
    if (this.plane === "axial") { x = u; y = v; z = k; }
    else if (this.plane === "coronal") { x = u; y = k; z = v; }
    else { x = k; y = u; z = v; }
    const [, ny, nz] = entry.shape;
    const channels = entry.kind === "direction" ? 3 : 1;
    const index = ((x * ny + y) * nz + z) * channels;
    return { x, y, z, bytes: Array.from(this.bytes.slice(index, index + channels)) };
  }

  depth() {
    if (!this.entry) return 1;
    return planeSize(this.entry.shape, this.plane)[2];
  }

  render() {
    const entry = this.entry;
    if (!entry || !this.bytes) return;
    const [w, h, d] = planeSize(entry.shape, this.plane);
    const k = Math.max(0, Math.min(d - 1, this.index));
    const lut = lookupTable(this.cmap);
    this.scratch.width = w;
    this.scratch.height = h;
    const sctx = this.scratch.getContext("2d");
    const image = sctx.createImageData(w, h);
    drawSlice(image, this.bytes, entry.shape, this.plane, k, entry.kind, lut);
    sctx.putImageData(image, 0, 0);
    // scale to the canvas's displayed size, keeping the voxel aspect (square voxels)
    const box = this.canvas.parentElement.getBoundingClientRect();
    const room = Math.max(120, Math.min(box.width - 150, 0.5 * window.innerHeight, 560));
    // physical size of the slice (mm), scaled to fit the room
    const [pw, ph] = this.pixelSize();
    const fit = Math.min(room / (w * pw), room / (h * ph));
    const cw = Math.max(1, Math.round(w * pw * fit));
    const ch = Math.max(1, Math.round(h * ph * fit));
    this.canvas.width = cw;
    this.canvas.height = ch;
    const ctx = this.canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(this.scratch, 0, 0, cw, ch);
    this.drawColourbar(ch);
  }

  drawColourbar(height) {
    const { canvas, min, max, units } = this.colourbar;
    const entry = this.entry;
    canvas.height = Math.max(64, height);
    const ctx = canvas.getContext("2d");
    if (entry.kind === "direction") {
      // legend of direction-encoded colour: three bands
      const third = canvas.height / 3;
      [["#ff0000", 0], ["#00ff00", 1], ["#0000ff", 2]].forEach(([c, i]) => {
        ctx.fillStyle = c;
        ctx.fillRect(0, i * third, canvas.width, third);
      });
      min.textContent = "";
      max.textContent = "";
      units.textContent = "red |x|, green |y|, blue |z|";
      return;
    }
    const lut = lookupTable(this.cmap);
    for (let row = 0; row < canvas.height; row++) {
      const c = 4 * Math.round(255 * (1 - row / (canvas.height - 1)));
      ctx.fillStyle = `rgb(${lut[c]},${lut[c + 1]},${lut[c + 2]})`;
      ctx.fillRect(0, row, canvas.width, 1);
    }
    max.textContent = formatValue(entry.max);
    min.textContent = formatValue(entry.min);
    units.textContent = entry.units_text;
  }

  drawHistogram(stats) {
    const canvas = this.histogram;
    const entry = this.entry;
    const ctx = canvas.getContext("2d");
    const box = canvas.parentElement.getBoundingClientRect();
    canvas.width = Math.max(200, Math.min(640, Math.floor(box.width - 32)));
    const W = canvas.width;
    const H = canvas.height;
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, W, H);
    if (!entry || entry.kind !== "scalar" || !entry.histogram) {
      ctx.fillStyle = "#333";
      ctx.font = "14px sans-serif";
      ctx.fillText("No histogram for a direction map.", 10, 24);
      stats.textContent = "";
      return;
    }
    const counts = entry.histogram.counts;
    const top = Math.max(1, ...counts);
    const left = 8, bottom = 22, plotW = W - 16, plotH = H - bottom - 8;
    const bw = plotW / counts.length;
    const lut = lookupTable(this.cmap);
    counts.forEach((n, i) => {
      const barH = (n / top) * plotH;
      const c = 4 * Math.round((255 * (i + 0.5)) / counts.length);
      ctx.fillStyle = `rgb(${lut[c]},${lut[c + 1]},${lut[c + 2]})`;
      ctx.fillRect(left + i * bw, 8 + plotH - barH, Math.max(1, bw - 1), barH);
    });
    ctx.fillStyle = "#222";
    ctx.font = "12px sans-serif";
    ctx.textBaseline = "bottom";
    ctx.fillText(formatValue(entry.min), left, H - 4);
    const maxText = formatValue(entry.max);
    ctx.fillText(maxText, W - 8 - ctx.measureText(maxText).width, H - 4);
    const total = counts.reduce((a, b) => a + b, 0);
    stats.textContent = `${total} voxels · mean ${formatValue(entry.mean)} · median ${formatValue(entry.median)} (${entry.units_text})`;
  }
}
