// Checks run in the page before an upload: file kinds, bval/bvec counts, NIfTI headers.
// Every message names the file it is about (the name is shown as text, never as HTML).

const NIFTI = /\.nii(\.gz)?$/i;

export function isNifti(name) {
  return NIFTI.test(name);
}

/** Sort dropped files into the form's fields by their names. */
export function sortDropped(files) {
  const out = {};
  const unknown = [];
  for (const file of files) {
    const name = file.name.toLowerCase();
    if (name.endsWith(".bval") || name.endsWith(".bvals")) out.bval = file;
    else if (name.endsWith(".bvec") || name.endsWith(".bvecs")) out.bvec = file;
    else if (isNifti(name) && name.includes("mask")) out.mask = file;
    else if (isNifti(name)) out.dwi = file;
    else unknown.push(file);
  }
  return { sorted: out, unknown };
}

function numbers(text) {
  const parts = text.trim().split(/\s+/).filter((t) => t.length);
  return parts.map(Number);
}

/** Parse a bval file: { values } or { error }. */
export async function readBval(file) {
  if (file.size > 1_000_000) return { error: `${file.name} is ${file.size} bytes: too large for a b-value file.` };
  const text = await file.text();
  const values = numbers(text);
  if (!values.length) return { error: `${file.name} is empty: expected one b-value per volume (s/mm²).` };
  if (values.some((v) => !Number.isFinite(v))) return { error: `${file.name} is not a b-value file: it holds text that is not a number.` };
  if (values.some((v) => v < 0)) return { error: `${file.name} has negative b-values.` };
  const max = Math.max(...values);
  if (max > 0 && max < 100) return { error: `${file.name}: the largest b-value is ${max}; b-values are expected in s/mm² (e.g. 1000), not ms/µm².` };
  if (max > 1e5) return { error: `${file.name}: the largest b-value is ${max}; b-values are expected in s/mm² (e.g. 1000), not s/m².` };
  return { values };
}

/** Parse a bvec file (3 rows of N, or N rows of 3): { count } or { error }. */
export async function readBvec(file) {
  if (file.size > 3_000_000) return { error: `${file.name} is ${file.size} bytes: too large for a b-vector file.` };
  const text = await file.text();
  const rows = text.trim().split(/\r?\n/).map((line) => numbers(line)).filter((r) => r.length);
  if (!rows.length) return { error: `${file.name} is empty: expected 3 rows of gradient directions.` };
  if (rows.flat().some((v) => !Number.isFinite(v))) return { error: `${file.name} is not a b-vector file: it holds text that is not a number.` };
  if (rows.length === 3 && rows.every((r) => r.length === rows[0].length)) return { count: rows[0].length };
  if (rows.every((r) => r.length === 3)) return { count: rows.length };
  return { error: `${file.name} does not have 3 rows of equal length (x, y and z of each direction).` };
}

async function headBytes(file, n) {
  const head = file.slice(0, Math.min(file.size, 65536));
  const buffer = await head.arrayBuffer();
  const bytes = new Uint8Array(buffer);
  const gzipped = bytes.length >= 2 && bytes[0] === 0x1f && bytes[1] === 0x8b;
  if (!gzipped && /\.gz$/i.test(file.name)) return { notGzip: true };
  if (gzipped) {
    if (typeof DecompressionStream === "undefined") return null;
    // decompress only the start of the file
    const stream = file.stream().pipeThrough(new DecompressionStream("gzip"));
    const reader = stream.getReader();
    const chunks = [];
    let total = 0;
    try {
      while (total < n) {
        const { value, done } = await reader.read();
        if (done) break;
        chunks.push(value);
        total += value.length;
      }
    } catch (_) {
      return { corrupt: true };
    } finally {
      reader.cancel().catch(() => {});
    }
    const out = new Uint8Array(total);
    let at = 0;
    for (const c of chunks) { out.set(c, at); at += c.length; }
    return out.slice(0, n);
  }
  return bytes.slice(0, n);
}

/** The dimensions in a NIfTI-1 or NIfTI-2 header: { dims } or { error }. */
export async function readNiftiHeader(file) {
  const bytes = await headBytes(file, 544);
  if (bytes === null) return { dims: null };
  if (bytes.notGzip) return { error: `${file.name} ends in .gz but is not gzip-compressed: is it a NIfTI image?` };
  if (bytes.corrupt) return { error: `${file.name} is not a valid gzip file (damaged or truncated).` };
  if (bytes.length < 348) return { error: `${file.name} is too short to be a NIfTI image.` };
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (const little of [true, false]) {
    const size = view.getInt32(0, little);
    if (size === 348) {
      const n = view.getInt16(40, little);
      const dims = [];
      for (let i = 1; i <= Math.min(Math.max(n, 0), 7); i++) dims.push(view.getInt16(40 + 2 * i, little));
      return { dims };
    }
    if (size === 540 && bytes.length >= 544) {
      const n = Number(view.getBigInt64(16, little));
      const dims = [];
      for (let i = 1; i <= Math.min(Math.max(n, 0), 7); i++) dims.push(Number(view.getBigInt64(16 + 8 * i, little)));
      return { dims };
    }
  }
  return { error: `${file.name} is not a NIfTI image (its header does not start like one).` };
}

/** Every check on the chosen files: a list of { level: "error"|"ok", text }. */
export async function checkInputs(files, { needsTiming = false, timing = {} } = {}) {
  const out = [];
  const error = (text) => out.push({ level: "error", text });
  const ok = (text) => out.push({ level: "ok", text });
  for (const [field, what] of [["dwi", "a DWI (4-D NIfTI)"], ["bval", "a b-value file"], ["bvec", "a b-vector file"]]) {
    if (!files[field]) error(`Choose ${what}.`);
  }
  let volumes = null;
  let spatial = null;
  if (files.dwi) {
    if (!isNifti(files.dwi.name)) {
      error(`${files.dwi.name} is not a NIfTI file: the DWI must end in .nii or .nii.gz.`);
    } else {
      const head = await readNiftiHeader(files.dwi);
      if (head.error) error(head.error);
      else if (head.dims) {
        if (head.dims.length < 4 || head.dims[3] < 2) error(`${files.dwi.name} is not 4-D: a DWI has one volume per measurement (dimensions ${head.dims.join(" × ")}).`);
        else { volumes = head.dims[3]; spatial = head.dims.slice(0, 3); ok(`${files.dwi.name}: ${spatial.join(" × ")} voxels, ${volumes} volumes.`); }
      }
    }
  }
  let nb = null;
  if (files.bval) {
    const b = await readBval(files.bval);
    if (b.error) error(b.error); else nb = b.values.length;
  }
  let nv = null;
  if (files.bvec) {
    const v = await readBvec(files.bvec);
    if (v.error) error(v.error); else nv = v.count;
  }
  if (nb !== null && nv !== null && nb !== nv) error(`${files.bval.name} has ${nb} b-values but ${files.bvec.name} has ${nv} directions: they must agree.`);
  if (nb !== null && volumes !== null && nb !== volumes) error(`${files.bval.name} has ${nb} b-values but ${files.dwi.name} has ${volumes} volumes: they must agree.`);
  if (nb !== null && nv !== null && nb === nv) ok(`${files.bval.name} and ${files.bvec.name}: ${nb} measurements.`);
  if (files.mask) {
    if (!isNifti(files.mask.name)) error(`${files.mask.name} is not a NIfTI file: the mask must end in .nii or .nii.gz.`);
    else {
      const head = await readNiftiHeader(files.mask);
      if (head.error) error(head.error);
      else if (head.dims && spatial) {
        const dims = head.dims.slice(0, 3);
        const extra = head.dims.slice(3).some((d) => d > 1);
        if (extra || dims.join() !== spatial.join()) error(`${files.mask.name} is ${head.dims.join(" × ")} but ${files.dwi.name} has ${spatial.join(" × ")} voxels: the mask must be 3-D on the same grid.`);
      }
    }
  }
  if (needsTiming) {
    for (const [name, label] of [["delta", "δ (pulse duration)"], ["Delta", "Δ (pulse separation)"]]) {
      const value = Number(timing[name]);
      if (!timing[name]) error(`This model needs ${label} in seconds.`);
      else if (!(value > 0 && value < 1)) error(`${label} must be in seconds (e.g. 0.02), got ${timing[name]}.`);
    }
  }
  return out;
}
