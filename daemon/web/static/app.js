// vigild's web console: plain JavaScript, no library, no inline script (the console's CSP forbids it).
// Pages (by the URL's hash): #/ cameras grid, #/camera/<name>, #/events, #/editor/<name>. docs/web.md.
"use strict";

const API = "/api/v1";
const BOX = "#00ff00";
const ZONE = "rgba(255, 200, 0, 0.9)";
const LINE = "rgba(0, 200, 255, 0.95)";
let cleanup = [];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(API + path, { credentials: "same-origin", ...options });
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok && response.status !== 422) throw new Error(body?.message || response.statusText);
  return { status: response.status, body };
}

// ----- live pictures: one WebSocket per view; each message is [4-byte header length][JSON header][JPEG]

function pointsInPixels(shape, width, height) {
  const scale = shape.normalized ? [width, height] : [1, 1];
  return shape.points.map(([x, y]) => [x * scale[0], y * scale[1]]);
}

function drawGeometry(ctx, geometry, width, height, k) {
  ctx.lineWidth = 2;
  for (const [name, zone] of Object.entries(geometry.zones || {})) {
    const points = pointsInPixels(zone, width, height);
    ctx.strokeStyle = ZONE;
    ctx.beginPath();
    points.forEach(([x, y], i) => (i ? ctx.lineTo(x * k, y * k) : ctx.moveTo(x * k, y * k)));
    ctx.closePath();
    ctx.stroke();
    ctx.fillStyle = ZONE;
    ctx.fillText(name, points[0][0] * k + 4, points[0][1] * k + 14);
  }
  for (const [name, line] of Object.entries(geometry.lines || {})) {
    const [[x1, y1], [x2, y2]] = pointsInPixels(line, width, height);
    ctx.strokeStyle = LINE;
    ctx.beginPath();
    ctx.moveTo(x1 * k, y1 * k);
    ctx.lineTo(x2 * k, y2 * k);
    ctx.stroke();
    ctx.fillStyle = LINE;
    ctx.fillText(name, x2 * k + 4, y2 * k);
  }
}

function live(canvas, camera, geometry) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  let socket = null;
  let closed = false;
  const connect = () => {
    socket = new WebSocket(`${scheme}://${location.host}${API}/cameras/${encodeURIComponent(camera)}/live`);
    socket.binaryType = "arraybuffer";
    socket.onmessage = async (message) => {
      const data = message.data;
      const length = new DataView(data).getUint32(0);
      const header = JSON.parse(new TextDecoder().decode(new Uint8Array(data, 4, length)));
      const bitmap = await createImageBitmap(new Blob([new Uint8Array(data, 4 + length)], { type: "image/jpeg" }));
      if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
        canvas.width = bitmap.width;
        canvas.height = bitmap.height;
      }
      const ctx = canvas.getContext("2d");
      ctx.drawImage(bitmap, 0, 0);
      bitmap.close();
      const k = header.scale;
      ctx.font = "13px sans-serif";
      drawGeometry(ctx, geometry, header.width, header.height, k);
      ctx.lineWidth = 2;
      for (const [x1, y1, x2, y2, track, label, confidence] of header.boxes) {
        ctx.strokeStyle = BOX;
        ctx.strokeRect(x1 * k, y1 * k, (x2 - x1) * k, (y2 - y1) * k);
        ctx.fillStyle = BOX;
        ctx.fillText(`${track >= 0 ? "#" + track + " " : ""}${label} ${confidence.toFixed(2)}`, x1 * k, y1 * k - 3);
      }
      canvas.dataset.frame = header.frame;
      canvas.dataset.boxes = JSON.stringify(header.boxes);
      canvas.dataset.scale = header.scale;
    };
    socket.onclose = () => {
      if (!closed) setTimeout(connect, 1000);
    };
  };
  connect();
  cleanup.push(() => {
    closed = true;
    socket?.close();
  });
}

// ----- pages

async function camerasPage(main) {
  const grid = el("div", { class: "grid", id: "grid" });
  main.append(grid);
  const tiles = {};
  const refresh = async () => {
    const { body } = await api("/cameras");
    for (const camera of body.cameras) {
      let tile = tiles[camera.name];
      if (!tile) {
        const canvas = el("canvas", { class: "live", "data-camera": camera.name });
        tile = tiles[camera.name] = {
          state: el("span"),
          meta: el("div", { class: "meta" }),
          error: el("div", { class: "error" }),
        };
        grid.append(el("section", { class: "tile", "data-camera": camera.name },
          el("h2", {}, el("a", { href: `#/camera/${encodeURIComponent(camera.name)}`, text: camera.name }), tile.state),
          canvas, tile.meta, tile.error,
          el("a", { href: `#/editor/${encodeURIComponent(camera.name)}`, text: "Edit zones and lines" })));
        live(canvas, camera.name, camera);
      }
      tile.state.textContent = camera.state || "?";
      tile.state.className = `state state-${camera.state}`;
      tile.meta.textContent = `${(camera.fps ?? 0).toFixed(1)} frames/s · ${camera.frames ?? 0} frames · ${camera.drops ?? 0} dropped`;
      tile.error.textContent = camera.last_error || "";
    }
  };
  await refresh();
  const timer = setInterval(refresh, 2000);
  cleanup.push(() => clearInterval(timer));
}

function describe(event) {
  const parts = [];
  if (event.object) parts.push(`#${event.object.track_id} ${event.object.label}`);
  for (const key of ["zone", "line", "direction", "reason", "total", "action"]) {
    if (event[key] !== undefined) parts.push(`${key} ${typeof event[key] === "object" ? JSON.stringify(event[key]) : event[key]}`);
  }
  return parts.join(" · ");
}

function clipOf(event) {
  // the clip an event started or extended, or a clip event's own clip (docs/recording.md)
  if (event.clip && event.clip.state === "saved") return { id: event.clip.id, codec: event.clip.codec };
  if (event.type === "clip.saved" && event.clip_id) return { id: event.clip_id, codec: event.codec };
  return null;
}

function clipPlayer(clip) {
  const video = el("video", { id: "clip", controls: "", muted: "", playsinline: "", preload: "metadata",
    src: `${API}/clips/${clip.id}.mp4` });
  video.muted = true;
  const parts = [video, el("a", { href: `${API}/clips/${clip.id}.mp4`, download: `${clip.id}.mp4`, text: "Download the clip" })];
  // Chromium (and so the console in most browsers) plays H.264; an H.265 clip is offered for download
  if (clip.codec === "h265") parts.unshift(el("p", { class: "error", text: "H.265 clip: your browser may not play it; download it instead." }));
  return el("div", { class: "clip" }, ...parts);
}

function eventRow(event, viewer) {
  const clip = clipOf(event);
  const row = el("tr", { "data-seq": event.seq },
    el("td", { text: event.ts }), el("td", { text: event.camera }), el("td", { text: event.type }),
    el("td", { text: describe(event) }), el("td", {}, event.snapshot ? el("img", {
      class: "thumb", loading: "lazy", alt: "snapshot", src: `${API}/events/${event.seq}/snapshot.jpg` }) : ""),
    el("td", { class: "has-clip", text: clip ? "▶" : "" }));
  if (event.snapshot || clip) {
    row.classList.add(event.snapshot ? "has-snapshot" : "has-clip");
    row.addEventListener("click", () => {
      viewer.replaceChildren(
        el("p", { text: `${event.camera} · ${event.type} · ${event.ts}` }),
        event.snapshot ? el("img", { id: "snapshot", alt: "snapshot", src: `${API}/events/${event.seq}/snapshot.jpg` }) : "",
        clip ? clipPlayer(clip) : "");
    });
  }
  return row;
}

async function eventsPage(main, fixed = {}) {
  const form = el("form", { class: "filters", id: "filters" });
  const fields = {};
  const { body } = await api("/cameras");
  const cameraSelect = el("select", { name: "camera" }, el("option", { value: "", text: "all cameras" }),
    ...body.cameras.map((c) => el("option", { value: c.name, text: c.name })));
  fields.camera = cameraSelect;
  for (const [name, hint] of [["type", "type (prefix: zone.)"], ["label", "label"], ["since", "since (2h, ISO)"], ["until", "until"]]) {
    fields[name] = el("input", { name, placeholder: hint, size: 14 });
  }
  if (!fixed.camera) form.append(cameraSelect);
  for (const name of ["type", "label", "since", "until"]) form.append(fields[name]);
  form.append(el("button", { type: "submit", text: "Show" }));
  const table = el("table", { id: "events" }, el("thead", {}, el("tr", {},
    ...["time", "camera", "type", "what", "snapshot", "clip"].map((h) => el("th", { text: h })))));
  const rows = el("tbody");
  table.append(rows);
  const more = el("button", { id: "older", text: "Older events" });
  const status = el("p", { class: "meta" });
  const viewer = el("div", { id: "viewer" });
  main.append(form, el("div", { class: "editor" }, el("div", {}, table, more, status), viewer));
  let before = null;
  const load = async (append) => {
    const params = new URLSearchParams({ limit: fixed.limit || 50 });
    for (const [name, input] of Object.entries(fields)) if (input.value) params.set(name, input.value);
    if (fixed.camera) params.set("camera", fixed.camera);
    if (append && before !== null) params.set("before", before);
    try {
      const { body } = await api(`/events?${params}`);
      if (!append) rows.replaceChildren();
      for (const event of body.events) rows.append(eventRow(event, viewer));
      before = body.next_before;
      more.disabled = before === null;
      status.textContent = rows.children.length ? "" : "no events for this filter";
    } catch (error) {
      status.textContent = error.message;
    }
  };
  form.addEventListener("submit", (e) => { e.preventDefault(); load(false); });
  more.addEventListener("click", () => load(true));
  await load(false);
}

async function cameraPage(main, name) {
  const { body } = await api("/cameras");
  const camera = body.cameras.find((c) => c.name === name);
  if (!camera) { main.append(el("p", { class: "error", text: `no camera ${name}` })); return; }
  const canvas = el("canvas", { class: "live", "data-camera": name });
  main.append(el("h2", { text: name }), el("div", { class: "big" }, canvas),
    el("p", {}, el("a", { href: `#/editor/${encodeURIComponent(name)}`, text: "Edit zones and lines" })),
    el("h3", { text: "Recent events" }));
  live(canvas, name, camera);
  const events = el("div");
  main.append(events);
  await eventsPage(events, { camera: name, limit: 20 });
}

// ----- editor: zones (click points, click the first to close) and directed lines (drag, or two clicks)

async function editorPage(main, name) {
  const { body: geometry } = await api(`/cameras/${encodeURIComponent(name)}/geometry`);
  const image = new Image();
  image.src = `${API}/cameras/${encodeURIComponent(name)}/snapshot.jpg?t=${Date.now()}`;
  try { await image.decode(); } catch { main.append(el("p", { class: "error", text: "no picture of this camera yet: is it streaming?" })); return; }
  const width = image.naturalWidth, height = image.naturalHeight;
  const shapes = { zones: {}, lines: {} };
  const original = { zones: geometry.zones, lines: geometry.lines };
  for (const kind of ["zones", "lines"]) {
    for (const [key, value] of Object.entries(geometry[kind])) shapes[kind][key] = { points: pointsInPixels(value, width, height), changed: false };
  }
  const canvas = el("canvas", { id: "editor-canvas", width, height });
  const list = el("ul", { id: "shapes" });
  const nameInput = el("input", { id: "shape-name", placeholder: "name", size: 16 });
  const errors = el("ul", { id: "errors" });
  const saved = el("p", { id: "saved" });
  let tool = "line", draft = [], selected = null, dragging = null, pressed = null;
  const toolButtons = {
    line: el("button", { id: "tool-line", text: "Draw a line" }),
    zone: el("button", { id: "tool-zone", text: "Draw a zone" }),
    move: el("button", { id: "tool-move", text: "Move points" }),
  };
  const hint = el("p", { class: "meta" });
  const setTool = (t) => {
    tool = t; draft = [];
    hint.textContent = { line: "Drag from the line's start to its end ('in' is to the right of the arrow).",
      zone: "Click the corners; click the first corner again to close.", move: "Drag a point." }[t];
    redraw();
  };
  for (const [t, b] of Object.entries(toolButtons)) b.addEventListener("click", () => setTool(t));
  const remove = el("button", { id: "delete-shape", text: "Delete selected" });
  const save = el("button", { id: "save", text: "Save" });
  main.append(el("h2", { text: `Zones and lines of ${name}` }), el("div", { class: "editor" }, canvas,
    el("div", { class: "tools" }, el("div", {}, ...Object.values(toolButtons)), hint,
      el("label", { text: "Name " }, nameInput), list, remove, save, errors, saved)));

  const ctx = canvas.getContext("2d");
  const fresh = (kind) => { let i = 1; while (shapes[kind][`${kind.slice(0, -1)}${i}`]) i++; return `${kind.slice(0, -1)}${i}`; };
  function redraw() {
    ctx.drawImage(image, 0, 0);
    ctx.lineWidth = 3;
    ctx.font = "16px sans-serif";
    for (const [key, shape] of Object.entries(shapes.zones)) {
      ctx.strokeStyle = selected === `zones.${key}` ? "#ff6" : ZONE;
      ctx.beginPath();
      shape.points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.closePath(); ctx.stroke();
      ctx.fillStyle = ctx.strokeStyle; ctx.fillText(key, shape.points[0][0] + 4, shape.points[0][1] + 16);
    }
    for (const [key, shape] of Object.entries(shapes.lines)) {
      const [[x1, y1], [x2, y2]] = shape.points;
      ctx.strokeStyle = selected === `lines.${key}` ? "#ff6" : LINE;
      ctx.beginPath(); ctx.moveTo(x1, y1); ctx.lineTo(x2, y2); ctx.stroke();
      const a = Math.atan2(y2 - y1, x2 - x1);
      ctx.beginPath(); ctx.moveTo(x2, y2);
      ctx.lineTo(x2 - 14 * Math.cos(a - 0.4), y2 - 14 * Math.sin(a - 0.4));
      ctx.moveTo(x2, y2); ctx.lineTo(x2 - 14 * Math.cos(a + 0.4), y2 - 14 * Math.sin(a + 0.4)); ctx.stroke();
      ctx.fillStyle = ctx.strokeStyle; ctx.fillText(key, x2 + 6, y2);
    }
    ctx.strokeStyle = "#f0f";
    ctx.beginPath();
    draft.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    ctx.stroke();
    list.replaceChildren(...["zones", "lines"].flatMap((kind) => Object.keys(shapes[kind]).map((key) => {
      const item = el("li", { text: `${kind.slice(0, -1)} ${key}`, "data-key": `${kind}.${key}` });
      if (selected === `${kind}.${key}`) item.classList.add("selected");
      item.addEventListener("click", () => { selected = `${kind}.${key}`; nameInput.value = key; redraw(); });
      return item;
    })));
  }
  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    return [Math.round((e.clientX - r.left) * width / r.width), Math.round((e.clientY - r.top) * height / r.height)];
  };
  const near = (p, q) => Math.hypot(p[0] - q[0], p[1] - q[1]) < 12 * width / canvas.getBoundingClientRect().width;
  const add = (kind, points) => {
    const key = nameInput.value.trim() && !shapes[kind][nameInput.value.trim()] ? nameInput.value.trim() : fresh(kind);
    shapes[kind][key] = { points, changed: true };
    selected = `${kind}.${key}`; nameInput.value = key; draft = [];
  };
  canvas.addEventListener("mousedown", (e) => {
    const p = at(e);
    pressed = p;
    if (tool === "move") {
      for (const kind of ["zones", "lines"]) for (const [key, shape] of Object.entries(shapes[kind])) {
        shape.points.forEach((q, i) => { if (!dragging && near(p, q)) dragging = { shape, i }; selected = dragging ? `${kind}.${key}` : selected; });
      }
    } else if (tool === "line" && draft.length === 0) {
      draft = [p];
    }
  });
  canvas.addEventListener("mousemove", (e) => {
    if (dragging) { dragging.shape.points[dragging.i] = at(e); dragging.shape.changed = true; redraw(); }
    else if (tool === "line" && draft.length === 1 && pressed) { redraw(); ctx.strokeStyle = "#f0f"; ctx.beginPath(); ctx.moveTo(...draft[0]); ctx.lineTo(...at(e)); ctx.stroke(); }
  });
  canvas.addEventListener("mouseup", (e) => {
    const p = at(e);
    if (dragging) { dragging = null; pressed = null; redraw(); return; }
    if (tool === "line") {
      if (draft.length === 1 && !near(draft[0], p)) add("lines", [draft[0], p]);  // a drag, or a second click
    } else if (tool === "zone") {
      if (draft.length >= 3 && near(draft[0], p)) add("zones", draft);
      else draft.push(p);
    }
    pressed = null;
    redraw();
  });
  nameInput.addEventListener("change", () => {
    if (!selected) return;
    const [kind, key] = selected.split(".");
    const next = nameInput.value.trim();
    if (!next || next === key || shapes[kind][next]) return;
    shapes[kind][next] = { ...shapes[kind][key], changed: true };
    delete shapes[kind][key];
    selected = `${kind}.${next}`;
    redraw();
  });
  remove.addEventListener("click", () => {
    if (!selected) return;
    const [kind, key] = selected.split(".");
    delete shapes[kind][key];
    selected = null;
    redraw();
  });
  save.addEventListener("click", async () => {
    errors.replaceChildren(); saved.textContent = "";
    const payload = { zones: {}, lines: {} };
    for (const kind of ["zones", "lines"]) {
      for (const [key, shape] of Object.entries(shapes[kind])) {
        payload[kind][key] = !shape.changed && original[kind][key] ? original[kind][key]
          : { points: shape.points.map(([x, y]) => [+(x / width).toFixed(4), +(y / height).toFixed(4)]), normalized: true };
      }
    }
    try {
      const { status, body } = await api(`/cameras/${encodeURIComponent(name)}/geometry`, {
        method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload) });
      if (status === 422) {
        errors.replaceChildren(...body.problems.map((p) => el("li", { text: `${p.key}: ${p.message}` })));
      } else {
        saved.textContent = "Saved: the analytics use it from the next frame.";
        for (const kind of ["zones", "lines"]) { original[kind] = payload[kind]; for (const s of Object.values(shapes[kind])) s.changed = false; }
      }
    } catch (error) {
      errors.replaceChildren(el("li", { text: error.message }));
    }
  });
  setTool("line");
}

async function route() {
  for (const undo of cleanup) undo();
  cleanup = [];
  const main = document.getElementById("main");
  main.replaceChildren();
  const [, page, arg] = (location.hash || "#/").split("/").map(decodeURIComponent);
  try {
    if (page === "events") await eventsPage(main);
    else if (page === "camera" && arg) await cameraPage(main, arg);
    else if (page === "editor" && arg) await editorPage(main, arg);
    else await camerasPage(main);
    document.body.dataset.page = page || "cameras";
  } catch (error) {
    main.append(el("p", { class: "error", text: String(error.message || error) }));
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);
