// Small DOM helpers every page uses: no framework, no build step.

// h("button", {class: "x", onclick}, "text", child...): an element; attributes starting with "on" are listeners,
// `dataset` sets data-* attributes; children may be strings, nodes, arrays, null or false (skipped).
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name in el && typeof value !== "string") el[name] = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}

export function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) (n /= 1024), i++;
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

// An API error as the page shows it: the message, the parameter it names, and an upload's line-numbered errors.
export function errorBox(error) {
  const body = error.error || { message: String(error) };
  return h(
    "div",
    { class: "error", role: "alert" },
    h("strong", {}, body.message),
    body.param ? h("span", { class: "param" }, ` (${body.param})`) : null,
    body.errors
      ? h("ul", { class: "line-errors" }, body.errors.map((e) => h("li", {}, `line ${e.line}: ${e.message}`)))
      : null,
  );
}

export function table(columns, rows, empty = "Nothing yet.") {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c) => h("td", {}, c))))),
  );
}

// Runs `tick` now and every `ms` while `alive()` holds (the page is still shown); errors are reported, not fatal.
export function poll(tick, ms, alive, onError) {
  const run = async () => {
    if (!alive()) return;
    try {
      await tick();
    } catch (e) {
      onError?.(e);
    }
    if (alive()) setTimeout(run, ms);
  };
  run();
}
