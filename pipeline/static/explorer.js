// shortlist explorer: looks at one user's recommendations through the service's own HTTP API.
// Plain JavaScript, no build step. Every call goes through api(), with the bearer key when the service
// asks for one (401): the key is asked once and kept in this closure only (no storage, no cookies).
"use strict";

(() => {
  const API = {
    ready: "/readyz",
    recommend: "/recommend",
    events: "/events",
    // 50: the 20 shown, and the titles of the older items that `because` may name
    history: (userId) => `/users/${encodeURIComponent(userId)}/history?limit=50`,
    search: (query) => `/items/search?q=${encodeURIComponent(query)}&limit=20`,
  };
  const STAGES = ["retrieve", "filter", "plan", "rerank", "blend"];

  let apiKey = null; // the API key, in memory only
  let keyRequest = null; // the pending request for a key (concurrent 401s share it)
  const state = {
    mode: "known", // "known": a user id; "new": a history kept in this page
    userId: null,
    localHistory: [], // new user: [{item_id, title, genres}], oldest first
    titles: new Map(), // item id -> title, from everything the API returned
    sequence: 0, // the latest /recommend request; older answers are dropped
    pending: 0,
  };

  const $ = (id) => document.getElementById(id);

  class ApiError extends Error {
    constructor(status, body) {
      super(describeError(status, body));
      this.status = status;
    }
  }

  function describeError(status, body) {
    const detail = body && body.detail;
    if (Array.isArray(detail)) {
      return `${status}: ` + detail.map((e) => `${(e.loc || []).slice(1).join(".") || "body"}: ${e.msg}`).join("; ");
    }
    return `${status}: ${typeof detail === "string" ? detail : "request failed"}`;
  }

  function askForKey(message) {
    if (!keyRequest) {
      keyRequest = new Promise((resolve) => {
        const form = $("auth");
        $("auth-error").textContent = message || "";
        $("auth-key").value = "";
        form.hidden = false;
        $("auth-key").focus();
        form.onsubmit = (event) => {
          event.preventDefault();
          const value = $("auth-key").value.trim();
          if (!value) return;
          apiKey = value;
          form.hidden = true;
          keyRequest = null;
          resolve();
        };
      });
    }
    return keyRequest;
  }

  async function api(method, path, body) {
    busy(+1);
    try {
      for (let attempt = 0; attempt < 3; attempt += 1) {
        const headers = { Accept: "application/json" };
        if (body !== undefined) headers["Content-Type"] = "application/json";
        if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
        const response = await fetch(path, {
          method, headers, body: body === undefined ? undefined : JSON.stringify(body),
          cache: "no-store", credentials: "omit",
        });
        if (response.status === 401) {
          const refused = apiKey !== null;
          apiKey = null;
          await askForKey(refused ? "That key was refused; try again." : "");
          continue;
        }
        const data = await response.json().catch(() => null);
        if (!response.ok) throw new ApiError(response.status, data);
        return data;
      }
      throw new ApiError(401, { detail: "no accepted API key" });
    } finally {
      busy(-1);
    }
  }

  function busy(delta) {
    state.pending += delta;
    document.body.dataset.busy = state.pending > 0 ? "1" : "0";
  }

  function showError(error) {
    $("error").textContent = error ? String(error.message || error) : "";
  }

  // ---- small DOM helpers (text only: titles never become markup) ----------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "class") node.className = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else if (name === "onclick") node.addEventListener("click", value);
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function number(value, digits = 3) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
  }

  function titleOf(itemId) {
    return state.titles.get(itemId) || `#${itemId}`;
  }

  function remember(items) {
    for (const item of items || []) if (item.title) state.titles.set(item.item_id, item.title);
  }

  function sources(names) {
    return el("span", {}, ...(names || []).map((name) => el("span", { class: "src" }, name)));
  }

  function addButton(item, label) {
    return el("button", {
      class: "add", type: "button", title: "add to the history", "aria-label": `add ${item.title || item.item_id}`,
      dataset: { itemId: String(item.item_id) }, onclick: () => addToHistory(item),
    }, label || "+");
  }

  // ---- the model ---------------------------------------------------------------------------------
  async function loadModel() {
    try {
      const response = await fetch(API.ready, { cache: "no-store", credentials: "omit" });
      const body = await response.json();
      if (!response.ok) {
        $("model").textContent = `not ready yet (${body.status}); retrying…`;
        setTimeout(loadModel, 1000);
        return;
      }
      const m = body.model || {};
      $("model").textContent = `retriever ${m.retriever} · ${m.items} items · ${m.users} users · ` +
        (m.reranker ? `reranker on${m.blend ? " (blended)" : ""}` : "no reranker: retrieval order") +
        (m.version ? ` · ${m.version}` : "");
    } catch (error) {
      $("model").textContent = "the service does not answer";
    }
  }

  // ---- users and histories ------------------------------------------------------------------------
  async function pickUser(userId) {
    state.mode = "known";
    state.userId = userId;
    showError(null);
    try {
      await Promise.all([loadHistory(), recommend()]);
    } catch (error) {
      showError(error);
    }
  }

  function startNewUser() {
    state.mode = "new";
    state.userId = null;
    state.localHistory = [];
    showError(null);
    renderHistory(state.localHistory.slice().reverse(), 0);
    recommend().catch(showError);
  }

  async function loadHistory() {
    if (state.mode === "new") {
      renderHistory(state.localHistory.slice().reverse(), state.localHistory.length);
      return;
    }
    const body = await api("GET", API.history(state.userId));
    remember(body.items);
    renderHistory(body.items, body.history_length, body.known);
  }

  function renderHistory(items, total, known = true) {
    $("history-count").textContent = known ? `(${total} items, newest first)` : "(unknown user: popular items)";
    $("history-list").replaceChildren(...items.slice(0, 20).map((item) => el("li", { dataset: { itemId: String(item.item_id) } },
      el("span", { class: "what" }, item.title || `#${item.item_id}`, " ",
        el("span", { class: "genres" }, (item.genres || []).join(", "))))));
  }

  async function addToHistory(item) {
    showError(null);
    state.titles.set(item.item_id, item.title || `#${item.item_id}`);
    try {
      if (state.mode === "new") {
        state.localHistory.push({ item_id: item.item_id, title: item.title, genres: item.genres || [] });
      } else if (state.userId !== null) {
        await api("POST", API.events, { user_id: state.userId, item_id: item.item_id });
      } else {
        showError("pick a user first");
        return;
      }
      await Promise.all([loadHistory(), recommend()]);
    } catch (error) {
      showError(error);
    }
  }

  async function search(query) {
    showError(null);
    try {
      const body = await api("GET", API.search(query));
      remember(body.items);
      $("search-results").replaceChildren(...body.items.map((item) => el("li", {},
        el("span", { class: "what" }, item.title || `#${item.item_id}`, " ",
          el("span", { class: "genres" }, (item.genres || []).join(", "))),
        addButton(item))));
      if (!body.items.length) $("search-results").replaceChildren(el("li", { class: "muted" }, "no match"));
    } catch (error) {
      showError(error);
    }
  }

  // ---- recommendations ----------------------------------------------------------------------------
  function request() {
    const body = {
      k: Number($("k").value) || 10, budget_ms: Number($("budget").value), include_retrieval: true,
    };
    if (state.mode === "new") body.history = state.localHistory.map((item) => item.item_id);
    else body.user_id = state.userId;
    return body;
  }

  async function recommend() {
    if (state.mode === "known" && state.userId === null) return;
    const sequence = ++state.sequence;
    const result = await api("POST", API.recommend, request());
    if (sequence !== state.sequence) return; // a newer request was sent meanwhile
    remember(result.items);
    remember(result.retrieval);
    render(result);
  }

  function render(result) {
    const retrieval = result.retrieval || [];
    const retrievalRank = new Map(retrieval.map((c) => [c.item_id, c]));
    const finalRank = new Map(result.items.map((item) => [item.item_id, item.rank]));

    $("path").textContent = result.path;
    $("reranked-depth").textContent = String(result.reranked_m);
    const degraded = $("degraded");
    degraded.textContent = result.degraded ? `degraded: ${result.degraded_reason}` : "not degraded";
    degraded.className = `badge ${result.degraded ? "bad" : "ok"}`;
    $("total-ms").textContent = number(result.timings_ms.total, 1);
    $("budget-ms").textContent = number(result.budget_ms, 0);
    renderLatency(result.timings_ms, result.budget_ms);

    $("final-list").replaceChildren(...result.items.map((item) => {
      const found = retrievalRank.get(item.item_id);
      const move = found ? found.rank - item.rank : null;
      const moveCell = move === null ? el("span", { class: "same" }, "new")
        : move > 0 ? el("span", { class: "up" }, `▲${move}`)
          : move < 0 ? el("span", { class: "down" }, `▼${-move}`) : el("span", { class: "same" }, "=");
      const because = (item.because || []).map(titleOf).join(" · ");
      return el("tr", { class: item.reranked ? "reranked" : "", dataset: { itemId: String(item.item_id) } },
        el("td", { class: "num" }, item.rank),
        el("td", { class: "title" }, item.title || `#${item.item_id}`),
        el("td", { class: "num move" }, moveCell),
        el("td", { class: "num" }, number(item.score)),
        el("td", { class: "num" }, number(item.retrieval_score)),
        el("td", { class: "num" }, number(item.rerank_score)),
        el("td", {}, sources(found ? found.sources : [])),
        el("td", { class: "because" }, because ? `because ${because}` : ""),
        el("td", {}, addButton(item)));
    }));

    $("retrieval-list").replaceChildren(...retrieval.map((candidate) => {
      const chosen = finalRank.get(candidate.item_id);
      const classes = [candidate.rank <= result.reranked_m ? "reranked" : "", chosen ? "chosen" : ""].join(" ");
      return el("tr", { class: classes.trim(), dataset: { itemId: String(candidate.item_id) } },
        el("td", { class: "num" }, candidate.rank),
        el("td", {}, candidate.title || `#${candidate.item_id}`),
        el("td", { class: "num" }, number(candidate.score)),
        el("td", {}, sources(candidate.sources)),
        el("td", { class: "num" }, chosen ? String(chosen) : "–"));
    }));
  }

  function renderLatency(timings, budget) {
    const staged = STAGES.reduce((sum, stage) => sum + (timings[stage] || 0), 0);
    const other = Math.max(0, (timings.total || 0) - staged);
    const scale = Math.max(timings.total || 0, budget || 0, 1e-9);
    const parts = [...STAGES.map((stage) => [stage, timings[stage] || 0]), ["other", other]];
    $("latency-bar").replaceChildren(...parts.map(([stage, ms]) => {
      const span = el("span", { class: `stage-${stage}`, title: `${stage}: ${number(ms, 2)} ms` });
      span.style.width = `${(100 * ms) / scale}%`;
      return span;
    }));
    $("budget-mark").style.left = `calc(${(100 * budget) / scale}% - 1px)`;
    $("latency-legend").replaceChildren(...parts.map(([stage, ms]) =>
      el("span", {}, el("i", { class: `stage-${stage}` }), `${stage} ${number(ms, 2)} ms`)));
  }

  // ---- wiring --------------------------------------------------------------------------------------
  function debounce(fn, ms) {
    let timer = null;
    return (...args) => {
      clearTimeout(timer);
      timer = setTimeout(() => fn(...args), ms);
    };
  }

  document.addEventListener("DOMContentLoaded", () => {
    const pickTypedUser = () => {
      const raw = $("user-id").value.trim();
      if (!/^-?\d+$/.test(raw)) {
        showError("a user id is an integer");
        return;
      }
      pickUser(Number.isSafeInteger(Number(raw)) ? Number(raw) : raw);
    };
    $("known-form").addEventListener("submit", (event) => {
      event.preventDefault();
      pickTypedUser();
    });
    for (const radio of document.querySelectorAll('input[name="mode"]')) {
      radio.addEventListener("change", () => {
        const known = $("mode-known").checked;
        $("known-form").hidden = !known;
        $("new-note").hidden = known;
        if (!known) {
          startNewUser();
        } else if ($("user-id").value.trim()) {
          pickTypedUser();
        } else {
          state.mode = "known";
          state.userId = null;
        }
      });
    }
    $("search-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const query = $("search-q").value.trim();
      if (query) search(query);
    });
    const rerun = debounce(() => recommend().catch(showError), 150);
    $("budget").addEventListener("input", () => {
      $("budget-value").textContent = $("budget").value;
      rerun();
    });
    $("k").addEventListener("change", rerun);
    loadModel();
  });
})();
