// The gateway's web page: a client of the public API only (GET v1/model, POST v1/predict).
// Plain ES2020, no framework, nothing fetched from outside the gateway. Design notes: faar_serve/routes/web.py.

const $ = (id) => document.getElementById(id);
const KEY = 'faar-api-key';
// Nine stops of matplotlib's inferno (probabilities) and viridis (depth), interpolated to 256 colours.
const INFERNO = ['000004', '1f0c48', '550f6d', '88226a', 'ba3655', 'e35933', 'f98c0a', 'f9c932', 'fcffa4'];
const VIRIDIS = ['440154', '472d7b', '3b528b', '2c728e', '21918c', '28ae80', '5ec962', 'addc30', 'fde725'];

let manifest = null;
let photoUrl = null;
let overlaySources = {};  // task -> drawable element at the upload's size
let photo = null;
let current = null;  // the answer shown: its size and every map decoded, for the pixel readout
const PROBE_HINT = 'point at any picture to read every map at that pixel';

class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail);
    this.status = status;
    this.code = code;
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// fetch + the API's error convention: a 4xx/5xx JSON body {"error": code, "detail": text}.
async function call(path, init = {}) {
  let response;
  try {
    response = await fetch(path, { ...init, headers: { ...authHeaders(), ...init.headers } });
  } catch (err) {
    throw new ApiError(0, 'network_error', `cannot reach the gateway (${err.message})`);
  }
  if (response.ok) return response.json();
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's error page, say): the status line is all there is
  }
  throw new ApiError(response.status, body?.error ?? response.statusText,
    body?.detail ?? `HTTP ${response.status} ${response.statusText}`);
}

function setState(state, message = '') {
  document.body.dataset.state = state;
  $('status').textContent = message;
  const busy = state === 'busy';
  $('file').disabled = busy || manifest === null;
  $('sample').disabled = busy || manifest === null;
  $('drop').classList.toggle('disabled', busy || manifest === null);
}

function showError(err) {
  const box = $('error');
  const status = err.status ? `${err.status} ${err.code}` : err.code ?? 'error';
  box.replaceChildren(el('strong', {}, status), ` ${err.message}`);
  box.hidden = false;
  setState('error');
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

async function loadModel() {
  setState('busy', 'loading the model manifest…');
  try {
    manifest = await call('v1/model');
  } catch (err) {
    if (err.status === 401) $('key-form').hidden = false;
    $('model').textContent = 'model unknown';
    showError(err);
    return;
  }
  $('key-form').hidden = true;
  $('error').hidden = true;
  const { name, version } = manifest.model;
  const [h, w] = manifest.input_size;
  const tasks = Object.keys(manifest.tasks);
  $('model').textContent = `model ${name} v${version} · ${w}×${h} input · ${tasks.length} tasks: ${tasks.join(', ')}`;
  setState('idle');
}

async function predict(file) {
  $('error').hidden = true;
  $('results').hidden = true;
  setState('busy', `running ${file.name} (${(file.size / 1024).toFixed(1)} KiB)…`);
  const form = new FormData();
  form.append('image', file, file.name);
  const t0 = performance.now();
  try {
    const answer = await call('v1/predict', { method: 'POST', body: form });
    const roundTrip = performance.now() - t0;
    await show(file, answer, roundTrip);
    setState('done', `${file.name}: ${answer.width}×${answer.height} px`);
  } catch (err) {
    if (err.status === 401) $('key-form').hidden = false;
    showError(err);
  }
}

async function loadImage(src) {
  const img = new Image();
  img.src = src;
  try {
    await img.decode();
    return img;
  } catch {
    return null;  // a format the browser cannot show (TIFF): the maps still come
  }
}

async function show(file, answer, roundTrip) {
  if (photoUrl) URL.revokeObjectURL(photoUrl);
  photoUrl = URL.createObjectURL(file);
  photo = await loadImage(photoUrl);
  const { width, height } = answer;
  overlaySources = {};
  const tiles = [tile('photo', 'Photo', `${file.name}, ${width}×${height}`,
    photo ?? el('p', { className: 'muted' }, 'this browser cannot display the file; the maps below are fine'))];
  const overlay = el('canvas', { id: 'overlay', width, height });
  tiles.push(tile('overlay', 'Overlay', 'a map over the photo', overlay));
  const maps = {};
  for (const [name, map] of Object.entries(answer.tasks)) {
    maps[name] = { map, png: await decodePng(map.png) };
    const { element, key } = await renderMap(map, maps[name].png);
    element.classList.add('map');
    element.dataset.task = name;
    overlaySources[name] = element;
    tiles.push(tile(name, name, map.description, element, key));
  }
  current = { width, height, maps };
  $('tiles').replaceChildren(...tiles);
  $('probe').textContent = PROBE_HINT;
  fillOverlayChoices(answer);
  drawOverlay();
  $('timings').textContent = timings(answer.timings_ms, roundTrip);
  $('call').textContent = describeCall(file, answer);
  $('results').hidden = false;
}

function tile(name, title, subtitle, content, key = null) {
  const node = el('figure', { className: 'tile' },
    el('figcaption', {}, el('strong', {}, title), el('span', { className: 'muted' }, subtitle)), content);
  node.dataset.tile = name;
  if (key) node.append(key);
  return node;
}

// The element showing a decoded map, and its key: palette and RGB PNGs as they are, grey ones coloured.
async function renderMap(map, png) {
  if (map.kind === 'labels') return { element: await pngImage(map.png), key: legend(map) };
  if (map.kind === 'normals') {
    return { element: await pngImage(map.png), key: el('p', { className: 'key muted' },
      `R, G, B = x, y, z; ${map.convention.split('; ').pop()}`) };
  }
  const values = Float32Array.from(png.values, (v) => v * map.scale);
  if (map.kind === 'depth') {
    const [lo, hi] = [map.min, map.max];
    const span = hi > lo ? hi - lo : 1;
    // near is bright: reversed viridis
    const canvas = colourise(png.width, png.height, values, (v) => 1 - (v - lo) / span, VIRIDIS);
    const ticks = [lo, (lo + hi) / 2, hi].map((v) => `${v.toFixed(2)} ${map.units}`);
    return { element: canvas, key: colourBar(VIRIDIS, true, ticks, `depth in ${map.units === 'm' ? 'metres' : map.units}`) };
  }
  const [lo, hi] = map.range ?? [0, 1];
  const canvas = colourise(png.width, png.height, values, (v) => (v - lo) / (hi - lo), INFERNO);
  return { element: canvas, key: colourBar(INFERNO, false, [lo, (lo + hi) / 2, hi].map(String), 'probability') };
}

async function pngImage(base64) {
  const img = new Image();
  img.src = `data:image/png;base64,${base64}`;
  await img.decode();
  return img;
}

function legend(map) {
  const present = new Set(map.classes_present ?? map.classes);
  const items = map.classes.map((name, i) => {
    const swatch = el('span', { className: 'swatch' });
    swatch.style.background = `rgb(${map.palette[i].join(',')})`;
    return el('li', { className: present.has(name) ? '' : 'absent', title: present.has(name) ? '' : 'not in this image' },
      swatch, el('span', { className: 'name' }, name));
  });
  return el('ul', { className: 'key legend' }, ...items);
}

function lut(stops) {
  const rgb = stops.map((h) => [0, 2, 4].map((i) => parseInt(h.slice(i, i + 2), 16)));
  return Array.from({ length: 256 }, (_, k) => {
    const x = (k / 255) * (rgb.length - 1);
    const i = Math.min(Math.floor(x), rgb.length - 2);
    const f = x - i;
    return rgb[i].map((c, j) => Math.round(c + (rgb[i + 1][j] - c) * f));
  });
}

function colourise(width, height, values, position, stops) {
  const colours = lut(stops);
  const canvas = el('canvas', { width, height });
  const ctx = canvas.getContext('2d');
  const image = ctx.createImageData(width, height);
  for (let i = 0; i < values.length; i++) {
    const k = Math.round(Math.min(1, Math.max(0, position(values[i]))) * 255);
    image.data.set(colours[k], i * 4);
    image.data[i * 4 + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  return canvas;
}

function colourBar(stops, reversed, ticks, label) {
  const colours = lut(stops);
  const ramp = el('canvas', { className: 'ramp', width: 256, height: 1 });
  const ctx = ramp.getContext('2d');
  const image = ctx.createImageData(256, 1);
  colours.forEach((c, k) => image.data.set([...(reversed ? colours[255 - k] : c), 255], k * 4));
  ctx.putImageData(image, 0, 0);
  return el('div', { className: 'key colourbar' }, ramp,
    el('div', { className: 'ticks' }, ...ticks.map((t) => el('span', {}, t))), el('div', { className: 'muted' }, label));
}

// A PNG decoder for the maps as codec.py writes them (grey 8/16-bit, RGB, palette at 1-8 bits; never
// interlaced): a canvas reads 16-bit depth as 8 bits and palette maps as colours, not class indices.
async function decodePng(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  const idat = [];
  let width = 0, height = 0, depth = 0, colour = -1, interlace = 0;
  for (let pos = 8; pos < bytes.length;) {
    const length = view.getUint32(pos);
    const type = String.fromCharCode(...bytes.subarray(pos + 4, pos + 8));
    if (type === 'IHDR') {
      [width, height] = [view.getUint32(pos + 8), view.getUint32(pos + 12)];
      [depth, colour, interlace] = [bytes[pos + 16], bytes[pos + 17], bytes[pos + 20]];
    } else if (type === 'IDAT') {
      idat.push(bytes.subarray(pos + 8, pos + 8 + length));
    } else if (type === 'IEND') {
      break;
    }
    pos += 12 + length;
  }
  const channels = { 0: 1, 2: 3, 3: 1 }[colour];
  if (!channels || interlace !== 0) {
    throw new ApiError(0, 'unexpected_png', `cannot read a PNG of colour type ${colour}, interlace ${interlace}`);
  }
  const inflated = new Blob(idat).stream().pipeThrough(new DecompressionStream('deflate'));
  const raw = new Uint8Array(await new Response(inflated).arrayBuffer());
  const bpp = Math.max(1, (channels * depth) >> 3);  // filters work on whole bytes
  const stride = Math.ceil((width * channels * depth) / 8);
  const pixels = new Uint8Array(height * stride);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)];
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    const out = pixels.subarray(y * stride, (y + 1) * stride);
    const up = y > 0 ? pixels.subarray((y - 1) * stride, y * stride) : new Uint8Array(stride);
    for (let x = 0; x < stride; x++) {
      const a = x >= bpp ? out[x - bpp] : 0;
      const b = up[x];
      const c = x >= bpp ? up[x - bpp] : 0;
      let predictor = 0;
      if (filter === 1) predictor = a;
      else if (filter === 2) predictor = b;
      else if (filter === 3) predictor = (a + b) >> 1;
      else if (filter === 4) {
        const p = a + b - c;
        const [pa, pb, pc] = [Math.abs(p - a), Math.abs(p - b), Math.abs(p - c)];
        predictor = pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
      }
      out[x] = (line[x] + predictor) & 0xff;
    }
  }
  const count = width * height * channels;
  let values = pixels;
  if (depth === 16) {
    values = new Uint16Array(count);
    for (let i = 0; i < count; i++) values[i] = (pixels[2 * i] << 8) | pixels[2 * i + 1];  // big-endian
  } else if (depth < 8) {
    values = new Uint8Array(count);
    const mask = (1 << depth) - 1;
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        const bit = x * depth;
        values[y * width + x] = (pixels[y * stride + (bit >> 3)] >> (8 - depth - (bit & 7))) & mask;
      }
    }
  }
  return { width, height, channels, values };
}

// What each map says at pixel i, in its own terms (the API's documented pixel encodings).
function reading(map, png, i) {
  const v = png.values;
  if (map.kind === 'labels') return map.classes[v[i]] ?? `class ${v[i]}`;
  if (map.kind === 'normals') return `(${[0, 1, 2].map((c) => ((v[3 * i + c] / 255) * 2 - 1).toFixed(2)).join(', ')})`;
  if (map.kind === 'depth') return `${(v[i] * map.scale).toFixed(3)} ${map.units}`;
  return (v[i] * map.scale).toFixed(3);
}

function probe(event) {
  const target = event.target;
  const picture = target === photo || target.id === 'overlay' || target.classList.contains('map');
  if (!current || !picture) return;  // not a colour bar
  const { width, height, maps } = current;
  const box = target.getBoundingClientRect();
  const x = Math.min(width - 1, Math.max(0, Math.floor(((event.clientX - box.left) / box.width) * width)));
  const y = Math.min(height - 1, Math.max(0, Math.floor(((event.clientY - box.top) / box.height) * height)));
  const parts = Object.entries(maps).map(([name, { map, png }]) => `${name} ${reading(map, png, y * width + x)}`);
  $('probe').textContent = `at (${x}, ${y}): ${parts.join(' · ')}`;
}

function fillOverlayChoices(answer) {
  const select = $('overlay-task');
  const previous = select.value;
  const names = Object.keys(answer.tasks);
  select.replaceChildren(...names.map((n) => el('option', { value: n }, n)));
  const firstLabels = names.find((n) => answer.tasks[n].kind === 'labels');
  select.value = names.includes(previous) ? previous : firstLabels ?? names[0];
}

function drawOverlay() {
  const canvas = $('overlay');
  if (!canvas) return;
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = 1;
  if (photo) ctx.drawImage(photo, 0, 0, canvas.width, canvas.height);
  const source = overlaySources[$('overlay-task').value];
  if (source) {
    ctx.globalAlpha = $('opacity').value / 100;
    ctx.drawImage(source, 0, 0, canvas.width, canvas.height);
  }
}

function timings(stages, roundTrip) {
  const ms = (v) => `${v < 10 ? v.toFixed(1) : Math.round(v)} ms`;
  const parts = Object.entries(stages).map(([k, v]) => `${k} ${ms(v)}`);
  parts.push(`server total ${ms(Object.values(stages).reduce((s, v) => s + v, 0))}`);
  return `${parts.join(' · ')} · round trip ${ms(roundTrip)} (browser)`;
}

function describeCall(file, answer) {
  const url = new URL('v1/predict', document.baseURI).href;
  const auth = sessionStorage.getItem(KEY) ? " -H 'Authorization: Bearer $FAAR_API_KEY'" : '';
  const shown = JSON.stringify(answer,
    (k, v) => (k === 'png' ? `${v.slice(0, 16)}… (${v.length} base64 characters)` : v), 2);
  return `curl -s${auth} -F 'image=@${file.name}' '${url}'\n\n${shown}`;
}

function pick(files) {
  if (files && files.length && document.body.dataset.state !== 'busy' && manifest) predict(files[0]);
}

function wire() {
  $('file').addEventListener('change', (e) => {
    pick(e.target.files);
    e.target.value = '';  // the same file again fires change again
  });
  const drop = $('drop');
  drop.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' || e.key === ' ') {
      e.preventDefault();
      $('file').click();
    }
  });
  for (const type of ['dragenter', 'dragover']) {
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      drop.classList.add('over');
    });
  }
  for (const type of ['dragleave', 'drop']) drop.addEventListener(type, () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    pick(e.dataTransfer.files);
  });
  $('sample').addEventListener('click', async () => {
    try {
      const response = await fetch('static/sample.png');
      if (!response.ok) throw new ApiError(response.status, 'sample_missing', 'the sample image is not there');
      pick([new File([await response.blob()], 'sample.png', { type: 'image/png' })]);
    } catch (err) {
      showError(err instanceof ApiError ? err : new ApiError(0, 'network_error', err.message));
    }
  });
  $('tiles').addEventListener('mousemove', probe);
  $('tiles').addEventListener('mouseleave', () => { $('probe').textContent = PROBE_HINT; });
  $('overlay-task').addEventListener('change', drawOverlay);
  $('opacity').addEventListener('input', drawOverlay);
  $('key-form').addEventListener('submit', (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $('key').value.trim());
    loadModel();
  });
}

wire();
loadModel();
