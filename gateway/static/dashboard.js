// The dashboard's own script: no framework, no build step, nothing loaded from elsewhere.
// It refreshes the page from the documented API every few seconds and drives the two actions
// (the sending switch, retrying a failed message, cancelling one not claimed yet). When the gateway has an API token, it asks for it once
// (at the first 401) and sends it with every request; it is kept in this tab only. Recipients come masked
// by the server (mask=true): the full numbers never reach this page.
"use strict";

(() => {
  const REFRESH_MS = 5000;
  const PAGE_SIZE = 10;
  const MINUTES = 60;
  const TOKEN_KEY = "message-sender.api-token";
  const SVG = "http://www.w3.org/2000/svg";
  const DASH = "—";

  const $ = (selector) => document.querySelector(selector);
  const pages = { sent: { offset: 0, total: 0 }, failed: { offset: 0, total: 0 } };
  let sending = null; // true, false, or null while unknown
  let timer = null;
  let generation = 0;

  // --- formatting ---------------------------------------------------------------------------------

  function number(value, unit) {
    if (value === null || value === undefined || Number.isNaN(Number(value))) return DASH;
    let n = Number(value);
    if (unit === "ms" && n >= 1000) {
      n /= 1000;
      unit = "s";
    }
    const text = n.toLocaleString(undefined, { maximumFractionDigits: Math.abs(n) < 10 ? 2 : 1 });
    return unit ? `${text} ${unit}` : text;
  }

  function ago(iso) {
    const seconds = Math.round((Date.now() - Date.parse(iso)) / 1000);
    if (seconds < 5) return "just now";
    if (seconds < 90) return `${seconds} s ago`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
    if (seconds < 172800) return `${Math.round(seconds / 3600)} h ago`;
    return new Date(iso).toLocaleDateString();
  }

  function clock(iso) {
    const date = new Date(iso);
    const today = date.toDateString() === new Date().toDateString();
    return today
      ? date.toLocaleTimeString(undefined, { hour12: false })
      : date.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium", hour12: false });
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
    for (const child of children) node.append(child);
    return node;
  }

  function timeEl(iso, relative) {
    if (!iso) return document.createTextNode(DASH);
    const node = el("time", { datetime: iso, title: new Date(iso).toLocaleString() });
    node.textContent = relative ? ago(iso) : clock(iso);
    return node;
  }

  function notice(text, isError = false) {
    const box = $("#notice");
    box.textContent = text;
    box.classList.toggle("bad", isError);
  }

  // --- reading the API ----------------------------------------------------------------------------

  async function errorText(response) {
    try {
      return (await response.json()).error.message;
    } catch {
      return `HTTP ${response.status}`;
    }
  }

  async function getJSON(url) {
    const response = await call("GET", url, undefined, !declined);
    if (!response.ok) {
      const error = new Error(`${url.split("?")[0]}: ${await errorText(response)}`);
      error.status = response.status;
      throw error;
    }
    return { body: await response.json(), headers: response.headers };
  }

  function path(object, dotted) {
    return dotted.split(".").reduce((value, key) => (value == null ? undefined : value[key]), object);
  }

  function renderStats(stats) {
    for (const node of document.querySelectorAll("[data-stat]")) {
      const value = path(stats, node.dataset.stat);
      if ("time" in node.dataset) {
        node.textContent = value ? ago(value) : "never";
        if (value) {
          node.setAttribute("datetime", value);
          node.title = new Date(value).toLocaleString();
        }
      } else if (typeof value === "number" || value === null || value === undefined) {
        node.textContent = number(value, node.dataset.unit);
      } else {
        node.textContent = String(value);
      }
    }
    if (typeof stats.sending === "boolean") renderSwitch(stats.sending);
    const breaker = stats.breaker;
    $("#breaker").hidden = !(breaker && (breaker.state === "open" || breaker.state === "half-open"));
    pages.failed.total = Number(path(stats, "counts.failed") || 0);
  }

  function renderSwitch(on) {
    sending = on;
    $("#switch").setAttribute("aria-checked", String(on));
    $("#switch-state").textContent = on ? "On" : "Off";
  }

  let lastSeries = null;

  function renderChart(series) {
    lastSeries = series;
    const box = $("#chart");
    const width = Math.max(280, Math.round(box.clientWidth || 720));
    const height = width < 500 ? 150 : 190;
    const left = 34;
    const bottom = 22;
    const top = 8;
    const plotW = width - left - 4;
    const plotH = height - top - bottom;
    const totals = series.map((m) => m.sent + m.failed);
    const peak = Math.max(0, ...totals);
    const scale = niceCeiling(peak);
    const step = plotW / series.length;
    const y = (v) => top + plotH - (v / scale) * plotH;

    const svg = document.createElementNS(SVG, "svg");
    const sum = series.reduce((a, m) => a + m.sent, 0);
    const failed = series.reduce((a, m) => a + m.failed, 0);
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("role", "img");
    svg.setAttribute(
      "aria-label",
      `${sum} sent and ${failed} failed in the last ${series.length} minutes; at most ${peak} in one minute.`,
    );
    const add = (parent, tag, attrs, text) => {
      const node = document.createElementNS(SVG, tag);
      for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
      if (text !== undefined) node.textContent = text;
      parent.append(node);
      return node;
    };
    for (const v of [0, scale / 2, scale]) {
      add(svg, "line", { x1: left, x2: width, y1: y(v), y2: y(v), class: v ? "grid" : "axis" });
      add(svg, "text", { x: left - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, number(v));
    }
    series.forEach((m, i) => {
      const x = left + i * step;
      const g = add(svg, "g", { class: "minute" });
      const label = clock(m.minute).replace(/:\d\d$/, "");
      add(g, "title", {}, `${label}: ${m.sent} sent, ${m.failed} failed`);
      add(g, "rect", { x, y: top, width: step, height: plotH, class: "hover" });
      const bar = Math.max(step - 2, 1);
      if (m.sent) add(g, "rect", { x: x + 1, y: y(m.sent), width: bar, height: y(0) - y(m.sent), class: "bar-sent" });
      if (m.failed) {
        const h = y(0) - y(m.failed);
        add(g, "rect", { x: x + 1, y: y(m.sent) - h, width: bar, height: h, class: "bar-failed" });
      }
      const minute = new Date(m.minute).getMinutes();
      if (i === series.length - 1 || (minute % 15 === 0 && i < series.length - 4)) {
        const last = i === series.length - 1;
        const attrs = last ? { x: width, "text-anchor": "end" } : { x: x + step / 2, "text-anchor": "middle" };
        add(svg, "text", { ...attrs, y: height - 6, class: "tick" }, last ? "now" : label);
      }
    });
    const legend = el("p", { class: "legend" });
    legend.append(
      el("span", { class: "key sent" }),
      `sent (${number(sum)})`,
      el("span", { class: "key failed" }),
      `failed (${number(failed)})`,
    );
    box.replaceChildren(svg, legend);
  }

  // The top of the scale: a round number whose half is a whole number too (2, 4, 6, 8, 10, 20, 30...).
  function niceCeiling(value) {
    if (value <= 2) return 2;
    const power = 10 ** Math.floor(Math.log10(value));
    const steps = power === 1 ? [2, 4, 6, 8, 10] : [1, 2, 3, 4, 5, 6, 8, 10];
    for (const m of steps) if (m * power >= value) return m * power;
    return 10 * power;
  }

  function cell(label, content, cls) {
    const td = el("td", { "data-label": label });
    if (cls) td.className = cls;
    td.append(content);
    return td;
  }

  function emptyRow(columns, text) {
    return el("tr", {}, el("td", { colspan: String(columns), class: "empty" }, text));
  }

  function renderSent(rows) {
    const body = $("#sent-table tbody");
    if (!rows.length) return body.replaceChildren(emptyRow(4, "Nothing sent yet."));
    body.replaceChildren(
      ...rows.map((m) =>
        el(
          "tr",
          { "data-id": String(m.id) },
          cell("Recipient", m.recipient, "mono"),
          cell("Content", m.content),
          cell("Sent", timeEl(m.sent_at, false)),
          cell("Remote id", m.remote_message_id || DASH, "mono remote"),
        ),
      ),
    );
  }

  function renderFailed(rows) {
    const body = $("#failed-table tbody");
    if (!rows.length) return body.replaceChildren(emptyRow(5, "No failed messages."));
    body.replaceChildren(
      ...rows.map((m) => {
        const button = el("button", { type: "button", class: "retry", "aria-label": `Retry message ${m.id}` });
        button.textContent = "Retry";
        const unknown = (m.last_error || "").startsWith("outcome unknown");
        button.addEventListener("click", () => retry(m.id, button, unknown));
        return el(
          "tr",
          { "data-id": String(m.id) },
          cell("Recipient", m.recipient, "mono"),
          cell("Content", m.content),
          cell("Reason", m.last_error || DASH, "reason"),
          cell("Failed", timeEl(m.updated_at, false)),
          cell("", button, "action"),
        );
      }),
    );
  }

  function renderWaiting(rows, total) {
    const body = $("#waiting-table tbody");
    const more = $("#waiting-more");
    more.hidden = total <= rows.length;
    more.textContent = `The newest ${number(rows.length)} of ${number(total)} waiting.`;
    if (!rows.length) return body.replaceChildren(emptyRow(5, "Nothing waiting."));
    body.replaceChildren(
      ...rows.map((m) => {
        const button = el("button", { type: "button", class: "cancel", "aria-label": `Cancel message ${m.id}` });
        button.textContent = "Cancel";
        button.addEventListener("click", () => cancel(m.id, button));
        return el(
          "tr",
          { "data-id": String(m.id) },
          cell("Recipient", m.recipient, "mono"),
          cell("Content", m.content),
          cell("Send at", timeEl(m.send_at, false)),
          cell("Priority", m.priority, m.priority === "high" ? "priority high" : "priority"),
          cell("", button, "action"),
        );
      }),
    );
  }

  function renderPager(name) {
    const { offset, total } = pages[name];
    const nav = document.querySelector(`[data-pager="${name}"]`);
    nav.querySelector('[data-page="newer"]').disabled = offset === 0;
    nav.querySelector('[data-page="older"]').disabled = offset + PAGE_SIZE >= total;
    nav.querySelector(".range").textContent = total
      ? `${number(offset + 1)}–${number(Math.min(offset + PAGE_SIZE, total))} of ${number(total)}`
      : "";
    nav.hidden = total <= PAGE_SIZE && offset === 0;
  }

  async function refresh() {
    clearTimeout(timer);
    const mine = ++generation;
    const results = await Promise.allSettled([
      getJSON("/stats"),
      getJSON(`/stats/timeline?minutes=${MINUTES}`),
      getJSON(`/messages?limit=${PAGE_SIZE}&offset=${pages.sent.offset}&mask=true`),
      getJSON(`/stats/failed?limit=${PAGE_SIZE}&offset=${pages.failed.offset}&mask=true`),
      getJSON(`/messages?status=pending&limit=${PAGE_SIZE}&mask=true`),
    ]);
    if (mine !== generation) return; // a newer refresh started meanwhile
    const [stats, series, sent, failed, waiting] = results;
    if (waiting.status === "fulfilled") {
      renderWaiting(waiting.value.body, Number(waiting.value.headers.get("X-Total-Count") || 0));
    }
    if (stats.status === "fulfilled") renderStats(stats.value.body);
    if (series.status === "fulfilled") renderChart(series.value.body);
    if (sent.status === "fulfilled") {
      pages.sent.total = Number(sent.value.headers.get("X-Total-Count") || 0);
      if (pages.sent.offset && pages.sent.offset >= pages.sent.total) return back("sent");
      renderSent(sent.value.body);
      renderPager("sent");
    }
    if (failed.status === "fulfilled") {
      if (pages.failed.offset && !failed.value.body.length) return back("failed");
      renderFailed(failed.value.body);
      renderPager("failed");
    }
    const tables = [[sent, "#sent-table", 4], [failed, "#failed-table", 5], [waiting, "#waiting-table", 5]];
    for (const [result, table, columns] of tables) {
      if (result.status === "rejected" && [401, 403].includes(result.reason.status)) {
        $(`${table} tbody`).replaceChildren(emptyRow(columns, "Needs the API token: reload the page to enter it."));
      }
    }
    const problems = results
      .filter((r) => r.status === "rejected" && ![401, 403].includes(r.reason.status))
      .map((r) => r.reason.message);
    const problem = $("#problem");
    problem.hidden = !problems.length;
    problem.textContent = problems.length
      ? `Cannot read ${problems.join("; ")}. Retrying every ${REFRESH_MS / 1000} s.`
      : "";
    $("#updated").textContent =
      `Updated ${new Date().toLocaleTimeString(undefined, { hour12: false })} · every ${REFRESH_MS / 1000} s`;
    timer = setTimeout(refresh, REFRESH_MS);
  }

  function back(name) {
    // The page went past the end (messages moved on): show the last one instead.
    const page = pages[name];
    const last = Math.max(0, Math.floor((page.total - 1) / PAGE_SIZE) * PAGE_SIZE);
    page.offset = last < page.offset ? last : 0;
    return refresh();
  }

  // --- the API token, when the gateway asks for one -------------------------------------------------

  let tokenAnswer = null;
  let asking = null; // the open dialog, shared by every request that needs the token meanwhile
  let declined = false; // cancelled: reads stop asking (an action asks again)

  function askToken(error) {
    const dialog = $("#token-dialog");
    const problem = $("#token-error");
    problem.textContent = error || "";
    problem.hidden = !error;
    $("#token-input").value = "";
    return new Promise((resolve) => {
      tokenAnswer = resolve;
      if (!dialog.open) dialog.showModal();
      $("#token-input").focus();
    });
  }

  function answerToken(value) {
    const dialog = $("#token-dialog");
    if (dialog.open) dialog.close();
    const resolve = tokenAnswer;
    tokenAnswer = null;
    if (resolve) resolve(value);
  }

  function tokenOnce(error) {
    if (!asking) asking = askToken(error).finally(() => (asking = null));
    return asking;
  }

  // One request with the token of this tab; on a 401 (or 403 for that token) ask for it, once for all the
  // requests waiting meanwhile, and try again. Returns the last response (a 401/403 if the user cancelled).
  async function call(method, url, body, ask = true) {
    for (;;) {
      const token = sessionStorage.getItem(TOKEN_KEY);
      const headers = { Accept: "application/json" };
      if (body !== undefined) headers["Content-Type"] = "application/json";
      if (token) headers.Authorization = `Bearer ${token}`;
      const response = await fetch(url, {
        method,
        headers,
        cache: "no-store",
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      if (response.status !== 401 && !(response.status === 403 && token)) return response;
      if (token && sessionStorage.getItem(TOKEN_KEY) !== token) continue; // replaced meanwhile: try the new one
      sessionStorage.removeItem(TOKEN_KEY);
      if (!ask) return response;
      const given = await tokenOnce(
        token ? "Wrong token: the gateway refused it. Enter the API_TOKEN the gateway runs with." : "",
      );
      if (given === null) {
        declined = true;
        return response;
      }
      declined = false;
      sessionStorage.setItem(TOKEN_KEY, given);
    }
  }

  async function authorized(method, url, body) {
    const response = await call(method, url, body);
    if (declined && (response.status === 401 || response.status === 403)) {
      notice("Nothing changed: this needs the API token.", true);
      return null;
    }
    return response;
  }

  async function toggle() {
    const button = $("#switch");
    if (sending === null || button.getAttribute("aria-busy") === "true") return;
    const command = sending ? "stop" : "start";
    button.setAttribute("aria-busy", "true");
    try {
      const response = await authorized("POST", "/process_message", { command });
      if (!response) return;
      if (!response.ok) return notice(`Could not ${command} sending: ${await errorText(response)}`, true);
      const state = (await response.json()).sending;
      renderSwitch(state === "started");
      notice(state === "started" ? "Sending started." : "Sending stopped: nothing new goes out until it is started.");
    } catch (error) {
      notice(`Could not ${command} sending: ${error.message}`, true);
    } finally {
      button.removeAttribute("aria-busy");
      refresh();
    }
  }

  async function retry(id, button, unknown) {
    // An unknown outcome may already have reached the service: sending it again needs an explicit yes.
    const question = `Message ${id} may already have been delivered (its outcome is unknown). Send it again anyway? It may arrive twice.`;
    if (unknown && !window.confirm(question)) return;
    button.disabled = true;
    try {
      const response = await authorized("POST", `/messages/${id}/retry?mask=true${unknown ? "&force=true" : ""}`);
      if (!response) return;
      if (!response.ok) return notice(`Could not retry message ${id}: ${await errorText(response)}`, true);
      notice(`Message ${id} is pending again; it goes out in a coming batch.`);
    } catch (error) {
      notice(`Could not retry message ${id}: ${error.message}`, true);
    } finally {
      button.disabled = false;
      refresh();
    }
  }

  async function cancel(id, button) {
    button.disabled = true;
    try {
      const response = await authorized("POST", `/messages/${id}/cancel?mask=true`);
      if (!response) return;
      if (!response.ok) return notice(`Could not cancel message ${id}: ${await errorText(response)}`, true);
      notice(`Message ${id} is cancelled; it will not be sent.`);
    } catch (error) {
      notice(`Could not cancel message ${id}: ${error.message}`, true);
    } finally {
      button.disabled = false;
      refresh();
    }
  }

  function start() {
    $("#switch").addEventListener("click", toggle);
    $("#token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("#token-input").value.trim();
      if (value) answerToken(value);
    });
    $("#token-cancel").addEventListener("click", () => answerToken(null));
    $("#token-dialog").addEventListener("cancel", (event) => {
      event.preventDefault();
      answerToken(null);
    });
    for (const nav of document.querySelectorAll("[data-pager]")) {
      nav.addEventListener("click", (event) => {
        const direction = event.target.closest("button")?.dataset.page;
        if (!direction) return;
        const page = pages[nav.dataset.pager];
        page.offset = Math.max(0, page.offset + (direction === "older" ? PAGE_SIZE : -PAGE_SIZE));
        refresh();
      });
    }
    let resizing = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizing);
      resizing = setTimeout(() => lastSeries && renderChart(lastSeries), 150);
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) refresh();
    });
    refresh();
  }

  start();
})();
