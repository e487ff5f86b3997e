// The training runs of `digitlab serve --runs-dir`: their list and the chosen run's curves, polled
// every second while they train, and the finished runs' models offered to the drawing pad.
// Served without --runs-dir, /v1/runs answers 404 and this part of the page stays hidden.
"use strict";

const POLL_MS = 1000;
const WIDTH = 600;
const HEIGHT = 220;
const MARGIN = { left: 84, right: 12, top: 12, bottom: 26 };

const runsCard = document.getElementById("runs");
const runsList = document.getElementById("runs-list");
const chart = document.getElementById("chart");
const chartRun = document.getElementById("chart-run");
const modelPick = document.getElementById("model-pick");
const modelChoice = document.getElementById("model-choice");

let chosenRun = null; // whose curves are drawn: the newest run until one is clicked
let clicked = false;

function percent(value) {
  return value === null || value === undefined ? "–" : `${(value * 100).toFixed(1)}%`;
}

function cell(text) {
  return Object.assign(document.createElement("td"), { textContent: String(text) });
}

function showRuns(runs) {
  if (!clicked && runs.length) chosenRun = runs[runs.length - 1].run;
  runsList.replaceChildren(
    ...runs.map((run) => {
      const row = document.createElement("tr");
      row.dataset.run = run.run;
      row.classList.toggle("chosen", run.run === chosenRun);
      row.append(cell(run.run), cell(run.status), cell(run.epochs), cell(percent(run.train_accuracy)),
        cell(percent(run.test_accuracy)));
      row.addEventListener("click", () => {
        chosenRun = run.run;
        clicked = true;
        for (const other of runsList.children) other.classList.toggle("chosen", other === row);
        drawCurves(chosenRun);
      });
      return row;
    }),
  );
}

function showModels(runs) {
  const offered = new Set([...modelChoice.options].map((option) => option.value));
  for (const run of runs) {
    if (run.model && !offered.has(run.run)) {
      modelChoice.append(new Option(`run ${run.run}`, run.run));
    }
  }
  modelPick.hidden = modelChoice.options.length < 2;
}

function line(points, cls) {
  return `<polyline class="${cls}" points="${points.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ")}"/>`;
}

function dots(points, cls) {
  return points.map(([x, y]) => `<circle class="${cls}" cx="${x.toFixed(1)}" cy="${y.toFixed(1)}" r="3"/>`).join("");
}

function plot(history) {
  const steps = history.steps;
  const lastStep = Math.max(1, ...steps.map((s) => s.global_step));
  const maxLoss = Math.max(1e-9, ...steps.map((s) => s.loss), ...history.epochs.map((e) => e.loss));
  const x = (step) => MARGIN.left + (step / lastStep) * (WIDTH - MARGIN.left - MARGIN.right);
  const y = (fraction) => HEIGHT - MARGIN.bottom - fraction * (HEIGHT - MARGIN.top - MARGIN.bottom);
  const epochEnd = new Map(steps.map((s) => [s.epoch, s.global_step])); // the last logged step of each epoch
  const ended = history.epochs.filter((e) => epochEnd.has(e.epoch));
  return [
    `<line class="axis" x1="${MARGIN.left}" y1="${y(0)}" x2="${WIDTH - MARGIN.right}" y2="${y(0)}"/>`,
    `<line class="axis" x1="${MARGIN.left}" y1="${y(0)}" x2="${MARGIN.left}" y2="${y(1)}"/>`,
    `<text x="4" y="${y(1) + 4}">${maxLoss.toFixed(2)} / 100%</text>`,
    `<text x="4" y="${y(0)}">0</text>`,
    `<text x="${WIDTH - MARGIN.right}" y="${HEIGHT - 6}" text-anchor="end">step ${lastStep}</text>`,
    // running means restart each epoch: one line per epoch
    ...[...epochEnd.keys()].map((epoch) => {
      const within = steps.filter((s) => s.epoch === epoch);
      return line(within.map((s) => [x(s.global_step), y(s.loss / maxLoss)]), "loss") +
        line(within.map((s) => [x(s.global_step), y(s.accuracy)]), "accuracy");
    }),
    dots(ended.map((e) => [x(epochEnd.get(e.epoch)), y(e.loss / maxLoss)]), "loss"),
    dots(ended.map((e) => [x(epochEnd.get(e.epoch)), y(e.accuracy)]), "accuracy"),
  ].join("");
}

async function drawCurves(name) {
  const response = await apiFetch(`/v1/runs/${encodeURIComponent(name)}/history`);
  if (!response.ok || name !== chosenRun) return;
  const history = await response.json();
  chartRun.textContent = `${name} · ${history.status}`;
  chart.innerHTML = plot(history); // numbers only: nothing from the run's files is markup
  chart.dataset.points = String(history.steps.length);
  chart.dataset.run = name;
}

async function poll() {
  try {
    const response = await apiFetch("/v1/runs");
    if (response.status === 404 || response.status === 401) return; // no --runs-dir, or a key is needed
    if (response.ok) {
      const { runs } = await response.json();
      runsCard.hidden = false;
      showRuns(runs);
      showModels(runs);
      if (chosenRun) await drawCurves(chosenRun);
    }
  } catch {
    // the server restarts or is busy: try again at the next tick
  }
  setTimeout(poll, POLL_MS);
}

poll();
