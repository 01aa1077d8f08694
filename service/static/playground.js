// simmer playground: streams a recipe over WS /v1/stream and draws each step's
// next-word distribution from the API's logprobs. Plain JS, no build step.
//
// Protocol (see service/routes/ws.py): one connection is one session. We send
// {"type": "generate", ...} and {"type": "cancel"}; the server answers
// {"type": "session"}, token events, then {"type": "done"} or {"type": "error"}.

const TOP_N = 5; // candidates shown per step (the `logprobs` we ask for)
const CONTEXT_CHARS = 64; // how much preceding text each step keeps for its caption
const KEY_STORAGE = "simmer.apiKey";

const FIELDS = {
  temperature: { id: "temperature", label: "temperature", integer: false },
  top_k: { id: "top-k", label: "top-k", integer: true },
  top_p: { id: "top-p", label: "top-p", integer: false },
  max_tokens: { id: "max-tokens", label: "max tokens", integer: true },
  seed: { id: "seed", label: "seed", integer: true },
};
const PARAM_TARGETS = { ...Object.fromEntries(Object.entries(FIELDS).map(([k, f]) => [k, f.id])), prompt: "prompt" };

const FINISH_TEXT = {
  length: "reached max tokens",
  eos: "the model ended the recipe",
  stop: "hit a stop string",
  cancelled: "stopped",
  shutdown: "the server is shutting down",
  error: "the engine failed",
};

const $ = (id) => document.getElementById(id);
const ui = {
  prompt: $("prompt"),
  temperature: $("temperature"),
  temperatureRange: $("temperature-range"),
  generate: $("generate"),
  continue: $("continue"),
  stop: $("stop"),
  newSession: $("new-session"),
  output: $("output"),
  scroller: $("output-scroll"),
  runState: $("run-state"),
  sessionId: $("session-id"),
  tokenCount: $("token-count"),
  tps: $("tokens-per-second"),
  ttft: $("ttft"),
  finish: $("finish-reason"),
  error: $("error"),
  errorTitle: $("error-title"),
  errorMessage: $("error-message"),
  errorMeta: $("error-meta"),
  errorDismiss: $("error-dismiss"),
  bars: $("prob-bars"),
  probsContext: $("probs-context"),
  probsNote: $("probs-note"),
  followLatest: $("follow-latest"),
  apiKey: $("api-key"),
  apiKeyClear: $("api-key-clear"),
  modelName: $("model-name"),
  modelBadge: document.querySelector("[data-testid=model]"),
};

const state = {
  socket: null, // the open (or opening) WebSocket of the current session
  sessionId: null,
  run: null, // the generation in flight: timings, counts, the message sent
  steps: [], // one per generated token: {el, token, logprob, top, temperature}
  selected: null, // index of the step pinned by the user, or null to follow the latest
  marked: null, // the word element highlighted in the output
  tail: "", // the last words of the text so far, for the context line
  continuations: 0, // Continue presses in this session: each shifts a fixed seed by one
  followScroll: true, // keep the newest words in view unless the reader scrolled up
  paintQueued: false, // a frame is booked to redraw the bars, the numbers and the scroll
};

// --- small helpers -------------------------------------------------------------

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function streamUrl() {
  const url = new URL("v1/stream", document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const key = apiKey();
  if (key) url.searchParams.set("api_key", key);
  return url.href;
}

function humanize(code) {
  const text = String(code || "error").replace(/_/g, " ");
  return text.charAt(0).toUpperCase() + text.slice(1);
}

function percent(p) {
  const v = p * 100;
  if (v >= 10) return `${v.toFixed(1)}%`;
  if (v >= 0.1) return `${v.toFixed(2)}%`;
  return v > 0 ? "<0.1%" : "0%";
}

function displayWord(word) {
  if (word === "") return "⏎ end";
  return word;
}

// --- errors --------------------------------------------------------------------

function clearError() {
  ui.error.hidden = true;
  for (const id of Object.values(PARAM_TARGETS)) {
    const el = $(id);
    el.removeAttribute("aria-invalid");
    el.removeAttribute("aria-errormessage");
  }
}

function showError({ code, message, param, status }) {
  ui.errorTitle.textContent = humanize(code);
  ui.errorMessage.textContent = message || "The server gave no details.";
  const meta = [];
  const target = param && PARAM_TARGETS[param.split(".").pop()];
  if (param) meta.push(`Field: ${FIELDS[param]?.label ?? param}`);
  if (status) meta.push(`HTTP ${status}`);
  if (code) meta.push(`code ${code}`);
  ui.errorMeta.textContent = meta.join(" · ");
  ui.error.hidden = false;
  if (target) {
    const el = $(target);
    el.setAttribute("aria-invalid", "true");
    el.setAttribute("aria-errormessage", "error");
  }
}

async function errorFromResponse(response) {
  try {
    const body = await response.json();
    if (body && body.error) return { ...body.error, status: response.status };
  } catch {
    // not JSON: fall through to the status line
  }
  return { code: `http_${response.status}`, message: response.statusText || "request failed", status: response.status };
}

// --- rendering -----------------------------------------------------------------

function setRunState(text, tone = "") {
  ui.runState.textContent = text;
  ui.runState.dataset.tone = tone;
}

function syncButtons() {
  const running = state.run !== null;
  ui.generate.disabled = running;
  ui.continue.disabled = running || state.sessionId === null;
  ui.stop.disabled = !running || state.run.cancelling;
  ui.newSession.disabled = state.sessionId === null && state.steps.length === 0 && !running;
  ui.output.setAttribute("aria-busy", String(running));
}

function resetOutput(prompt) {
  ui.output.replaceChildren();
  state.followScroll = true;
  state.steps = [];
  state.selected = null;
  state.tail = "";
  if (prompt) {
    const span = document.createElement("span");
    span.className = "prompt-text";
    span.dataset.testid = "prompt-echo";
    span.textContent = prompt;
    ui.output.append(span);
    state.tail = prompt.slice(-CONTEXT_CHARS);
  }
  renderDistribution();
}

// A token event covers `count` tokens; its text is their pieces joined, each piece
// being the word with or without a leading space. Split it back, one piece per word.
function splitPieces(text, entries) {
  if (entries.length <= 1) return [text];
  const pieces = [];
  let pos = 0;
  for (let i = 0; i < entries.length - 1; i++) {
    const word = entries[i].token;
    let piece = "";
    if (text.startsWith(` ${word}`, pos)) piece = ` ${word}`;
    else if (text.startsWith(word, pos)) piece = word;
    pieces.push(piece);
    pos += piece.length;
  }
  pieces.push(text.slice(pos));
  return pieces;
}

function appendToken(piece, entry) {
  const index = state.steps.length;
  let word = piece;
  if (piece.startsWith(" ")) {
    ui.output.append(" ");
    word = piece.slice(1);
  }
  const span = document.createElement("span");
  span.className = "tok";
  span.dataset.testid = "token";
  span.dataset.index = String(index);
  span.textContent = word;
  if (entry?.token === "[UNK]") span.classList.add("unk");
  ui.output.append(span);
  state.steps.push({
    el: span,
    token: entry ? entry.token : word,
    id: entry ? entry.id : null,
    logprob: entry ? entry.logprob : null,
    top: entry ? entry.top : [],
    temperature: state.run ? state.run.message.temperature ?? 1 : 1,
    before: state.tail,
  });
  state.tail = (state.tail + piece).slice(-CONTEXT_CHARS);
}

function renderDistribution() {
  const index = state.selected ?? state.steps.length - 1;
  const step = state.steps[index];
  if (state.marked) {
    state.marked.classList.remove("selected");
    state.marked.removeAttribute("aria-current");
    state.marked = null;
  }
  ui.followLatest.hidden = state.selected === null;
  if (!step || step.top.length === 0) {
    ui.bars.replaceChildren();
    ui.probsContext.textContent = "The top five candidates for each word appear here as it is generated.";
    ui.probsNote.textContent = "";
    delete ui.bars.dataset.step;
    return;
  }
  step.el.classList.add("selected");
  step.el.setAttribute("aria-current", "true");
  state.marked = step.el;

  const context = step.before.trimEnd();
  const tail = context.length > 48 ? `…${context.slice(-48).replace(/^\S*\s/, "")}` : context;
  ui.probsContext.replaceChildren(
    `Word ${index + 1}: after “${tail}” the model drew “`,
    Object.assign(document.createElement("strong"), { textContent: displayWord(step.token) }),
    step.logprob === null ? "”." : `” (${percent(Math.exp(step.logprob))}).`,
  );

  const rows = step.top.slice(0, TOP_N).map((w) => ({ ...w, chosen: w.id === step.id }));
  const chosenShown = rows.some((row) => row.chosen);
  if (!chosenShown && step.logprob !== null) {
    rows.push({ token: step.token, prob: Math.exp(step.logprob), chosen: true, outside: true });
  }
  ui.bars.replaceChildren(...rows.map(barRow));
  ui.bars.dataset.step = String(index);
  ui.probsNote.textContent =
    `Probabilities at temperature ${step.temperature}, before top-k and top-p.` +
    (chosenShown ? "" : " The word drawn was outside the top five.");
}

function barRow(word) {
  const prob = word.prob ?? Math.exp(word.logprob);
  const li = document.createElement("li");
  li.className = "bar-row";
  li.dataset.testid = "prob-row";
  li.dataset.token = word.token;
  if (word.chosen) li.classList.add("chosen");
  if (word.outside) li.classList.add("outside");

  const label = document.createElement("span");
  label.className = "bar-word";
  label.dataset.testid = "prob-word";
  label.textContent = displayWord(word.token);

  const track = document.createElement("span");
  track.className = "bar-track";
  track.setAttribute("aria-hidden", "true");
  const fill = document.createElement("span");
  fill.className = "bar-fill";
  fill.style.width = `${Math.max(0, Math.min(100, prob * 100))}%`;
  track.append(fill);

  const pct = document.createElement("span");
  pct.className = "bar-pct";
  pct.dataset.testid = "prob-pct";
  pct.textContent = percent(prob);

  li.append(label, track, pct);
  if (word.chosen) {
    const tag = document.createElement("span");
    tag.className = "visually-hidden";
    tag.textContent = " (drawn)";
    li.append(tag);
  }
  return li;
}

function select(index) {
  if (state.steps.length === 0) return;
  const last = state.steps.length - 1;
  const clamped = Math.max(0, Math.min(last, index));
  state.selected = clamped === last && state.run !== null ? null : clamped;
  renderDistribution();
  state.steps[clamped].el.scrollIntoView({ block: "nearest" });
}

function schedulePaint() {
  if (state.paintQueued) return;
  state.paintQueued = true;
  requestAnimationFrame(() => {
    state.paintQueued = false;
    updateStats();
    if (state.selected === null) renderDistribution();
    if (state.followScroll) ui.scroller.scrollTop = ui.scroller.scrollHeight;
  });
}

function updateStats() {
  const run = state.run;
  if (!run) return;
  ui.tokenCount.textContent = String(run.tokens);
  if (run.firstAt !== null) {
    ui.ttft.textContent = `${Math.round(run.firstAt - run.sentAt)} ms`;
  }
  const span = (run.lastAt ?? 0) - (run.firstAt ?? 0);
  if (run.tokens > 1 && span > 0) {
    const rate = (run.tokens - 1) / (span / 1000);
    ui.tps.textContent = `${rate >= 100 ? Math.round(rate) : rate.toFixed(1)} tok/s`;
  }
}

// --- the WebSocket -------------------------------------------------------------

function closeSocket() {
  const socket = state.socket;
  state.socket = null;
  if (socket && socket.readyState <= WebSocket.OPEN) socket.close(1000, "new session");
}

function openSocket() {
  return new Promise((resolve, reject) => {
    const socket = new WebSocket(streamUrl());
    let opened = false;
    state.socket = socket;
    socket.addEventListener("open", () => {
      opened = true;
      resolve(socket);
    });
    socket.addEventListener("message", (event) => {
      if (socket !== state.socket) return; // a socket we already left behind
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        failRun({ code: "bad_message", message: "The server sent something that is not JSON." });
        return;
      }
      handleMessage(message);
    });
    socket.addEventListener("close", (event) => {
      if (socket !== state.socket) return;
      state.socket = null;
      if (!opened) {
        reject(event);
        return;
      }
      if (state.run) {
        const byServer = event.code >= 4000; // simmer's own codes: 4000 + HTTP status
        failRun({
          code: byServer && event.reason ? event.reason : "connection_lost",
          message: byServer
            ? `The server closed the stream (WebSocket code ${event.code}).`
            : `The stream closed during generation (WebSocket code ${event.code}${event.reason ? `: ${event.reason}` : ""}).`,
        });
      }
    });
  });
}

async function send(message) {
  let socket = state.socket;
  if (!socket || socket.readyState !== WebSocket.OPEN) {
    try {
      socket = await openSocket();
    } catch (event) {
      // A refused handshake tells the browser nothing but code 1006; say what it may be.
      const keyHint = apiKey()
        ? "check the API key under Connection"
        : "if the server needs an API key, enter it under Connection";
      failRun({
        code: "connection_failed",
        message: `Could not open the stream at ${new URL("v1/stream", document.baseURI).pathname} ` +
          `(WebSocket code ${event.code}). The server may be down or refusing the request: ${keyHint}.`,
      });
      return;
    }
  }
  if (!state.run || socket !== state.socket) return; // stopped or reset while connecting
  state.run.sentAt = performance.now();
  socket.send(JSON.stringify(message));
}

function handleMessage(message) {
  const run = state.run;
  switch (message.type) {
    case "session":
      state.sessionId = message.session_id;
      ui.sessionId.textContent = message.session_id;
      ui.sessionId.title = message.session_id;
      if (run) setRunState(run.cancelling ? "Stopping…" : "Generating…", "busy");
      break;
    case "token": {
      if (!run) return;
      const now = performance.now();
      if (run.firstAt === null) run.firstAt = now;
      run.lastAt = now;
      const entries = message.logprobs ?? [];
      const pieces = splitPieces(message.text, entries);
      pieces.forEach((piece, i) => appendToken(piece, entries[i]));
      run.tokens += message.count ?? pieces.length;
      schedulePaint(); // the words go in as they come; bars and numbers once per frame
      break;
    }
    case "done":
      finishRun(message);
      break;
    case "error":
      if (message.code === "session_not_found") {
        state.sessionId = null; // expired or deleted: Continue has nothing to extend
        ui.sessionId.textContent = "—";
      }
      if (message.code === "unauthorized") {
        message = { ...message, message: `${message.message} Enter a key under Connection.` };
      }
      failRun(message);
      break;
    default:
      break;
  }
}

// --- runs ----------------------------------------------------------------------

function readParams() {
  const params = {};
  for (const [name, field] of Object.entries(FIELDS)) {
    const el = $(field.id);
    if (el.value.trim() === "" && !el.validity.badInput) continue; // the server's default
    const value = Number(el.value);
    if (el.validity.badInput || !Number.isFinite(value) || (field.integer && !Number.isInteger(value))) {
      showError({
        code: "invalid_input",
        message: `${field.label} must be ${field.integer ? "a whole number" : "a number"}.`,
        param: name,
      });
      return null;
    }
    params[name] = value;
  }
  if ($("ignore-eos").checked) params.ignore_eos = true; // the stop token is never drawn
  return params;
}

function startRun({ fresh }) {
  clearError();
  const params = readParams();
  if (!params) return;
  const prompt = fresh ? ui.prompt.value : "";
  if (fresh) {
    closeSocket();
    state.sessionId = null;
    state.continuations = 0;
    ui.sessionId.textContent = "—";
    resetOutput(prompt);
  } else if (state.selected !== null) {
    state.selected = null;
    renderDistribution();
  }
  const message = { type: "generate", prompt, logprobs: TOP_N, ...params };
  if (!fresh) {
    message.session_id = state.sessionId;
    // The server seeds each request afresh; the same seed again would replay the same
    // draws, so each Continue uses the next seed (still reproducible).
    state.continuations += 1;
    if (message.seed !== undefined) message.seed += state.continuations;
  }
  const refocus = document.activeElement === ui.generate || document.activeElement === ui.continue;
  state.run = { message, sentAt: performance.now(), firstAt: null, lastAt: null, tokens: 0, cancelling: false };
  ui.tokenCount.textContent = "0";
  ui.tps.textContent = "—";
  ui.ttft.textContent = "—";
  ui.finish.textContent = "—";
  setRunState("Connecting…", "busy");
  syncButtons();
  if (refocus) ui.stop.focus();
  send(message);
}

function endRun() {
  const stopHadFocus = document.activeElement === ui.stop;
  state.run = null;
  syncButtons();
  if (stopHadFocus) (ui.continue.disabled ? ui.generate : ui.continue).focus();
}

function finishRun(message) {
  const run = state.run;
  if (!run) return;
  const used = message.usage?.completion_tokens ?? run.tokens;
  run.tokens = used;
  updateStats();
  const reason = message.finish_reason;
  ui.finish.textContent = reason;
  ui.finish.title = FINISH_TEXT[reason] ?? reason;
  const words = `${used} word${used === 1 ? "" : "s"}`;
  if (reason === "cancelled") setRunState(`Stopped after ${words}`, "stopped");
  else setRunState(`Done: ${words}, ${FINISH_TEXT[reason] ?? reason}`, "done");
  endRun();
  renderDistribution();
}

function failRun(error) {
  showError(error);
  if (state.run) {
    ui.finish.textContent = "error";
    setRunState("Failed: see the message above", "error");
    endRun();
  }
}

function stopRun() {
  const run = state.run;
  if (!run || run.cancelling) return;
  run.cancelling = true;
  setRunState("Stopping…", "busy");
  syncButtons();
  if (state.socket && state.socket.readyState === WebSocket.OPEN) {
    state.socket.send(JSON.stringify({ type: "cancel" }));
  } else {
    closeSocket();
    finishRun({ finish_reason: "cancelled", usage: { completion_tokens: run.tokens } });
  }
}

async function newSession() {
  const old = state.sessionId;
  const wasRunning = state.run !== null;
  closeSocket();
  state.run = null;
  state.sessionId = null;
  ui.sessionId.textContent = "—";
  ui.tokenCount.textContent = "0";
  ui.tps.textContent = "—";
  ui.ttft.textContent = "—";
  ui.finish.textContent = "—";
  clearError();
  resetOutput("");
  ui.output.append(placeholder());
  syncButtons();
  ui.prompt.focus();
  // Free the old session on the server; a running one is saved by the server as it
  // stops, so it is left to expire instead.
  if (old && !wasRunning) {
    setRunState("Closing the old session…", "busy");
    try {
      const response = await fetch(`v1/sessions/${encodeURIComponent(old)}`, {
        method: "DELETE",
        headers: authHeaders(),
      });
      if (!response.ok && response.status !== 404) showError(await errorFromResponse(response));
    } catch (err) {
      showError({ code: "network_error", message: `Could not reach the server: ${err.message}` });
    }
  }
  setRunState("New session: ready", "");
}

function placeholder() {
  const span = document.createElement("span");
  span.className = "placeholder";
  span.textContent = "Press Generate and the recipe appears here, one word at a time.";
  return span;
}

// --- model and key -------------------------------------------------------------

async function loadModel() {
  ui.modelBadge.dataset.tone = "";
  try {
    const response = await fetch("v1/models", { headers: authHeaders() });
    if (!response.ok) {
      const error = await errorFromResponse(response);
      ui.modelName.textContent = response.status === 401 || response.status === 403 ? "API key needed" : "unavailable";
      ui.modelBadge.dataset.tone = "error";
      if (response.status === 401 || response.status === 403) {
        error.message = `${error.message} Enter a key under Connection.`;
      }
      showError(error);
      return;
    }
    const body = await response.json();
    const model = body.data?.[0];
    ui.modelName.textContent = model ? `${model.id} · ${model.version ?? ""}`.replace(/ · $/, "") : "no model";
    ui.modelBadge.dataset.tone = model ? "ok" : "error";
  } catch (err) {
    ui.modelName.textContent = "offline";
    ui.modelBadge.dataset.tone = "error";
    showError({ code: "network_error", message: `Could not reach the server: ${err.message}` });
  }
}

function setKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  if (!state.run) closeSocket(); // the next request connects with the new key
  clearError();
  loadModel();
}

// --- wiring --------------------------------------------------------------------

ui.generate.addEventListener("click", () => startRun({ fresh: true }));
ui.continue.addEventListener("click", () => startRun({ fresh: false }));
ui.stop.addEventListener("click", stopRun);
ui.newSession.addEventListener("click", newSession);
ui.errorDismiss.addEventListener("click", () => {
  ui.error.hidden = true;
});
ui.followLatest.addEventListener("click", () => {
  state.selected = null;
  renderDistribution();
});

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    if (!state.run) startRun({ fresh: true });
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && state.run) {
    event.preventDefault();
    stopRun();
  }
});

ui.output.addEventListener("click", (event) => {
  const tok = event.target.closest?.(".tok");
  if (tok) select(Number(tok.dataset.index));
});
ui.scroller.addEventListener("scroll", () => {
  const box = ui.scroller;
  state.followScroll = box.scrollHeight - box.scrollTop - box.clientHeight < 48;
});
ui.output.addEventListener("keydown", (event) => {
  if (state.steps.length === 0) return;
  const current = state.selected ?? state.steps.length - 1;
  const moves = { ArrowLeft: current - 1, ArrowRight: current + 1, Home: 0, End: state.steps.length - 1 };
  if (event.key in moves) {
    event.preventDefault();
    select(moves[event.key]);
  } else if (event.key === "Escape" && !state.run) {
    state.selected = null;
    renderDistribution();
  }
});

ui.temperatureRange.addEventListener("input", () => {
  ui.temperature.value = ui.temperatureRange.value;
});
ui.temperature.addEventListener("input", () => {
  if (ui.temperature.value !== "") ui.temperatureRange.value = ui.temperature.value;
});
for (const id of Object.values(PARAM_TARGETS)) {
  $(id).addEventListener("input", (event) => event.target.removeAttribute("aria-invalid"));
}

ui.apiKey.form.addEventListener("submit", (event) => event.preventDefault()); // Enter fires "change"
ui.apiKey.value = apiKey();
ui.apiKey.addEventListener("change", () => setKey(ui.apiKey.value.trim()));
ui.apiKeyClear.addEventListener("click", () => {
  ui.apiKey.value = "";
  setKey("");
  ui.apiKey.focus();
});

syncButtons();
loadModel();
