// A job's page: its state and controls, live loss and accuracy curves (uPlot, vendored), its events and its
// checkpoints. Everything is polled from the API while the page is shown; the curves come from the job's
// `metrics` events (one per step up to 100 steps, then evenly spaced), which carry the step's figures.
import { download, get, post } from "./api.js";
import { badge, errorBox, h, poll, table, when } from "./ui.js";

const FINISHED = ["succeeded", "failed", "cancelled"];
// metric name -> chart; a classification job reports `accuracy`, a causal one `mean_token_accuracy`
const CURVES = {
  loss: [["train_loss", "train loss", "#2563eb"], ["full_valid_loss", "valid loss", "#dc2626"]],
  accuracy: [
    ["train_accuracy", "train accuracy", "#2563eb"], ["full_valid_accuracy", "valid accuracy", "#dc2626"],
    ["train_mean_token_accuracy", "train token accuracy", "#0891b2"], ["full_valid_mean_token_accuracy", "valid token accuracy", "#ea580c"],
  ],
}; // prettier-ignore

// The job's metrics events, gathered across polls: the API lists events newest first, so each poll reads pages
// until it meets one it has already seen.
class EventLog {
  constructor(jobId) {
    this.jobId = jobId;
    this.seen = new Set();
    this.list = []; // newest first, as the API lists them
  }
  async update() {
    let after = null;
    const fresh = [];
    for (;;) {
      const query = `limit=100${after ? `&after=${after}` : ""}`;
      const page = await get(`/v1/fine_tuning/jobs/${this.jobId}/events?${query}`);
      const unseen = page.data.filter((e) => !this.seen.has(e.id));
      fresh.push(...unseen);
      if (!page.has_more || unseen.length < page.data.length || !page.data.length) break;
      after = page.data[page.data.length - 1].id;
    }
    for (const e of fresh) this.seen.add(e.id);
    this.list = [...fresh, ...this.list];
  }
  newestFirst() {
    return this.list;
  }
  // step -> {metric: value}, from every metrics event (train and validation events of a step are merged)
  byStep() {
    const steps = new Map();
    for (const e of this.list) {
      if (e.type !== "metrics" || e.data?.step === undefined) continue;
      steps.set(e.data.step, { ...steps.get(e.data.step), ...e.data });
    }
    return new Map([...steps.entries()].sort((a, b) => a[0] - b[0]));
  }
}

class Chart {
  constructor(container, title, curves) {
    this.container = container;
    this.title = title;
    this.curves = curves;
    this.plot = null;
  }
  update(steps) {
    const xs = [...steps.keys()];
    const present = this.curves.filter(([key]) => xs.some((x) => steps.get(x)[key] !== undefined));
    const data = [xs, ...present.map(([key]) => xs.map((x) => steps.get(x)[key] ?? null))];
    // What the browser tests (and curious users) read: how many points each drawn curve has.
    const points = Object.fromEntries(present.map(([key], i) => [key, data[i + 1].filter((v) => v !== null).length]));
    this.container.dataset.points = JSON.stringify(points);
    if (!present.length) return;
    const shape = present.map(([key]) => key).join();
    if (this.plot && this.shape === shape) return this.plot.setData(data);
    this.plot?.destroy();
    this.shape = shape;
    this.plot = new uPlot(
      {
        title: this.title,
        width: Math.max(320, this.container.clientWidth || 480),
        height: 240,
        scales: { x: { time: false } },
        axes: [{ label: "step" }, {}],
        series: [{ label: "step" }, ...present.map(([, label, stroke]) => ({ label, stroke, width: 2, spanGaps: true, points: { show: true, size: 5 } }))],
      },
      data,
      this.container,
    );
  }
}

export async function jobPage(page, jobId) {
  const { main, alive } = page;
  const header = h("div", { id: "job-header" });
  const message = h("div");
  const lossChart = h("div", { id: "loss-chart", class: "chart" });
  const accuracyChart = h("div", { id: "accuracy-chart", class: "chart" });
  const events = h("div", { id: "events" });
  const checkpoints = h("div", { id: "checkpoints" });
  main.append(
    h("p", {}, h("a", { href: "#/jobs" }, "← jobs")),
    header, message,
    h("div", { class: "charts" }, lossChart, accuracyChart),
    h("div", { class: "columns" }, h("section", {}, h("h3", {}, "Checkpoints"), checkpoints), h("section", {}, h("h3", {}, "Events"), events)),
  ); // prettier-ignore
  const log = new EventLog(jobId);
  const charts = [new Chart(lossChart, "Loss", CURVES.loss), new Chart(accuracyChart, "Accuracy", CURVES.accuracy)];
  window.neatConsole = { job: jobId, charts }; // for tests and the browser's console

  const act = (verb) => async () => {
    try {
      showJob(await post(`/v1/fine_tuning/jobs/${jobId}/${verb}`));
    } catch (e) {
      message.replaceChildren(errorBox(e));
    }
  };
  const save = (query) => async () => {
    try {
      message.replaceChildren(h("p", { class: "ok" }, `Saved ${await download(`/v1/fine_tuning/jobs/${jobId}/adapter?${query}`)}`));
    } catch (e) {
      message.replaceChildren(errorBox(e));
    }
  };

  function showJob(job) {
    const running = job.status === "running" || job.status === "queued";
    const done = job.status === "succeeded" && job.fine_tuned_model;
    header.replaceChildren(
      h("h2", {}, job.id, " ", badge(job.status)),
      h("dl", {},
        h("dt", {}, "base model"), h("dd", {}, job.model),
        h("dt", {}, "method"), h("dd", {}, `${job.adapter?.type} ${JSON.stringify(job.adapter)}`),
        h("dt", {}, "hyperparameters"), h("dd", {}, JSON.stringify(job.hyperparameters)),
        h("dt", {}, "fine-tuned model"), h("dd", { id: "fine-tuned-model" }, job.fine_tuned_model || "—"),
        h("dt", {}, "trained tokens"), h("dd", {}, job.trained_tokens ?? "—"),
        job.estimated_finish && running ? [h("dt", {}, "estimated finish"), h("dd", {}, when(job.estimated_finish))] : null,
        job.error ? [h("dt", {}, "error"), h("dd", { class: "error" }, job.error.message)] : null,
      ),
      h("div", { class: "actions" },
        h("button", { id: "cancel", class: "danger", disabled: !running, onclick: act("cancel") }, "Cancel"),
        h("button", { id: "pause", disabled: !running, onclick: act("pause") }, "Pause"),
        h("button", { id: "resume", disabled: job.status !== "paused", onclick: act("resume") }, "Resume"),
        done ? h("a", { class: "button", id: "try-model", href: `#/playground?model=${encodeURIComponent(job.fine_tuned_model)}` }, "Try it") : null,
        done ? h("button", { onclick: save("format=native") }, "Download adapter") : null,
        done ? h("button", { onclick: save("format=lora") }, "Download as LoRA") : null,
      ),
    ); // prettier-ignore
    return job;
  }

  async function tick() {
    const [job] = await Promise.all([get(`/v1/fine_tuning/jobs/${jobId}`), log.update()]);
    showJob(job);
    const steps = log.byStep();
    for (const chart of charts) chart.update(steps);
    events.replaceChildren(
      h("ol", { class: "events" }, log.newestFirst().map((e) => h("li", { class: e.level }, h("time", {}, when(e.created_at)), " ", e.message))),
    );
    const rows = (await get(`/v1/fine_tuning/jobs/${jobId}/checkpoints?limit=10`)).data;
    checkpoints.replaceChildren(
      table(["step", "metrics", ""], rows.map((c) => [c.step_number, metricsText(c.metrics), h("span", {},
        h("a", { class: "button", href: `#/playground?model=${encodeURIComponent(c.fine_tuned_model_checkpoint)}` }, "Try it"),
        h("button", { onclick: save(`format=native&checkpoint=${c.step_number}`) }, "Download"))]), "No checkpoints yet."),
    ); // prettier-ignore
    if (FINISHED.includes(job.status)) page.finished = true;
  }
  // Polls quickly while the job moves, then stops once it has ended (one last read shows the final state).
  poll(tick, 1000, () => alive() && !page.finished, (e) => message.replaceChildren(errorBox(e)));
}

function metricsText(metrics) {
  return Object.entries(metrics || {})
    .filter(([k]) => k !== "step")
    .map(([k, v]) => `${k}=${typeof v === "number" ? v.toPrecision(4) : v}`)
    .join(" ");
}
