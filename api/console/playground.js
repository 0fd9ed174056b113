// The playground (chat, streamed, or classification, with any model the organisation may use, beside its base
// model) and the serving page (what the inference tier has loaded: engines, batch sizes, the adapter cache).
import { get, post, stream } from "./api.js";
import { bytes, errorBox, h, poll, table } from "./ui.js";

// The model the caller named, as /v1/models describes it (a checkpoint is not listed, but it can be retrieved).
async function describe(models, id) {
  return models.find((m) => m.id === id) || (await get(`/v1/models/${encodeURIComponent(id)}`));
}

export async function playgroundPage(page, params) {
  const { main } = page;
  const models = (await get("/v1/models")).data;
  const picker = h("select", { id: "pg-model" }, models.map((m) => h("option", { value: m.id }, m.id)));
  const wanted = params.get("model");
  if (wanted && !models.some((m) => m.id === wanted)) picker.prepend(h("option", { value: wanted }, wanted));
  if (wanted) picker.value = wanted;
  const compare = h("input", { type: "checkbox", id: "pg-compare", checked: true });
  const panel = h("div", { id: "pg-panel" });
  main.append(
    h("h2", {}, "Playground"),
    h("div", { class: "toolbar" }, h("label", {}, "model ", picker), h("label", {}, compare, " side by side with its base model")),
    panel,
  );
  const show = async () => {
    const model = await describe(models, picker.value);
    // a checkpoint's parent is its job's fine-tuned model, `ft:<base>:<org>:<suffix>:<job>`: the base is named in it
    const parent = model.parent?.startsWith("ft:") ? model.parent.split(":")[1] : model.parent;
    const baseModel = compare.checked ? parent : null;
    const ids = [model.id, baseModel].filter(Boolean);
    panel.replaceChildren(model.tasks.includes("causal_lm") ? chat(ids) : classify(ids));
  };
  picker.addEventListener("change", show);
  compare.addEventListener("change", show);
  await show();
}

function columns(ids) {
  const outputs = ids.map((id, i) => h("div", { class: "answer", id: `pg-answer-${i}`, dataset: { model: id } }));
  const view = h("div", { class: "side-by-side" }, ids.map((id, i) => h("section", {}, h("h4", {}, id), outputs[i])));
  return { outputs, view };
}

function chat(ids) {
  const prompt = h("textarea", { id: "pg-prompt", rows: 3, placeholder: "Ask something…" });
  const system = h("input", { type: "text", id: "pg-system", placeholder: "system message (optional)" });
  const maxTokens = h("input", { type: "number", id: "pg-max-tokens", value: 64, min: 1, max: 4096 });
  const temperature = h("input", { type: "number", id: "pg-temperature", value: 0, min: 0, max: 2, step: 0.1 });
  const { outputs, view } = columns(ids);
  let controller = null;

  async function run(id, out) {
    const messages = [...(system.value.trim() ? [{ role: "system", content: system.value.trim() }] : []), { role: "user", content: prompt.value }];
    out.textContent = "";
    out.dataset.state = "streaming";
    const body = { model: id, messages, max_tokens: Number(maxTokens.value), temperature: Number(temperature.value) };
    try {
      for await (const chunk of stream("/v1/chat/completions", body, controller.signal)) {
        out.dataset.chunks = Number(out.dataset.chunks || 0) + 1;
        out.append(chunk.choices?.[0]?.delta?.content || "");
      }
      out.dataset.state = "done";
    } catch (e) {
      out.dataset.state = "error";
      if (e.name !== "AbortError") out.append(errorBox(e));
    }
  }
  async function send(event) {
    event.preventDefault();
    controller?.abort(); // a new question stops the answers still streaming
    controller = new AbortController();
    for (const out of outputs) out.dataset.chunks = 0;
    await Promise.all(ids.map((id, i) => run(id, outputs[i])));
  }
  return h(
    "form", { class: "card", onsubmit: send },
    system, prompt,
    h("div", { class: "toolbar" }, h("label", {}, "max tokens ", maxTokens), h("label", {}, "temperature ", temperature),
      h("button", { type: "submit", id: "pg-send" }, "Send"), h("button", { type: "button", onclick: () => controller?.abort() }, "Stop")),
    view,
  ); // prettier-ignore
}

function classify(ids) {
  const input = h("textarea", { id: "pg-input", rows: 4, placeholder: "One text per line" });
  const { outputs, view } = columns(ids);
  async function send(event) {
    event.preventDefault();
    const texts = input.value.split("\n").filter((t) => t.trim());
    await Promise.all(
      ids.map(async (id, i) => {
        try {
          const result = await post("/v1/classifications", { model: id, input: texts });
          outputs[i].replaceChildren(table(["text", "label", "score"], result.data.map((d) => [texts[d.index], d.label, d.score?.toFixed?.(3) ?? ""])));
          outputs[i].dataset.state = "done";
        } catch (e) {
          outputs[i].replaceChildren(errorBox(e));
        }
      }),
    );
  }
  return h("form", { class: "card", onsubmit: send }, input, h("button", { type: "submit", id: "pg-send" }, "Classify"), view);
}

export async function servingPage(page) {
  const { main, alive } = page;
  const out = h("div", { id: "serving" });
  main.append(h("h2", {}, "Serving"), h("p", {}, "What the inference tier holds now: engines per base model, their batching, and your adapters in their caches."), out);
  poll(async () => {
    const stats = await get("/v1/serving/stats");
    out.replaceChildren(
      table(
        ["base model", "server", "task", "queued", "running", "passes", "mean batch", "max batch", "your adapters", "cache used", "hits / misses / evictions"],
        stats.engines.map((e) => [e.base_model, e.server, e.task, e.queue_depth, e.rows_running, e.forward_passes, e.mean_batch_size?.toFixed?.(2) ?? "",
          e.max_batch_size, e.your_adapters.join(", ") || "—", `${bytes(e.bytes_used)} of ${bytes(e.bytes_budget || 0)}`, `${e.hits} / ${e.misses} / ${e.evictions}`]),
        "No model is loaded yet: one is loaded on its first request.",
      ),
      h("p", {}, `Models served alone (not batchable) for you: ${stats.solo_models_loaded}`),
    ); // prettier-ignore
  }, 3000, alive, (e) => out.replaceChildren(errorBox(e)));
}
