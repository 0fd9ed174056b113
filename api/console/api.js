// The console's one way to the API: same origin, the key from session storage as the Bearer, no cookies (so no
// CSRF surface). Errors arrive in OpenAI's shape and are thrown as ApiError with that body's `error`.

const KEY = "neat.apiKey";

export const session = {
  key: () => sessionStorage.getItem(KEY),
  signIn: (key) => sessionStorage.setItem(KEY, key),
  signOut: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.error = error; // {message, type, param, code, ...}: an upload's `errors` (line numbers) among the rest
  }
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${session.key()}`, ...extra };
}

async function check(response) {
  if (response.ok) return response;
  let error = { message: `HTTP ${response.status}` };
  try {
    error = (await response.json()).error || error;
  } catch {
    // not JSON (a proxy's page): keep the status line
  }
  if (response.status === 401) window.dispatchEvent(new Event("neat:unauthorized"));
  throw new ApiError(response.status, error);
}

// A JSON request; `body` is sent as JSON, or as is when it is FormData (an upload).
export async function call(method, path, body) {
  const init = { method, headers: headers() };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  return (await check(await fetch(path, init))).json();
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body ?? {});
export const del = (path) => call("DELETE", path);

// A download that needs the Bearer header: fetched as a blob, then saved through a temporary link.
export async function download(path) {
  const response = await check(await fetch(path, { headers: headers() }));
  const name = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") || "")?.[1] || "download";
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = name;
  link.click();
  URL.revokeObjectURL(link.href);
  return name;
}

// Server-sent events of a streamed completion, read from fetch (EventSource cannot send a Bearer header or a
// body): yields each event's parsed JSON until `[DONE]`; an `error` event is thrown.
export async function* stream(path, body, signal) {
  const response = await check(
    await fetch(path, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ ...body, stream: true }),
      signal,
    }),
  );
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new ApiError(response.status, event.error);
        yield event;
      }
    }
  }
}
