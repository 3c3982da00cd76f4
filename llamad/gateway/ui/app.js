// llamad's status page: polls the admin routes (which never wake a model) and shows what they say.
// Everything that comes from the server is put on the page as text (textContent), never as HTML.
"use strict";

(() => {
  const KEY_STORE = "llamad.key";
  const POLL_MS = 2000;
  const KEYS_EVERY = 5; // polls between two reads of the keys
  const LOG_LINES = 1000;
  const $ = (id) => document.getElementById(id);

  let key = sessionStorage.getItem(KEY_STORE) || "";
  let timer = null;
  let polls = 0;
  let router = false; // llamad answers /models/load and /models/unload (several models)
  let logModel = "";
  let logOffset = null;
  let logLines = [];
  let playing = null; // the AbortController of the stream running in the playground
  const rows = new Map(); // model id -> its row of the models table

  // --- requests -------------------------------------------------------------------------------------

  class ApiFailure extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  async function api(path, body) {
    const response = await fetch(path, {
      method: body === undefined ? "GET" : "POST",
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
    });
    let data = null;
    try {
      data = await response.json();
    } catch (e) {
      data = null;
    }
    if (!response.ok) throw failure(response.status, data);
    return data;
  }

  function failure(status, data) {
    const error = data && typeof data.error === "object" && data.error !== null ? data.error : {};
    const message = typeof error.message === "string" ? error.message : "HTTP " + status;
    return new ApiFailure(status, typeof error.code === "string" ? error.code : "", message);
  }

  // --- small helpers --------------------------------------------------------------------------------

  function text(tag, value, className) {
    const node = document.createElement(tag);
    node.textContent = value === null || value === undefined ? "" : String(value);
    if (className) node.className = className;
    return node;
  }

  function setText(node, value) {
    const shown = value === null || value === undefined ? "" : String(value);
    if (node.textContent !== shown) node.textContent = shown;
  }

  function bytes(n) {
    if (typeof n !== "number" || !isFinite(n)) return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return (i === 0 ? String(n) : n.toFixed(1)) + " " + units[i];
  }

  function ago(seconds) {
    if (typeof seconds !== "number") return "";
    if (seconds < 60) return Math.round(seconds) + " s ago";
    if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
    if (seconds < 86400) return (seconds / 3600).toFixed(1) + " h ago";
    return (seconds / 86400).toFixed(1) + " d ago";
  }

  function seconds(value) {
    return typeof value === "number" ? value.toFixed(3) + " s" : "";
  }

  function clock(iso) {
    const when = new Date(iso);
    return isNaN(when.getTime()) ? String(iso) : when.toLocaleTimeString([], { hour12: false });
  }

  function kvText(kv) {
    if (kv === null || kv === undefined) return "";
    if (typeof kv !== "object") return String(kv);
    if ("slots" in kv || "tokens" in kv || "bytes" in kv) {
      const parts = [];
      if ("slots" in kv) parts.push(kv.slots + " slots");
      if ("tokens" in kv) parts.push(kv.tokens + " tokens");
      if ("bytes" in kv) parts.push(bytes(kv.bytes));
      return parts.join(", ");
    }
    return JSON.stringify(kv);
  }

  function fillSelect(select, ids) {
    const current = Array.from(select.options, (o) => o.value);
    if (current.length === ids.length && current.every((id, i) => id === ids[i])) return;
    const chosen = select.value;
    select.replaceChildren(...ids.map((id) => {
      const option = text("option", id);
      option.value = id;
      return option;
    }));
    if (ids.includes(chosen)) select.value = chosen;
  }

  // --- signing in -----------------------------------------------------------------------------------

  function showLogin(why, askKey) {
    setText($("login-why"), why);
    $("key-form").hidden = !askKey;
    $("login").hidden = false;
    $("main").hidden = true;
    $("forget").hidden = !key;
    $("key").focus();
  }

  function signedIn() {
    $("login").hidden = true;
    $("main").hidden = false;
    $("forget").hidden = !key;
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    key = $("key").value.trim();
    $("key").value = "";
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
    restart();
  });

  $("forget").addEventListener("click", () => {
    key = "";
    sessionStorage.removeItem(KEY_STORE);
    stop();
    showLogin("The key is forgotten: enter one to go on.", true);
  });

  // --- models ---------------------------------------------------------------------------------------

  function modelRow(id) {
    let row = rows.get(id);
    if (row) return row;
    const tr = document.createElement("tr");
    const name = document.createElement("td");
    const nameText = text("span", id, "model-id");
    const aliases = text("div", "", "aliases");
    name.append(nameText, aliases);
    const cells = {};
    for (const field of ["state", "reason", "memory", "in_flight", "queued", "last_used", "kv"]) {
      cells[field] = text("td", "", field === "kv" ? "kv" : "");
    }
    const meter = document.createElement("meter");
    meter.min = 0;
    const memoryText = text("span", "");
    cells.memory.append(memoryText, meter);
    const badge = text("span", "", "state");
    cells.state.append(badge);
    const actions = document.createElement("td");
    actions.className = "actions";
    const load = text("button", "Load");
    const unload = text("button", "Unload");
    const restartButton = text("button", "Restart");
    for (const button of [load, unload, restartButton]) button.type = "button";
    load.addEventListener("click", () => act(id, "load"));
    unload.addEventListener("click", () => act(id, "unload"));
    restartButton.addEventListener("click", () => act(id, "restart"));
    actions.append(load, unload, restartButton);
    tr.append(name, cells.state, cells.reason, cells.memory, cells.in_flight, cells.queued, cells.last_used,
      cells.kv, actions);
    tr.dataset.model = id;
    $("models").tBodies[0].append(tr);
    row = { tr, aliases, cells, badge, meter, memoryText, load, unload, restart: restartButton };
    rows.set(id, row);
    return row;
  }

  function showModels(snapshot) {
    const models = snapshot.models || {};
    const budget = typeof snapshot.budget === "number" ? snapshot.budget : null;
    router = snapshot.router === true;
    const ids = Object.keys(models);
    let anyKv = false;
    for (const id of ids) {
      const model = models[id] || {};
      const row = modelRow(id);
      const state = typeof model.state === "string" ? model.state : "";
      setText(row.badge, state);
      row.badge.className = "state state-" + state.replace(/[^a-z]/g, "");
      setText(row.aliases, Array.isArray(model.aliases) && model.aliases.length
        ? "also: " + model.aliases.join(", ") : "");
      setText(row.cells.reason, model.waiting || model.reason || "");
      const memory = typeof model.memory === "number" ? model.memory : 0;
      setText(row.memoryText, memory ? bytes(memory) + (budget ? " of " + bytes(budget) : "") : "");
      row.meter.hidden = !(memory && budget);
      if (budget) {
        row.meter.max = budget;
        row.meter.value = memory;
      }
      setText(row.cells.in_flight, model.in_flight);
      setText(row.cells.queued, model.queued);
      setText(row.cells.last_used, model.in_flight ? "now" : ago(model.idle_seconds));
      if ("kv" in model) anyKv = true;
      setText(row.cells.kv, kvText(model.kv));
      row.load.hidden = row.unload.hidden = !router;
      row.load.disabled = !["stopped", "failed"].includes(state);
      row.unload.disabled = !["starting", "ready", "backoff"].includes(state);
      row.restart.disabled = !["starting", "ready", "backoff", "failed"].includes(state);
    }
    for (const [id, row] of rows) {
      if (!(id in models)) {
        row.tr.remove();
        rows.delete(id);
      }
    }
    $("models").classList.toggle("with-kv", anyKv);
    $("force-label").hidden = !router;
    const fleet = snapshot.fleet || {};
    const memoryText = budget !== null
      ? "Memory: " + bytes(fleet.held || 0) + " held of a " + bytes(budget) + " budget"
      : router ? "Memory: no budget set" : "";
    setText($("memory-text"), memoryText);
    const memoryMeter = $("memory-meter");
    memoryMeter.hidden = budget === null;
    if (budget !== null) {
      memoryMeter.max = budget;
      memoryMeter.value = fleet.held || 0;
    }
    const summary = [snapshot.status, snapshot.state === "fleet" ? ids.length + " models" : snapshot.model]
      .filter(Boolean).join(" \u00b7 ");
    setText($("summary"), summary + (snapshot.reason ? " \u00b7 " + snapshot.reason : ""));
    fillSelect($("log-model"), ids);
    fillSelect($("play-model"), ids);
    if (!logModel && ids.length) chooseLog($("log-model").value);
  }

  async function act(id, action) {
    const result = $("action-result");
    const force = $("force").checked;
    const what = action === "unload" && force ? "unload (force)" : action;
    setText(result, what + " " + id + ": ...");
    try {
      if (action === "restart") await api("/admin/restart?model=" + encodeURIComponent(id), {});
      else if (action === "load") await api("/models/load", { model: id });
      else await api("/models/unload", { model: id, force });
      setText(result, what + " " + id + ": ok");
    } catch (e) {
      setText(result, what + " " + id + ": " + e.message);
    }
    pollStatus().catch(() => {});
  }

  // --- the log --------------------------------------------------------------------------------------

  function chooseLog(id) {
    logModel = id;
    logOffset = null;
    logLines = [];
    setText($("log"), "");
  }

  $("log-model").addEventListener("change", (event) => chooseLog(event.target.value));
  $("log-clear").addEventListener("click", () => {
    logLines = [];
    setText($("log"), "");
  });

  function logLine(line) {
    if (line.startsWith("{")) {
      try {
        const entry = JSON.parse(line);
        if (entry && typeof entry.message === "string") return (entry.time || "") + " " + entry.message;
      } catch (e) {
        // not JSON after all: shown as it is
      }
    }
    return line;
  }

  async function pollLog() {
    if (!logModel) return;
    const model = logModel;
    const after = logOffset === null ? "" : "&after=" + logOffset;
    const answer = await api("/admin/logs?model=" + encodeURIComponent(model) + after);
    if (model !== logModel) return; // another model was chosen meanwhile
    logOffset = answer.offset;
    if (!answer.lines.length) return;
    logLines = logLines.concat(answer.lines.map(logLine)).slice(-LOG_LINES);
    const pre = $("log");
    pre.textContent = logLines.join("\n");
    if ($("log-follow").checked) pre.scrollTop = pre.scrollHeight;
  }

  // --- recent requests and keys ---------------------------------------------------------------------

  function showRequests(answer) {
    const body = $("requests").tBodies[0];
    body.replaceChildren(...answer.requests.map((r) => {
      const tr = document.createElement("tr");
      tr.append(text("td", clock(r.time)), text("td", r.key_id === null ? "-" : r.key_id),
        text("td", r.model === null ? "-" : r.model), text("td", r.route),
        text("td", r.status, r.status >= 400 ? "bad" : ""), text("td", r.prompt_tokens, "num"),
        text("td", r.completion_tokens, "num"), text("td", seconds(r.duration), "num"));
      return tr;
    }));
  }

  function limits(k) {
    const parts = [];
    if (k.rate_limit !== null) parts.push(k.rate_limit + " requests/min");
    if (k.max_concurrent !== null) parts.push(k.max_concurrent + " at once");
    if (k.priority !== null) parts.push("priority " + k.priority);
    if (k.expires !== null) parts.push("expires " + k.expires);
    return parts.join(", ") || "none";
  }

  function quota(k) {
    const parts = [];
    const used = k.tokens_used;
    if (k.tokens_per_minute !== null) parts.push(used.minute + " of " + k.tokens_per_minute + " tokens this minute");
    if (k.tokens_per_day !== null) parts.push(used.day + " of " + k.tokens_per_day + " tokens today");
    return parts.join(", ") || "no token quota";
  }

  function showKeys(answer) {
    setText($("keys-note"), answer.auth ? ""
      : "Auth is off: no key is asked for (the admin routes answer loopback only).");
    const body = $("keys").tBodies[0];
    body.replaceChildren(...answer.keys.map((k) => {
      const tr = document.createElement("tr");
      tr.append(text("td", k.id), text("td", k.roles.join(", ")),
        text("td", k.models.length ? k.models.join(", ") : "all"), text("td", limits(k)), text("td", quota(k)),
        text("td", k.in_flight, "num"));
      return tr;
    }));
  }

  // --- the playground -------------------------------------------------------------------------------

  $("play-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!playing) play().catch(() => {});
  });

  $("play-stop").addEventListener("click", () => {
    if (playing) playing.abort();
  });

  async function play() {
    const answer = $("play-answer");
    const status = $("play-status");
    const model = $("play-model").value;
    const maxTokens = parseInt($("play-max").value, 10) || 64;
    answer.textContent = "";
    setText(status, "waiting for " + model + " ...");
    playing = new AbortController();
    $("play-send").disabled = true;
    $("play-stop").disabled = false;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(true),
        credentials: "omit",
        cache: "no-store",
        signal: playing.signal,
        body: JSON.stringify({
          model, stream: true, max_tokens: maxTokens,
          messages: [{ role: "user", content: $("play-message").value }],
        }),
      });
      if (!response.ok) {
        let data = null;
        try {
          data = await response.json();
        } catch (e) {
          data = null;
        }
        throw failure(response.status, data);
      }
      setText(status, "streaming ...");
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, end).replace(/\r$/, "");
          buffer = buffer.slice(end + 1);
          onEvent(line, answer);
        }
      }
      setText(status, "done");
    } catch (e) {
      setText(status, e.name === "AbortError" ? "stopped" : "error: " + e.message);
    } finally {
      playing = null;
      $("play-send").disabled = false;
      $("play-stop").disabled = true;
    }
  }

  function onEvent(line, answer) {
    if (!line.startsWith("data:")) return; // comments (": loading") and blank lines
    const data = line.slice(5).trim();
    if (!data || data === "[DONE]") return;
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch (e) {
      return;
    }
    if (chunk.error) throw failure(0, chunk);
    const choice = Array.isArray(chunk.choices) ? chunk.choices[0] : null;
    const delta = choice && choice.delta ? choice.delta.content : null;
    if (typeof delta === "string" && delta) answer.append(document.createTextNode(delta));
  }

  // --- polling --------------------------------------------------------------------------------------

  async function pollStatus() {
    showModels(await api("/admin/status"));
  }

  async function tick() {
    timer = null;
    if (!document.hidden) {
      try {
        await pollStatus();
      } catch (e) {
        if (e instanceof ApiFailure && (e.status === 401 || e.status === 403)) {
          const why = e.code === "insufficient_role" ? "This key does not have the admin role: " + e.message
            : e.code === "forbidden" ? "Auth is off, so this page answers loopback only: " + e.message
              : key ? "The key was refused: " + e.message : "This llamad asks for an API key with the admin role.";
          showLogin(why, e.code !== "forbidden");
          return; // no more polls until a key is entered
        }
        setText($("updated"), "not updated: " + e.message);
        schedule();
        return;
      }
      signedIn();
      polls += 1;
      const reads = [api("/admin/requests").then(showRequests), pollLog()];
      if (polls % KEYS_EVERY === 1) reads.push(api("/admin/keys").then(showKeys));
      const results = await Promise.allSettled(reads);
      const failed = results.find((r) => r.status === "rejected");
      setText($("updated"), failed ? "not all updated: " + failed.reason.message
        : "updated " + new Date().toLocaleTimeString([], { hour12: false }));
    }
    schedule();
  }

  function schedule() {
    if (timer === null) timer = setTimeout(tick, POLL_MS);
  }

  function stop() {
    if (timer !== null) clearTimeout(timer);
    timer = null;
  }

  function restart() {
    stop();
    polls = 0;
    tick();
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && timer !== null) restart();
  });

  restart();
})();
