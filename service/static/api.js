// simmer playground: the HTTP side of the API (session calls, peek, SSE generation)
// and the API key that every call carries. Plain JS, no build step.
//
// Errors have one shape everywhere: {code, message, param?, status?}, as the API
// sends them in `{"error": {...}}` bodies and in stream error events.

const KEY_STORAGE = "simmer.apiKey";

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function storeKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

export function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The WebSocket cannot send headers from a browser: the key goes in the query.
export function streamUrl() {
  const url = new URL("v1/stream", document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const key = apiKey();
  if (key) url.searchParams.set("api_key", key);
  return url.href;
}

export async function errorFromResponse(response) {
  try {
    const body = await response.json();
    if (body && body.error) return { ...body.error, status: response.status };
  } catch {
    // not JSON: fall through to the status line
  }
  return { code: `http_${response.status}`, message: response.statusText || "request failed", status: response.status };
}

export function networkError(err) {
  return { code: "network_error", message: `Could not reach the server: ${err.message}` };
}

function post(json, signal) {
  const headers = authHeaders();
  if (json !== undefined) headers["Content-Type"] = "application/json";
  return { headers, body: json === undefined ? undefined : JSON.stringify(json), signal };
}

// One JSON call. Resolves to {body} (null for 204) or {error}; never throws, a
// network fault (or an abort through `signal`) being an error too.
export async function request(path, { method = "GET", json, signal } = {}) {
  try {
    const response = await fetch(path, { method, ...post(json, signal) });
    if (!response.ok) return { error: await errorFromResponse(response) };
    return { body: response.status === 204 ? null : await response.json() };
  } catch (err) {
    return { error: networkError(err) };
  }
}

// POST /v1/generate with `stream: true`: `onEvent` gets each server-sent event's JSON
// (session, token, done) as it arrives. Rejects with the API's error, whether it came
// as the HTTP answer or as an error event in the stream, or with the fetch's own
// error (a TypeError, or an AbortError once `signal` aborts).
export async function streamGenerate(body, { signal, onEvent }) {
  const response = await fetch("v1/generate", { method: "POST", ...post({ ...body, stream: true }, signal) });
  if (!response.ok) throw await errorFromResponse(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const frames = buffer.split("\n\n");
    buffer = frames.pop(); // the start of an event still on its way
    for (const frame of frames) {
      if (!frame.startsWith("data: ")) continue;
      const event = JSON.parse(frame.slice("data: ".length));
      if (event.type === "error") {
        reader.cancel();
        throw event;
      }
      onEvent(event);
    }
  }
}
