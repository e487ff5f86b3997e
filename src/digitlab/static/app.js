// digitlab's draw-a-digit page: draw on the canvas (Pointer Events) or upload a photo,
// and show what the network reads, updated while you draw.
"use strict";

const PREDICT_URL = "/v1/predict?return_image=true";
const DEBOUNCE_MS = 120;   // wait this long after the last stroke movement...
const MAX_WAIT_MS = 350;   // ...but never longer than this while drawing continues
const INK = "#14161f";
const PAPER = "#ffffff";

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const photo = document.getElementById("photo");
const drop = document.getElementById("drop");
const fileInput = document.getElementById("file");
const statusLine = document.getElementById("status");
const result = document.getElementById("result");
const digitView = document.getElementById("digit");
const confidenceView = document.getElementById("confidence");
const warningsView = document.getElementById("warnings");
const seen = document.getElementById("seen");
const seenEmpty = document.getElementById("seen-empty");
const bars = buildBars(document.getElementById("bars"));

// The drawing's version grows with every change; a prediction is shown only for the
// version it was made from, and result.dataset.for says which one that is.
let version = 0;
let hasInk = false;
let uploaded = null;          // a File when a photo is shown instead of the drawing
let inFlight = false;
let wanted = false;           // a newer version needs a prediction once the current one returns
let debounceTimer = null;
let firstChangeAt = null;

function buildBars(container) {
  const columns = [];
  for (let digit = 0; digit < 10; digit++) {
    const column = document.createElement("div");
    column.className = "bar";
    column.innerHTML =
      '<span class="bar-value">0%</span><div class="bar-track"><div class="bar-fill"></div></div>' +
      `<span class="bar-label">${digit}</span>`;
    container.appendChild(column);
    columns.push({
      column,
      value: column.querySelector(".bar-value"),
      fill: column.querySelector(".bar-fill"),
    });
  }
  return columns;
}

function clearPad() {
  ctx.fillStyle = PAPER;
  ctx.fillRect(0, 0, pad.width, pad.height);
}

function setVersion(next) {
  version = next;
  pad.dataset.version = String(version);
}

function changed() {
  setVersion(version + 1);
  const now = performance.now();
  if (firstChangeAt === null) firstChangeAt = now;
  clearTimeout(debounceTimer);
  const wait = Math.max(0, Math.min(DEBOUNCE_MS, firstChangeAt + MAX_WAIT_MS - now));
  debounceTimer = setTimeout(requestPrediction, wait);
}

// Drawing ---------------------------------------------------------------------------

let last = null;

function padPoint(event) {
  const box = pad.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left) * pad.width) / box.width,
    y: ((event.clientY - box.top) * pad.height) / box.height,
  };
}

function strokeTo(point) {
  ctx.strokeStyle = INK;
  ctx.lineWidth = pad.width / 12;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(last.x, last.y);
  ctx.lineTo(point.x, point.y);
  ctx.stroke();
  last = point;
}

pad.addEventListener("pointerdown", (event) => {
  if (event.button !== 0) return;
  event.preventDefault();
  if (uploaded) clearAll();
  pad.setPointerCapture(event.pointerId);
  last = padPoint(event);
  strokeTo(last); // a dot for a tap
  hasInk = true;
  changed();
});

pad.addEventListener("pointermove", (event) => {
  if (!last) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of events.length ? events : [event]) strokeTo(padPoint(e));
  changed();
});

function endStroke() {
  if (!last) return;
  last = null;
  clearTimeout(debounceTimer);
  requestPrediction();
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

// Photos ----------------------------------------------------------------------------

function showPhoto(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    setStatus(`${file.name} is not an image`, "error");
    return;
  }
  clearPad();
  hasInk = false;
  uploaded = file;
  if (photo.src) URL.revokeObjectURL(photo.src);
  photo.src = URL.createObjectURL(file);
  photo.hidden = false;
  setVersion(version + 1);
  requestPrediction();
}

photo.addEventListener("error", () => (photo.hidden = true)); // the server may read what the browser cannot show

fileInput.addEventListener("change", () => {
  showPhoto(fileInput.files[0]);
  fileInput.value = "";
});

for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  });
}
drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("dragging");
  showPhoto(event.dataTransfer.files[0]);
});

// Predictions -----------------------------------------------------------------------

function setStatus(text, kind = "") {
  statusLine.textContent = text;
  statusLine.className = `hint ${kind}`;
}

function canvasBlob() {
  return new Promise((resolve) => pad.toBlob(resolve, "image/png"));
}

// A server started with --api-key answers 401 without it: the page asks for the key once and keeps it
// for this tab only (sessionStorage), sending it as the X-API-Key header.
const API_KEY_ITEM = "digitlab-api-key";

async function apiFetch(url, options = {}) {
  for (;;) {
    const key = sessionStorage.getItem(API_KEY_ITEM);
    const response = await fetch(url, { ...options, headers: key ? { "X-API-Key": key } : {} });
    if (response.status !== 401) return response;
    if (sessionStorage.getItem(API_KEY_ITEM) !== key) continue; // another request was given the key meanwhile
    const entered = (window.prompt("This digitlab server needs its API key:") ?? "").trim();
    if (!entered || entered === key) return response;
    sessionStorage.setItem(API_KEY_ITEM, entered);
  }
}

// With `digitlab serve --runs-dir`, runs.js fills #model-choice with the finished runs.
function predictUrl() {
  const run = document.getElementById("model-choice").value;
  return run ? `/v1/runs/${encodeURIComponent(run)}/predict` : PREDICT_URL;
}

document.getElementById("model-choice").addEventListener("change", () => {
  setVersion(version + 1);
  requestPrediction();
});

async function requestPrediction() {
  firstChangeAt = null;
  if (!hasInk && !uploaded) return;
  if (inFlight) {
    wanted = true;
    return;
  }
  inFlight = true;
  wanted = false;
  const forVersion = version;
  setStatus("reading…", "busy");
  try {
    const form = new FormData();
    if (uploaded) form.append("files", uploaded, uploaded.name);
    else form.append("files", await canvasBlob(), "drawing.png");
    const response = await apiFetch(predictUrl(), { method: "POST", body: form });
    const body = await response.json();
    if (forVersion === version) {
      if (!response.ok) throw new Error(typeof body.detail === "string" ? body.detail : response.statusText);
      show(body.predictions[0], forVersion);
    }
  } catch (error) {
    if (forVersion === version) {
      showNothing(forVersion);
      setStatus(error.message, "error");
    }
  } finally {
    inFlight = false;
    if (wanted) requestPrediction();
  }
}

function show(prediction, forVersion) {
  result.dataset.for = String(forVersion);
  warningsView.replaceChildren(
    ...prediction.warnings.map((text) => Object.assign(document.createElement("li"), { textContent: text })),
  );
  if (prediction.image) {
    seen.src = `data:image/png;base64,${prediction.image}`;
    seen.hidden = false;
    seenEmpty.hidden = true;
  }
  if (prediction.error) {
    digitView.textContent = "?";
    confidenceView.textContent = prediction.error;
    setBars(null);
    setStatus("nothing to read", "error");
    return;
  }
  digitView.textContent = String(prediction.digit);
  const runnerUp = prediction.runner_up;
  const percent = `${(prediction.probability * 100).toFixed(1)}%`;
  confidenceView.innerHTML = "";
  // The server marks calibrated probabilities below its threshold (default 50%) "not sure".
  confidenceView.append(prediction.warnings.includes("not sure") ? `not sure (${percent})` : `${percent} sure`);
  if (runnerUp) {
    const next = document.createElement("div");
    next.className = "runner-up";
    next.textContent = `next best: ${runnerUp[0]} (${(runnerUp[1] * 100).toFixed(1)}%)`;
    confidenceView.append(next);
  }
  setBars(prediction.probabilities, prediction.digit);
  const run = document.getElementById("model-choice").value;
  setStatus(`${uploaded ? `read ${uploaded.name}` : "read your drawing"}${run ? ` with run ${run}` : ""}`, "done");
}

function setBars(probabilities, best) {
  bars.forEach((bar, digit) => {
    const p = probabilities ? probabilities[digit] : 0;
    bar.fill.style.height = `${(p * 100).toFixed(1)}%`;
    bar.value.textContent = p >= 0.995 ? "100%" : `${Math.round(p * 100)}%`;
    bar.column.classList.toggle("best", probabilities !== null && digit === best);
  });
}

function showNothing(forVersion) {
  result.dataset.for = String(forVersion);
  digitView.textContent = "·";
  confidenceView.innerHTML = "&nbsp;";
  warningsView.replaceChildren();
  seen.hidden = true;
  seen.removeAttribute("src");
  seenEmpty.hidden = false;
  setBars(null);
}

function clearAll() {
  clearTimeout(debounceTimer);
  firstChangeAt = null;
  clearPad();
  hasInk = false;
  uploaded = null;
  photo.hidden = true;
  setVersion(version + 1);
  showNothing(version);
  setStatus("waiting for ink");
}

document.getElementById("clear").addEventListener("click", clearAll);

// The model card in the footer --------------------------------------------------------

async function showModelCard() {
  const line = document.getElementById("model");
  try {
    const response = await apiFetch("/v1/model");
    const card = await response.json();
    const parts = [`model ${card.name ?? "unnamed"}`];
    if (card.parameters) parts.push(`${card.parameters.total.toLocaleString("en")} parameters`);
    if (card.test) parts.push(`${(card.test.accuracy * 100).toFixed(2)}% on the MNIST test set`);
    line.textContent = parts.join(" · ");
  } catch {
    line.textContent = "model card unavailable";
  }
}

clearPad();
showNothing(0);
showModelCard();
