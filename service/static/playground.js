// simmer playground: streams a recipe over WS /v1/stream and draws each step's
// next-word distribution from the API's logprobs. Plain JS, no build step.
//
// Protocol (see service/routes/ws.py): one connection is one session. We send
// {"type": "generate", ...} and {"type": "cancel"}; the server answers
// {"type": "session"}, token events, then {"type": "done"} or {"type": "error"}.
//
// Between runs the page uses the session routes over HTTP (api.js): GET .../next
// peeks at the next word, POST .../rewind undoes the last call, and "Try another
// ending" forks the session, rewinds the fork by that call and streams the fork's
// new ending from POST /v1/generate (SSE), so the main connection keeps its session.

import { apiKey, authHeaders, networkError, request, storeKey, streamGenerate, streamUrl } from "./api.js";

const TOP_N = 5; // candidates shown per step (the `logprobs` we ask for)
const CONTEXT_CHARS = 64; // how much preceding text each step keeps for its caption
const MIN_TEMPERATURE = 1e-4; // below it sampling is greedy (service/engine/params.py)

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
  undo: $("undo"),
  anotherEnding: $("another-ending"),
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
  endings: $("endings"),
  endingsStart: $("endings-start"),
  endingsState: $("endings-state"),
  endingsClose: $("endings-close"),
  ending: {
    a: { session: $("ending-a-session"), text: $("ending-a-text"), words: $("ending-a-words"), finish: $("ending-a-finish") },
    b: { session: $("ending-b-session"), text: $("ending-b-text"), words: $("ending-b-words"), finish: $("ending-b-finish") },
  },
};

const state = {
  socket: null, // the open (or opening) WebSocket of the current session
  sessionId: null,
  run: null, // the generation in flight: timings, counts, the message sent
  steps: [], // one per generated token: {el, token, logprob, top, temperature}
  selected: null, // index of the step pinned by the user, or null to follow the latest
  marked: null, // the word element highlighted in the output
  tail: "", // the last words of the text so far, for the context line
  continuations: 0, // requests after the first in this session: each shifts a fixed seed by one
  followScroll: true, // keep the newest words in view unless the reader scrolled up
  paintQueued: false, // a frame is booked to redraw the bars, the numbers and the scroll
  // What the server says about the session, and what Undo needs to take a call back:
  sessionTokens: 0, // tokens in its context (prompt and words), from the last answer
  rewindPoints: 0, // how many of its last calls the server can undo
  calls: [], // one per call the session saved: where its words begin on the page
  generated: 0, // words generated in the session by all its calls (the Tokens figure)
  peek: null, // the idle session's next-word distribution (GET .../next), or null
  undoing: false, // a rewind is in flight
  branch: null, // the other ending: a fork of the session and what it wrote
  ticket: 0, // bumped when the session changes: answers to older requests are dropped
};

// --- small helpers -------------------------------------------------------------

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

// --- rendering -----------------------------------------------------------------

function setRunState(text, tone = "") {
  ui.runState.textContent = text;
  ui.runState.dataset.tone = tone;
}

// Idle: no generation on the session or its fork, no rewind in flight.
function isIdle() {
  return state.run === null && !state.undoing && !state.branch?.running;
}

function syncButtons() {
  const running = state.run !== null;
  const branching = state.branch?.running ?? false;
  const idle = isIdle();
  ui.generate.disabled = !idle;
  ui.continue.disabled = !idle || state.sessionId === null || state.sessionTokens === 0;
  // Another ending forks the session and rewinds the fork by one call: both need a
  // call the server can undo and that the page can show.
  const undoable = idle && state.sessionId !== null && state.rewindPoints > 0 && state.calls.length > 0;
  ui.undo.disabled = !undoable;
  ui.anotherEnding.disabled = !undoable;
  ui.stop.disabled = running ? state.run.cancelling : !branching || state.branch.stopped;
  ui.newSession.disabled = state.undoing || (state.sessionId === null && state.steps.length === 0 && !running);
  ui.output.setAttribute("aria-busy", String(running || state.undoing));
}

// When the focused button turns disabled, focus would fall back to the page: move it
// to the first of `buttons` that can be pressed now.
function focusFirstEnabled(...buttons) {
  buttons.find((button) => !button.disabled)?.focus();
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

// The last words of `text`, from a word start, for a caption.
function excerpt(text) {
  const context = text.trimEnd();
  return context.length > 48 ? `…${context.slice(-48).replace(/^\S*\s/, "")}` : context;
}

// The panel shows the step the reader picked; else, while a run is writing, its
// latest step; else, when the idle session has context, the next word (a peek).
function renderDistribution() {
  const index = state.selected ?? state.steps.length - 1;
  const step = state.steps[index];
  if (state.marked) {
    state.marked.classList.remove("selected");
    state.marked.removeAttribute("aria-current");
    state.marked = null;
  }
  const peek = state.run === null ? state.peek : null;
  ui.followLatest.hidden = state.selected === null;
  ui.followLatest.textContent = peek ? "Next word" : "Latest";
  ui.followLatest.setAttribute("aria-label", peek ? "Next word" : "Latest word");
  ui.followLatest.title = peek ? "Show the next word's distribution again" : "Follow the newest word again";
  if (state.selected === null && peek) {
    renderPeek(peek);
    return;
  }
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

  ui.probsContext.replaceChildren(
    `Word ${index + 1}: after “${excerpt(step.before)}” the model drew “`,
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

function renderPeek(peek) {
  ui.probsContext.replaceChildren(
    Object.assign(document.createElement("strong"), { textContent: "Next word" }),
    `, not drawn yet: after “${excerpt(state.tail)}” the model would choose from these.`,
  );
  ui.bars.replaceChildren(...peek.top.map(barRow));
  ui.bars.dataset.step = "next";
  ui.probsNote.textContent = peek.greedy
    ? "Temperature 0 is greedy: Continue takes the likeliest word it may draw. Shares at temperature 1."
    : `Probabilities at temperature ${peek.temperature}, before top-k and top-p. Peeking changes nothing.`;
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
  ui.tokenCount.textContent = String(run.call.generated + run.tokens);
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
      run.call.text += message.text;
      schedulePaint(); // the words go in as they come; bars and numbers once per frame
      break;
    }
    case "done":
      finishRun(message);
      break;
    case "error":
      if (message.code === "session_not_found") forgetSession(); // expired or deleted
      if (message.code === "unauthorized") {
        message = { ...message, message: `${message.message} Enter a key under Connection.` };
      }
      failRun(message);
      break;
    default:
      break;
  }
}

// --- the session, as the server holds it ------------------------------------------

// No session (yet, or any more): nothing to continue, undo, fork or peek at.
function forgetSession() {
  state.sessionId = null;
  state.sessionTokens = 0;
  state.rewindPoints = 0;
  state.calls = [];
  state.peek = null;
  state.ticket += 1;
  ui.sessionId.textContent = "—";
  ui.sessionId.title = "";
}

function setSessionInfo(info) {
  state.sessionTokens = info.tokens;
  state.rewindPoints = info.rewind_points;
}

function sessionPath(id) {
  return `v1/sessions/${encodeURIComponent(id)}`;
}

// The temperature to peek at: the control's, except that below MIN_TEMPERATURE
// generation is greedy and its logprobs are taken at temperature 1, as the peek's are.
function peekTemperature() {
  const field = ui.temperature.value.trim();
  const value = field === "" ? Number.NaN : Number(field);
  if (value >= 0 && value < MIN_TEMPERATURE) return { temperature: 1, greedy: true };
  return { temperature: value >= MIN_TEMPERATURE && value <= 100 ? value : 1, greedy: false };
}

// After anything that leaves the session idle: what the server holds now (its
// context length, how many calls Undo can take back) and the next word, for the
// panel. `info: false` asks only for the next word; `quiet` leaves the error panel
// to the failure that came before.
async function refreshSession({ info = true, quiet = false } = {}) {
  const id = state.sessionId;
  if (id === null || state.run !== null || state.undoing) return;
  const ticket = ++state.ticket;
  const { temperature, greedy } = peekTemperature();
  const [about, next] = await Promise.all([
    info ? request(sessionPath(id)) : null,
    request(`${sessionPath(id)}/next?top=${TOP_N}&temperature=${temperature}`),
  ]);
  if (ticket !== state.ticket) return; // the session moved on meanwhile
  if (about?.body) setSessionInfo(about.body);
  state.peek = next.body ? { ...next.body, greedy } : null;
  // A session with no next word to peek at (nothing fed yet) is no error.
  const error = about?.error ?? (next.error?.code === "session_empty" ? null : next.error);
  if (error?.code === "session_not_found") forgetSession();
  if (error && !quiet) showError(error);
  syncButtons();
  renderDistribution();
}

async function deleteSession(id) {
  const { error } = await request(sessionPath(id), { method: "DELETE" });
  if (error && error.status !== 404) showError(error);
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

// The server seeds each request afresh; the same seed again would replay the same
// draws, so each later request in the session uses the next seed (still reproducible).
function shiftSeed(message) {
  state.continuations += 1;
  if (message.seed !== undefined) message.seed += state.continuations;
}

function startRun({ fresh }) {
  clearError();
  const params = readParams();
  if (!params) return;
  discardBranch(); // its endings are of the call this run follows
  const prompt = fresh ? ui.prompt.value : "";
  // Where this call's words begin on the page, so that Undo can take exactly them back.
  const call = {
    mark: fresh ? 0 : ui.output.childNodes.length,
    steps: fresh ? 0 : state.steps.length,
    tail: fresh ? "" : state.tail,
    generated: fresh ? 0 : state.generated,
    prompt,
    text: "", // what it generated (the prompt not included)
    words: 0,
    finish: null,
  };
  state.ticket += 1; // the session moves on: a peek still on its way is stale
  state.peek = null;
  if (fresh) {
    closeSocket();
    forgetSession();
    state.continuations = 0;
    state.generated = 0;
    resetOutput(prompt);
  } else {
    state.selected = null;
    renderDistribution();
  }
  const message = { type: "generate", prompt, logprobs: TOP_N, ...params };
  if (!fresh) {
    message.session_id = state.sessionId;
    shiftSeed(message);
  }
  const refocus = document.activeElement === ui.generate || document.activeElement === ui.continue;
  state.run = { message, call, sentAt: performance.now(), firstAt: null, lastAt: null, tokens: 0, cancelling: false };
  ui.tokenCount.textContent = String(state.generated);
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
  if (stopHadFocus) focusFirstEnabled(ui.continue, ui.generate);
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
  const { call } = run;
  call.words = used;
  call.finish = reason;
  state.generated = call.generated + used;
  const after = message.usage?.session_tokens;
  if (after !== undefined) {
    if (after > state.sessionTokens) state.calls.push(call); // saved: Undo can take it back
    state.sessionTokens = after;
  }
  endRun();
  renderDistribution();
  refreshSession();
}

function failRun(error) {
  showError(error);
  const run = state.run;
  if (run) {
    state.generated = run.call.generated + run.tokens;
    ui.finish.textContent = "error";
    setRunState("Failed: see the message above", "error");
    endRun();
    refreshSession({ quiet: true }); // the call may or may not be in the session
  }
}

function stopRun() {
  const run = state.run;
  if (!run) {
    stopBranch();
    return;
  }
  if (run.cancelling) return;
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

// --- undo ------------------------------------------------------------------------

async function undo() {
  const call = state.calls.at(-1);
  const id = state.sessionId;
  if (!call || id === null || !isIdle()) return;
  const hadFocus = document.activeElement === ui.undo;
  clearError();
  discardBranch();
  state.undoing = true;
  state.ticket += 1; // answers about the session before the rewind are stale
  state.peek = null;
  setRunState("Undoing the last call…", "busy");
  syncButtons();
  const { body, error } = await request(`${sessionPath(id)}/rewind`, { method: "POST", json: { turns: 1 } });
  state.undoing = false;
  if (error) {
    showError(error);
    setRunState("Undo failed: see the message above", "error");
    if (error.code === "session_not_found") forgetSession();
  } else {
    state.calls.pop();
    takeBack(call);
    setSessionInfo(body);
    setRunState(`Undone: back to ${state.generated} word${state.generated === 1 ? "" : "s"}`, "done");
  }
  syncButtons();
  renderDistribution();
  // After a failure, how many calls the server can still undo (none, after
  // rewind_too_far); after an undo, the next word from the earlier state.
  refreshSession(error ? { quiet: true } : { info: false });
  if (hadFocus) focusFirstEnabled(ui.undo, ui.continue, ui.generate);
}

// Take the words of `call` off the page: out of the output, the steps and the figures.
function takeBack(call) {
  while (ui.output.childNodes.length > call.mark) ui.output.lastChild.remove();
  if (ui.output.childNodes.length === 0) ui.output.append(placeholder());
  state.steps.length = call.steps;
  state.tail = call.tail;
  state.selected = null;
  state.generated = call.generated;
  const previous = state.calls.at(-1);
  ui.tokenCount.textContent = String(state.generated);
  ui.tps.textContent = "—";
  ui.ttft.textContent = "—";
  ui.finish.textContent = previous?.finish ?? "—";
  ui.finish.title = previous ? FINISH_TEXT[previous.finish] ?? previous.finish : "";
  ui.scroller.scrollTop = ui.scroller.scrollHeight;
}

// --- another ending: a fork of the session, its last call written again ---------------

async function tryAnotherEnding() {
  const call = state.calls.at(-1);
  const source = state.sessionId;
  if (!call || source === null || !isIdle()) return;
  const hadFocus = document.activeElement === ui.anotherEnding;
  clearError();
  const params = readParams();
  if (!params) return;
  discardBranch(); // two endings at a time: a new one replaces the last
  const message = { prompt: call.prompt, ...params };
  shiftSeed(message);
  const branch = {
    call, // the call whose ending is written again: ending A
    id: null, // the fork's session id
    text: "",
    words: 0,
    finish: null,
    running: true,
    stopped: false,
    paintQueued: false,
    abort: new AbortController(),
  };
  state.branch = branch;
  ui.endings.hidden = false;
  renderEndings();
  syncButtons();
  if (hadFocus) ui.stop.focus();
  ui.endings.scrollIntoView({ block: "nearest" });
  const { signal } = branch.abort;
  try {
    const fork = await request(`${sessionPath(source)}/fork`, { method: "POST", signal });
    if (fork.error) throw fork.error;
    branch.id = fork.body.session_id;
    renderEndings();
    // The fork is the session as it is now; one call back, it is where ending A began.
    const back = await request(`${sessionPath(branch.id)}/rewind`, { method: "POST", json: { turns: 1 }, signal });
    if (back.error) throw back.error;
    await streamGenerate({ ...message, session_id: branch.id }, { signal, onEvent: (event) => branchEvent(branch, event) });
    if (branch.finish === null) throw { code: "connection_lost", message: "The stream ended before its done event." };
  } catch (error) {
    if (branch.stopped) {
      branch.finish = "cancelled";
    } else {
      branch.finish = "error";
      if (state.branch === branch) showError(typeof error.code === "string" ? error : networkError(error));
    }
  }
  branch.running = false;
  if (state.branch !== branch) return; // closed meanwhile
  const stopHadFocus = document.activeElement === ui.stop;
  renderEndings();
  syncButtons();
  if (stopHadFocus) focusFirstEnabled(ui.anotherEnding, ui.generate);
}

function branchEvent(branch, event) {
  if (event.type === "token") {
    branch.text += event.text;
    branch.words += event.count ?? 1;
  } else if (event.type === "done") {
    branch.finish = event.finish_reason;
    branch.words = event.usage?.completion_tokens ?? branch.words;
  }
  if (branch.paintQueued) return;
  branch.paintQueued = true;
  requestAnimationFrame(() => {
    branch.paintQueued = false;
    if (state.branch === branch) renderEndings();
  });
}

// Stop the fork's generation: the server stops within a step and saves what it wrote.
function stopBranch() {
  const branch = state.branch;
  if (!branch?.running || branch.stopped) return;
  branch.stopped = true;
  branch.abort.abort();
  renderEndings();
  syncButtons();
}

// Close the endings (they compare the session's last call, which is about to change).
// A finished fork is deleted; one that was stopped or is still writing is left to
// expire, as the server saves it as it stops and would refuse a delete meanwhile.
function discardBranch() {
  const branch = state.branch;
  if (!branch) return;
  state.branch = null;
  ui.endings.hidden = true;
  if (branch.running) {
    branch.stopped = true;
    branch.abort.abort();
  } else if (branch.id !== null && !branch.stopped) {
    deleteSession(branch.id);
  }
}

function renderEndings() {
  const branch = state.branch;
  if (!branch) return;
  const { call } = branch;
  ui.endingsStart.textContent = call.prompt
    ? `Both endings start from the prompt “${excerpt(call.prompt)}”.`
    : `Both endings continue “${excerpt(call.tail)}”.`;
  paintEnding(ui.ending.a, { id: state.sessionId, text: call.text, words: call.words, finish: call.finish });
  paintEnding(ui.ending.b, {
    id: branch.id,
    text: branch.text,
    words: branch.words,
    finish: branch.finish ?? (branch.stopped ? "stopping…" : "writing…"),
    writing: branch.running,
  });
  const words = `${branch.words} word${branch.words === 1 ? "" : "s"}`;
  let status;
  if (branch.running) status = branch.stopped ? "Stopping ending B…" : branch.id ? "Writing ending B…" : "Forking the session…";
  else if (branch.finish === "cancelled") status = `Ending B stopped after ${words}.`;
  else if (branch.finish === "error") status = "Ending B failed: see the message above.";
  else status = `Ending B done: ${words}, ${FINISH_TEXT[branch.finish] ?? branch.finish}.`;
  ui.endingsState.textContent = status;
}

function paintEnding(view, { id, text, words, finish, writing = false }) {
  view.session.textContent = id ?? "—";
  view.session.title = id ?? "";
  view.words.textContent = String(words);
  view.finish.textContent = finish;
  const body = text.trimStart();
  if (body) view.text.textContent = body;
  else view.text.replaceChildren(Object.assign(document.createElement("span"), {
    className: "placeholder",
    textContent: writing ? "Writing…" : "No words.",
  }));
}

// --- a new session -----------------------------------------------------------------

async function newSession() {
  const old = state.sessionId;
  const wasRunning = state.run !== null;
  discardBranch();
  closeSocket();
  state.run = null;
  forgetSession();
  state.generated = 0;
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
    await deleteSession(old);
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
  const { body, error } = await request("v1/models");
  if (error) {
    const locked = error.status === 401 || error.status === 403;
    ui.modelName.textContent = locked ? "API key needed" : error.status ? "unavailable" : "offline";
    ui.modelBadge.dataset.tone = "error";
    showError(locked ? { ...error, message: `${error.message} Enter a key under Connection.` } : error);
    return;
  }
  const model = body.data?.[0];
  ui.modelName.textContent = model ? `${model.id} · ${model.version ?? ""}`.replace(/ · $/, "") : "no model";
  ui.modelBadge.dataset.tone = model ? "ok" : "error";
}

function setKey(key) {
  storeKey(key);
  if (!state.run) closeSocket(); // the next request connects with the new key
  clearError();
  loadModel();
}

// --- wiring --------------------------------------------------------------------

ui.generate.addEventListener("click", () => startRun({ fresh: true }));
ui.continue.addEventListener("click", () => startRun({ fresh: false }));
ui.undo.addEventListener("click", undo);
ui.anotherEnding.addEventListener("click", tryAnotherEnding);
ui.stop.addEventListener("click", stopRun);
ui.newSession.addEventListener("click", newSession);
ui.endingsClose.addEventListener("click", () => {
  discardBranch();
  syncButtons();
  focusFirstEnabled(ui.anotherEnding, ui.generate);
});
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
    if (isIdle()) startRun({ fresh: true });
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && (state.run || state.branch?.running)) {
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
// A new temperature, once set, is a new next-word distribution.
for (const el of [ui.temperature, ui.temperatureRange]) {
  el.addEventListener("change", () => refreshSession({ info: false }));
}
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
