// The console's shell: sign-in, the hash router (#/files, #/jobs, #/jobs/<id>, #/playground, #/serving,
// #/webhooks), and the files and jobs pages. The job page is in job.js, the playground and serving pages in
// playground.js, the webhooks page in webhooks.js.
import { call, del, get, post, session } from "./api.js";
import { jobPage } from "./job.js";
import { playgroundPage, servingPage } from "./playground.js";
import { badge, bytes, errorBox, h, poll, table, when } from "./ui.js";
import { webhooksPage } from "./webhooks.js";

const main = document.getElementById("main");
let shown = 0; // which rendering is current: a page's pollers stop once another page is shown

function route() {
  const token = ++shown;
  const page = { alive: () => token === shown && document.body.contains(main), main };
  main.replaceChildren();
  document.body.classList.toggle("signed-in", Boolean(session.key()));
  if (!session.key()) return signInPage(page);
  const [path, query] = location.hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.hash === `#/${parts[0]}`);
  if (parts[0] === "jobs" && parts[1]) return jobPage(page, decodeURIComponent(parts[1]));
  if (parts[0] === "jobs") return jobsPage(page);
  if (parts[0] === "playground") return playgroundPage(page, params);
  if (parts[0] === "serving") return servingPage(page);
  if (parts[0] === "webhooks") return webhooksPage(page);
  return filesPage(page);
}

function signInPage() {
  const key = h("input", { type: "password", id: "api-key", placeholder: "sk-…", autocomplete: "off", required: true });
  const status = h("div");
  const form = h(
    "form",
    { class: "card sign-in", onsubmit: signIn },
    h("h2", {}, "Sign in"),
    h("p", {}, "Paste an API key of your organisation. It is kept in this tab's session storage only."),
    key,
    h("button", { type: "submit", id: "sign-in" }, "Sign in"),
    status,
  );
  async function signIn(event) {
    event.preventDefault();
    session.signIn(key.value.trim());
    try {
      await get("/v1/models"); // proves the key before anything else is shown
      location.hash = "#/files";
      route();
    } catch (e) {
      session.signOut();
      status.replaceChildren(errorBox(e));
    }
  }
  main.append(form);
}

// ---- files ----

async function filesPage() {
  const input = h("input", { type: "file", id: "file-input", accept: ".jsonl,application/jsonl" });
  const result = h("div", { id: "upload-result" });
  const list = h("div", { id: "files" });
  const zone = h("div", { class: "drop", id: "drop-zone" }, h("p", {}, "Drop a JSONL training file here, or choose one: "), input);
  zone.addEventListener("dragover", (e) => (e.preventDefault(), zone.classList.add("over")));
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
  });
  input.addEventListener("change", () => input.files.length && upload(input.files[0]));

  async function upload(file) {
    result.replaceChildren(h("p", {}, `Uploading ${file.name}…`));
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file, file.name);
    try {
      const row = await call("POST", "/v1/files", form);
      result.replaceChildren(h("p", { class: "ok" }, `Uploaded ${row.filename}: ${row.id}, ${row.num_examples} examples (${row.format}).`));
      refresh();
    } catch (e) {
      result.replaceChildren(errorBox(e));
    } finally {
      input.value = "";
    }
  }

  async function refresh() {
    const files = (await get("/v1/files?limit=100")).data;
    const remove = (f) => async () => {
      if (!confirm(`Delete ${f.filename} (${f.id})?`)) return;
      try {
        await del(`/v1/files/${f.id}`);
        refresh();
      } catch (e) {
        result.replaceChildren(errorBox(e));
      }
    };
    list.replaceChildren(
      table(
        ["id", "name", "format", "examples", "size", "created", ""],
        files.map((f) => [f.id, f.filename, f.format || f.purpose, f.num_examples ?? "", bytes(f.bytes), when(f.created_at),
          h("button", { class: "danger", onclick: remove(f) }, "Delete")]), // prettier-ignore
        "No files yet.",
      ),
    );
  }

  main.append(h("h2", {}, "Files"), zone, result, list);
  await refresh();
}

// ---- jobs ----

async function jobsPage(page) {
  const list = h("div", { id: "jobs" });
  const [methods, models, files] = await Promise.all([get("/v1/methods"), get("/v1/models"), get("/v1/files?limit=100")]);
  main.append(h("h2", {}, "Fine-tuning jobs"), createForm(methods, models.data, files.data), h("h3", {}, "Jobs"), list);
  const refresh = async () => {
    const jobs = (await get("/v1/fine_tuning/jobs?limit=100")).data;
    list.replaceChildren(
      table(
        ["job", "model", "method", "status", "created", "fine-tuned model"],
        jobs.map((j) => [h("a", { href: `#/jobs/${j.id}` }, j.id), j.model, j.adapter?.type, badge(j.status), when(j.created_at), j.fine_tuned_model || ""]), // prettier-ignore
        "No jobs yet.",
      ),
    );
  };
  poll(refresh, 3000, page.alive);
}

// A field for one hyperparameter, from its published JSON Schema: empty means "auto" (the default shown).
function field(param, prefix) {
  const id = `${prefix}-${param.name}`;
  const hint = `auto = ${JSON.stringify(param.default)}${param.allowed ? `; ${param.allowed}` : ""}`;
  let input;
  const choices = param.enum ?? (param.type === "boolean" ? [true, false] : null);
  if (choices) {
    input = h("select", { id, name: param.name }, h("option", { value: "" }, `auto (${param.default})`),
      choices.map((v) => h("option", { value: String(v) }, String(v)))); // prettier-ignore
  } else if (param.type === "integer" || param.type === "number") {
    input = h("input", { id, name: param.name, type: "number", placeholder: "auto", min: param.minimum ?? param.exclusiveMinimum,
      max: param.maximum ?? param.exclusiveMaximum, step: param.type === "integer" ? 1 : "any" }); // prettier-ignore
  } else {
    input = h("input", { id, name: param.name, type: "text", placeholder: param.type === "array" ? "auto (comma-separated)" : "auto" });
  }
  input.dataset.type = param.type;
  return h("label", { class: "field", title: hint }, h("span", {}, param.name), input, h("small", {}, hint));
}

function values(container) {
  const out = {};
  for (const input of container.querySelectorAll("input, select")) {
    const raw = input.value.trim();
    if (!raw) continue; // left out: the server's auto
    const type = input.dataset.type;
    out[input.name] = type === "integer" || type === "number" ? Number(raw) : type === "boolean" ? raw === "true" : type === "array" ? raw.split(",").map((s) => s.trim()) : raw;
  }
  return out;
}

function createForm(methods, models, files) {
  const status = h("div");
  const base = models.filter((m) => m.owned_by === "system");
  const fileOptions = (none) => [none ? h("option", { value: "" }, none) : null, files.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id}, ${f.format})`))];
  const model = h("select", { id: "job-model" }, base.map((m) => h("option", { value: m.id }, `${m.id} (${m.tasks.join(", ")})`)));
  const training = h("select", { id: "job-file" }, fileOptions());
  const validation = h("select", { id: "job-validation" }, fileOptions("none"));
  const suffix = h("input", { id: "job-suffix", type: "text", maxlength: 40, placeholder: "optional" });
  const automatic = methods.automatic_choice;
  const method = h("select", { id: "job-method" }, [
    ...methods.data.map((m) => h("option", { value: m.id, selected: m.default }, m.id)),
    h("option", { value: automatic.adapter.type }, `${automatic.adapter.type} (the service picks)`),
  ]);
  const about = h("p", { class: "about" });
  const adapterFields = h("div", { class: "fields", id: "adapter-fields" });
  const showMethod = () => {
    const chosen = methods.data.find((m) => m.id === method.value);
    about.textContent = chosen ? chosen.description : automatic.description;
    adapterFields.replaceChildren(...(chosen ? chosen.hyperparameters : []).map((p) => field(p, "adapter")));
  };
  method.addEventListener("change", showMethod);
  showMethod();
  // The training objective: OpenAI's method.type. DPO takes preference-format files and adds beta.
  const objective = h("select", { id: "job-objective" }, [h("option", { value: "supervised" }, "supervised"), h("option", { value: "dpo" }, "dpo (preference pairs)")]);
  const trainingFields = h("div", { class: "fields", id: "training-fields" });
  const showObjective = () => {
    const params = objective.value === "dpo" ? methods.dpo_hyperparameters : methods.supervised_hyperparameters;
    trainingFields.replaceChildren(...params.map((p) => field(p, "hp")));
  };
  objective.addEventListener("change", showObjective);
  const followFile = () => {
    const file = files.find((f) => f.id === training.value); // a preference file can only train DPO
    objective.value = file && file.format === "preference" ? "dpo" : "supervised";
    showObjective();
  };
  training.addEventListener("change", followFile);
  followFile();

  async function submit(event) {
    event.preventDefault();
    const body = {
      model: model.value,
      training_file: training.value,
      method: { type: objective.value, [objective.value]: { hyperparameters: values(trainingFields) } },
      adapter: { type: method.value, ...values(adapterFields) },
    };
    if (validation.value) body.validation_file = validation.value;
    if (suffix.value.trim()) body.suffix = suffix.value.trim();
    try {
      const job = await post("/v1/fine_tuning/jobs", body);
      location.hash = `#/jobs/${job.id}`;
    } catch (e) {
      status.replaceChildren(errorBox(e));
    }
  }

  const row = (label, input) => h("label", { class: "field" }, h("span", {}, label), input);
  return h(
    "form", { class: "card", id: "create-job", onsubmit: submit },
    h("h3", {}, "New job"),
    h("div", { class: "fields" }, row("base model", model), row("training file", training), row("validation file", validation), row("suffix", suffix)),
    h("h4", {}, "Training"), row("objective", objective), trainingFields,
    h("h4", {}, "Adapter method"), row("method", method), about, adapterFields,
    h("button", { type: "submit", id: "create-job-submit" }, "Create job"), status,
  ); // prettier-ignore
}

window.addEventListener("hashchange", route);
window.addEventListener("neat:unauthorized", () => {
  if (document.getElementById("sign-in")) return; // the sign-in form shows its own error
  session.signOut();
  route();
});
document.getElementById("sign-out").addEventListener("click", () => {
  session.signOut();
  location.hash = "";
  route();
});
route();
