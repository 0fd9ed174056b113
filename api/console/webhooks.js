// The webhooks page (#/webhooks): the organisation's endpoints (OpenAI's /v1/webhook_endpoints), a form to add one
// (its signing secret is shown once, as the API answers it only at creation), and each endpoint's deliveries with
// every attempt (ours: /v1/webhook_endpoints/<id>/deliveries).
import { del, get, post } from "./api.js";
import { badge, errorBox, h, poll, table, when } from "./ui.js";

export async function webhooksPage(page) {
  const { main } = page;
  const status = h("div", { id: "webhook-result" });
  const list = h("div", { id: "webhooks" });
  const types = (await get("/v1/webhook_event_types")).data;
  const name = h("input", { id: "webhook-name", type: "text", required: true, maxlength: 64, placeholder: "name" });
  const url = h("input", { id: "webhook-url", type: "url", required: true, placeholder: "https://example.com/hooks" });
  const boxes = types.map((t) => h("input", { type: "checkbox", value: t, checked: t.endsWith(".succeeded") || t.endsWith(".failed") }));

  async function create(event) {
    event.preventDefault();
    const event_types = boxes.filter((b) => b.checked).map((b) => b.value);
    try {
      const made = await post("/v1/webhook_endpoints", { name: name.value.trim(), url: url.value.trim(), event_types });
      status.replaceChildren(
        h("p", { class: "ok" }, `Added ${made.id}. Its signing secret, shown this once: `,
          h("code", { id: "webhook-secret" }, made.signing_secret)), // prettier-ignore
      );
      refresh();
    } catch (e) {
      status.replaceChildren(errorBox(e));
    }
  }

  const deliveries = async (endpoint, into) => {
    const rows = (await get(`/v1/webhook_endpoints/${endpoint.id}/deliveries?limit=20`)).data;
    const attempts = (d) => d.attempts.map((a) => `#${a.attempt}: ${a.status_code ?? a.error} (${a.duration_ms} ms)`).join("; ");
    into.replaceChildren(
      table(["event", "type", "status", "created", "attempts"],
        rows.map((d) => [d.event_id, d.event_type, badge(d.status), when(d.created_at), attempts(d)]), "No deliveries yet."), // prettier-ignore
    );
  };

  async function refresh() {
    const endpoints = (await get("/v1/webhook_endpoints?limit=100")).data;
    const remove = (e) => async () => {
      if (!confirm(`Delete the endpoint ${e.name} (${e.id})?`)) return;
      try {
        await del(`/v1/webhook_endpoints/${e.id}`);
        refresh();
      } catch (err) {
        status.replaceChildren(errorBox(err));
      }
    };
    list.replaceChildren(
      ...(endpoints.length ? [] : [h("p", { class: "empty" }, "No endpoints yet.")]),
      ...endpoints.map((e) => {
        const shown = h("div", { class: "deliveries", dataset: { endpoint: e.id } });
        deliveries(e, shown).catch((err) => shown.replaceChildren(errorBox(err)));
        return h("section", { class: "card endpoint" },
          h("h4", {}, `${e.name} `, h("small", {}, `${e.id} · ${e.url} · secret ${e.signing_secret_hint}`)),
          h("p", {}, e.event_types.join(", ")), shown,
          h("button", { class: "danger", onclick: remove(e) }, "Delete")); // prettier-ignore
      }),
    );
  }

  main.append(
    h("h2", {}, "Webhooks"),
    h("form", { class: "card", id: "create-webhook", onsubmit: create },
      h("h3", {}, "New endpoint"),
      h("div", { class: "fields" }, h("label", { class: "field" }, h("span", {}, "name"), name), h("label", { class: "field" }, h("span", {}, "URL"), url)),
      h("div", { class: "fields" }, types.map((t, i) => h("label", {}, boxes[i], ` ${t}`))),
      h("button", { type: "submit", id: "create-webhook-submit" }, "Add endpoint"), status), // prettier-ignore
    list,
  );
  poll(refresh, 5000, page.alive);
}
