// The admin page: signs in with an API key and reads the /v1 API with it.
//
// The key lives in sessionStorage (this tab only) and goes out only as the Authorization
// header, never in a URL. Every value from the server reaches the page as text
// (textContent, text nodes, setAttribute of plain attributes), never as HTML.
"use strict";

(() => {
  const KEY = "sessionkeeper.key";
  const TENANT = "sessionkeeper.tenant";
  const PAGE_SIZE = 20;
  const MESSAGE_PAGE = 100;
  const DAYS = 14;
  const SVG = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);

  let me = null; // the key's identity: {key_id, tenant, role, name}
  let tenant = null; // the tenant shown
  let filters = {};
  let cursors = [null]; // the cursor of each page reached, newest first
  let pageIndex = 0;
  let nextCursor = null;
  let openId = null; // the session shown in the conversation panel
  let lastSeq = 0;
  let context = 0; // bumped by every sign-in, sign-out and tenant change
  let view = "overview"; // the view shown: overview, analytics or operations
  let pending = null; // the dry run shown, as {action, body, at}: what its button applies
  const tickets = {}; // the latest request of each kind: older answers are dropped

  function ticket(kind) {
    const mine = (tickets[kind] = (tickets[kind] || 0) + 1);
    const at = context;
    return () => tickets[kind] === mine && at === context;
  }

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  // --- building the page from data, as text only --------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (name === "class") node.className = value;
      else if (name === "onclick") node.addEventListener("click", value);
      else node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child); // strings become text
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      node.setAttribute(name, String(value));
    }
    for (const child of children) node.append(child);
    return node;
  }

  const pad = (n) => String(n).padStart(2, "0");

  function when(iso) {
    if (!iso) return "never";
    const d = new Date(iso);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  const count = (n) => Number(n).toLocaleString("en-US");
  const money = (n) => String(Number(Number(n).toFixed(6)));
  const json = (value) => JSON.stringify(value, null, 2);

  function show(node, on) {
    node.hidden = !on;
  }

  // --- the API ------------------------------------------------------------------------

  async function api(path, params, key) {
    return request("GET", path, params, key, undefined);
  }

  // a POST of a JSON body (the operations), with the key signed in
  async function post(path, params, body) {
    return request("POST", path, params, undefined, body);
  }

  async function request(method, path, params, key, body) {
    const url = new URL(path, document.baseURI);
    for (const [name, value] of Object.entries(params || {})) {
      if (value !== undefined && value !== null && value !== "") {
        url.searchParams.set(name, value);
      }
    }
    if (me && tenant && tenant !== me.tenant) url.searchParams.set("tenant", tenant);
    let response;
    try {
      const headers = {
        Authorization: `Bearer ${key || sessionStorage.getItem(KEY) || ""}`,
        Accept: "application/json",
      };
      if (body !== undefined) headers["Content-Type"] = "application/json";
      response = await fetch(url, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        credentials: "omit",
      });
    } catch (exc) {
      throw new ApiError(0, "the server cannot be reached");
    }
    let answer = null;
    try {
      answer = await response.json();
    } catch (exc) {
      answer = null;
    }
    if (!response.ok) {
      const detail = answer && typeof answer.detail === "string" ? answer.detail : "";
      throw new ApiError(response.status, detail || `HTTP ${response.status}`);
    }
    return answer;
  }

  function failed(exc) {
    if (exc instanceof ApiError && exc.status === 401) {
      signOut(`Signed out: ${exc.message}`);
      return;
    }
    const box = $("error");
    box.textContent = exc instanceof ApiError ? exc.message : `the page failed: ${exc}`;
    show(box, true);
  }

  // --- signing in and out -------------------------------------------------------------

  async function signIn(key) {
    const identity = await api("../v1/me", {}, key);
    sessionStorage.setItem(KEY, key);
    me = identity;
    context += 1;
    const remembered = sessionStorage.getItem(TENANT);
    tenant = me.role === "admin" && remembered ? remembered : me.tenant;
    $("identity").textContent =
      `${me.role} key ${me.key_id}${me.name ? ` (${me.name})` : ""} of tenant ${me.tenant}`;
    show($("sign-in"), false);
    show($("sign-in-error"), false);
    show($("who"), true);
    show($("dashboard"), true);
    // operations are for admin keys: the server refuses others (403) and the page hides them
    show($("tab-operations"), me.role === "admin");
    show($("ops-denied"), false);
    show($("ops-work"), true);
    if (me.role !== "admin") showView("overview", false);
    await pickTenants();
    await reload(true);
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY);
    sessionStorage.removeItem(TENANT);
    me = null;
    tenant = null;
    context += 1;
    closeConversation();
    clearOperations();
    showView("overview", false);
    // nothing of the last key's data stays in the page, nor its search
    for (const id of ["figures", "top-owners", "top-costs", "chart", "session-rows", "messages",
      "session-fields", "tenant", "analytics-rows", "analytics-owner-rows"]) {
      $(id).replaceChildren();
    }
    for (const id of ["session-count", "session-state", "session-metadata", "identity",
      "analytics-range"]) {
      $(id).textContent = "";
    }
    $("search").reset();
    show($("who"), false);
    show($("dashboard"), false);
    show($("sign-in"), true);
    const box = $("sign-in-error");
    box.textContent = message || "";
    show(box, Boolean(message));
    $("key").focus();
  }

  async function pickTenants() {
    const picker = $("tenant");
    picker.replaceChildren();
    if (me.role !== "admin") {
      show($("tenant-picker"), false);
      return;
    }
    const found = await api("../v1/admin/tenants");
    const names = [...new Set([me.tenant, tenant, ...found.tenants])].sort();
    for (const name of names) picker.append(el("option", { value: name }, name));
    picker.value = tenant;
    show($("tenant-picker"), true);
  }

  // --- stats and the chart ------------------------------------------------------------

  async function loadStats() {
    const current = ticket("stats");
    const offset = -new Date().getTimezoneOffset();
    const [stats, daily] = await Promise.all([
      api("../v1/stats", { top: 5 }),
      api("api/daily", { days: DAYS, utc_offset: offset }),
    ]);
    if (!current()) return;
    const figures = [
      ["Sessions", count(stats.total)],
      ["Active", count(stats.active)],
      ["Completed", count(stats.completed)],
      ["Archived", count(stats.archived)],
      ["Completion rate", `${(stats.completion_rate * 100).toFixed(1)}%`],
      ["Updated in 24 h", count(stats.recently_active)],
      ["Messages", count(stats.messages)],
      ["Input tokens", count(stats.input_tokens)],
      ["Output tokens", count(stats.output_tokens)],
      ["Cost", money(stats.cost)],
    ];
    $("figures").replaceChildren(
      ...figures.map(([name, value]) =>
        el("div", { "data-figure": name }, el("dt", {}, name), el("dd", {}, value)),
      ),
    );
    const owners = $("top-owners");
    owners.replaceChildren(
      ...stats.top_owners.map((o) =>
        el(
          "li",
          {},
          o.owner === null ? el("span", { class: "muted" }, "(no owner)") : o.owner,
          el("span", { class: "muted" }, ` — ${count(o.sessions)}`),
        ),
      ),
    );
    if (!stats.top_owners.length) owners.append(el("li", { class: "muted" }, "none yet"));
    const costs = $("top-costs");
    costs.replaceChildren(
      ...stats.top_owners_by_cost.map((o) =>
        el(
          "li",
          {},
          o.owner === null ? el("span", { class: "muted" }, "(no owner)") : o.owner,
          el("span", { class: "muted" }, ` — ${money(o.cost)}`),
        ),
      ),
    );
    if (!stats.top_owners_by_cost.length) costs.append(el("li", { class: "muted" }, "none yet"));
    drawChart(daily.days);
  }

  function niceStep(max) {
    const rough = max / 4;
    const power = 10 ** Math.floor(Math.log10(Math.max(rough, 1)));
    for (const m of [1, 2, 5, 10]) if (m * power >= rough) return Math.max(1, m * power);
    return 10 * power;
  }

  function drawChart(days) {
    const width = 640;
    const height = 220;
    const left = 36;
    const right = 8;
    const top = 12;
    const bottom = 30;
    const plotW = width - left - right;
    const plotH = height - top - bottom;
    const max = Math.max(1, ...days.flatMap((d) => [d.created, d.completed]));
    const step = niceStep(max);
    const yMax = Math.ceil(max / step) * step;
    const y = (v) => top + plotH - (v / yMax) * plotH;
    const created = days.reduce((n, d) => n + d.created, 0);
    const completed = days.reduce((n, d) => n + d.completed, 0);
    const root = svg("svg", {
      viewBox: `0 0 ${width} ${height}`,
      role: "img",
      "aria-label": `Last ${days.length} days: ${created} sessions created, ${completed} completed`,
    });
    for (let v = 0; v <= yMax; v += step) {
      root.append(
        svg("line", { class: "grid", x1: left, x2: width - right, y1: y(v), y2: y(v) }),
        svg("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end" }, String(v)),
      );
    }
    const slot = plotW / days.length;
    const bar = Math.max(2, slot * 0.36);
    days.forEach((d, i) => {
      const x = left + i * slot + (slot - 2 * bar) / 2;
      for (const [kind, value, at] of [
        ["created", d.created, x],
        ["completed", d.completed, x + bar],
      ]) {
        root.append(
          svg(
            "rect",
            {
              class: `bar bar-${kind}`,
              x: at,
              y: y(value),
              width: bar,
              height: Math.max(0, top + plotH - y(value)),
              "data-day": d.day,
              "data-kind": kind,
              "data-count": value,
            },
            svg("title", {}, `${d.day}: ${value} ${kind}`),
          ),
        );
      }
      if (days.length <= 16 || i % Math.ceil(days.length / 14) === 0) {
        root.append(
          svg(
            "text",
            { x: left + i * slot + slot / 2, y: height - bottom + 16, "text-anchor": "middle" },
            d.day.slice(5),
          ),
        );
      }
    });
    $("chart").replaceChildren(root);
  }

  // --- the session list ---------------------------------------------------------------

  function readFilters() {
    return {
      title_contains: $("q-title").value.trim(),
      owner: $("q-owner").value.trim(),
      status: $("q-status").value,
    };
  }

  async function loadSessions(recount) {
    const current = ticket("list");
    const [page, counted] = await Promise.all([
      api("../v1/sessions", { ...filters, limit: PAGE_SIZE, cursor: cursors[pageIndex] }),
      recount ? api("../v1/session-count", filters) : null,
    ]);
    if (!current()) return;
    nextCursor = page.next_cursor;
    if (counted) $("session-count").textContent = `(${count(counted.count)})`;
    $("session-rows").replaceChildren(...page.items.map(sessionRow));
    show($("no-sessions"), page.items.length === 0);
    $("prev-page").disabled = pageIndex === 0;
    $("next-page").disabled = nextCursor === null;
    $("page-number").textContent = `page ${pageIndex + 1}`;
  }

  function sessionRow(s) {
    const row = el(
      "tr",
      { "data-session": s.id, class: s.id === openId ? "selected" : "" },
      el(
        "td",
        {},
        el(
          "button",
          { type: "button", class: "open", onclick: () => openSession(s.id).catch(failed) },
          s.title || "(untitled)",
        ),
        el("div", { class: "muted" }, s.id),
      ),
      el("td", {}, s.owner === null ? el("span", { class: "muted" }, "—") : s.owner),
      el("td", {}, el("span", { class: `status status-${s.status}` }, s.status)),
      el("td", {}, s.step === null ? "" : s.step),
      el("td", { class: "num" }, count(s.message_count)),
      el("td", { class: "num" }, count(s.input_tokens + s.output_tokens)),
      el("td", { class: "num" }, money(s.cost)),
      el("td", {}, when(s.updated_at)),
    );
    return row;
  }

  // --- one conversation ---------------------------------------------------------------

  async function openSession(id) {
    const current = ticket("open");
    openId = id;
    for (const row of $("session-rows").children) {
      row.classList.toggle("selected", row.dataset.session === id);
    }
    const [session, messages] = await Promise.all([
      api(`../v1/sessions/${encodeURIComponent(id)}`),
      api(`../v1/sessions/${encodeURIComponent(id)}/messages`, { limit: MESSAGE_PAGE }),
    ]);
    if (!current()) return;
    $("conversation-title").textContent = session.title || "(untitled)";
    const fields = [
      ["id", session.id],
      ["owner", session.owner],
      ["folder", session.folder],
      ["status", session.status],
      ["step", session.step],
      ["version", session.version],
      ["created", when(session.created_at)],
      ["updated", when(session.updated_at)],
      ["expires", when(session.expires_at)],
      ["messages", count(session.message_count)],
      ["tokens", `${count(session.input_tokens)} in, ${count(session.output_tokens)} out`],
      ["cost", money(session.cost)],
    ];
    $("session-fields").replaceChildren(
      ...fields.flatMap(([name, value]) => [
        el("dt", {}, name),
        el("dd", { "data-field": name }, value === null ? "—" : String(value)),
      ]),
    );
    $("session-state").textContent = json(session.state);
    $("session-metadata").textContent = json(session.metadata);
    $("messages").replaceChildren();
    lastSeq = 0;
    addMessages(messages);
    show($("conversation"), true);
    $("conversation").scrollIntoView({ block: "nearest" });
  }

  function addMessages(messages) {
    const list = $("messages");
    for (const m of messages) {
      const role = /^[a-z]{1,20}$/.test(m.role) ? m.role : "other";
      const body =
        typeof m.content === "string"
          ? el("div", { class: "message-body" }, m.content)
          : el("pre", { class: "json" }, json(m.content));
      const tokens = m.input_tokens || m.output_tokens
        ? `${m.input_tokens} in, ${m.output_tokens} out` : null;
      const meta = Object.keys(m.metadata).length
        ? el("details", {}, el("summary", {}, "metadata"), el("pre", { class: "json" }, json(m.metadata)))
        : null;
      list.append(
        el(
          "li",
          { class: `message role-${role}`, "data-seq": m.seq },
          el(
            "div",
            { class: "message-head" },
            el("span", { class: "role" }, m.role),
            el("span", {}, `#${m.seq}`),
            el("span", {}, when(m.created_at)),
            tokens && el("span", {}, tokens),
            m.cost ? el("span", {}, `cost ${money(m.cost)}`) : null,
          ),
          body,
          meta,
        ),
      );
      lastSeq = m.seq;
    }
    if (!list.children.length) list.append(el("li", { class: "muted" }, "No messages."));
    show($("more-messages"), messages.length === MESSAGE_PAGE);
  }

  async function moreMessages() {
    const id = openId;
    const at = context;
    const messages = await api(`../v1/sessions/${encodeURIComponent(id)}/messages`, {
      after_seq: lastSeq,
      limit: MESSAGE_PAGE,
    });
    if (at === context && id === openId) addMessages(messages);
  }

  function closeConversation() {
    ticket("open"); // an answer still on its way is not shown
    openId = null;
    show($("conversation"), false);
    for (const row of $("session-rows").children) row.classList.remove("selected");
  }

  // --- operations: doctor, check, archive and purge (admin keys) ------------------------

  const LIFECYCLE = { archive: "../v1/admin/archive", purge: "../v1/admin/purge-sessions" };

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = Number(n);
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
  }

  function pairs(node, rows) {
    node.replaceChildren(
      ...rows.flatMap(([name, value]) => [
        el("dt", {}, name),
        el("dd", { "data-field": name }, String(value)),
      ]),
    );
  }

  // a 403 means this key may not run operations: say so instead of a bare error
  function opsFailed(exc) {
    if (exc instanceof ApiError && exc.status === 403) {
      show($("ops-denied"), true);
      show($("ops-work"), false);
      return;
    }
    failed(exc);
  }

  // runs an operation with its button disabled, so one click is one request
  async function busy(button, work) {
    show($("error"), false);
    button.disabled = true;
    try {
      await work();
    } catch (exc) {
      opsFailed(exc);
    } finally {
      button.disabled = false;
    }
  }

  function clearOperations() {
    clearPending();
    $("doctor-verdict").textContent = "";
    $("doctor-verdict").className = "verdict";
    for (const id of ["doctor-warnings", "doctor-figures", "check-rows", "lifecycle-figures",
      "lifecycle-sample", "delivery-rows"]) {
      $(id).replaceChildren();
    }
    for (const id of ["doctor-engine", "check-summary", "lifecycle-summary", "restore-result"]) {
      $(id).textContent = "";
    }
    for (const id of ["check-summary", "check-table", "lifecycle-result", "restore-result"]) {
      show($(id), false);
    }
  }

  function lastAnswer(d) {
    const last = d.attempts[d.attempts.length - 1];
    if (!last) return "";
    return last.status_code === null ? last.error || "no answer" : `HTTP ${last.status_code}`;
  }

  async function loadDeliveries() {
    const current = ticket("deliveries");
    const found = await api("../v1/admin/webhooks/deliveries", { limit: 20 });
    if (!current()) return;
    const rows = found.deliveries.map((d) => el(
      "tr",
      { "data-delivery": d.id, "data-status": d.status },
      el("td", {}, d.event),
      el("td", {}, `${d.tenant}/${d.session_id}`),
      el("td", {}, d.status),
      el("td", { class: "num" }, count(d.attempts.length)),
      el("td", {}, lastAnswer(d)),
      el("td", {}, when(d.created_at)),
      el("td", {}, d.status === "pending" ? null : el("button", {
        type: "button",
        class: "redeliver",
        onclick: (event) => busy(event.currentTarget, async () => {
          await post(`../v1/admin/webhooks/deliveries/${encodeURIComponent(d.id)}/redeliver`);
          await loadDeliveries();
        }),
      }, "Send again")),
    ));
    $("delivery-rows").replaceChildren(...rows);
    show($("deliveries-table"), rows.length > 0);
    show($("no-deliveries"), rows.length === 0);
  }

  async function loadDoctor() {
    const current = ticket("doctor");
    const report = await api("../v1/admin/doctor");
    if (!current()) return;
    const verdict = $("doctor-verdict");
    verdict.textContent = report.verdict;
    verdict.className = `verdict verdict-${report.verdict}`;
    const schema = report.schema_version === null ? "" : `, schema version ${report.schema_version}`;
    $("doctor-engine").textContent = `${report.engine}: ${report.server_version}${schema}`;
    $("doctor-warnings").replaceChildren(
      ...(report.warnings.length
        ? report.warnings.map((w) => el("li", { class: "warning" }, w))
        : [el("li", { class: "muted" }, "No warnings: nothing to change.")]),
    );
    pairs($("doctor-figures"), [
      ...Object.entries(report.settings),
      ...Object.entries(report.counts).map(([name, n]) => [name, count(n)]),
      ...Object.entries(report.sizes).map(([name, n]) => [`${name} size`, bytes(n)]),
      ["missing indexes", report.missing_indexes.join(", ") || "none"],
    ]);
  }

  async function runCheck() {
    const current = ticket("check");
    const report = await post("../v1/admin/check", {
      repair: $("check-repair").checked,
      all_tenants: $("check-all").checked,
    });
    if (!current()) return;
    const scope = report.tenant === null ? "every tenant" : `tenant ${report.tenant}`;
    const verdict = report.ok ? "nothing left to fix" : `${count(report.left)} left to fix`;
    const summary = $("check-summary");
    summary.textContent =
      `${report.engine}, ${scope}${report.repair ? ", repaired" : ""}: ${verdict}`;
    summary.className = `summary ${report.ok ? "good" : "bad"}`;
    $("check-rows").replaceChildren(
      ...Object.entries(report.counts).map(([kind, c]) =>
        el(
          "tr",
          { "data-kind": kind, class: c.found ? "found" : "" },
          el("td", {}, kind.replace(/_/g, " ")),
          el("td", { class: "num", "data-count": "found" }, count(c.found)),
          el(
            "td",
            { class: "num", "data-count": "repaired" },
            c.repairable ? count(c.repaired) : "never",
          ),
          el("td", { class: "samples" }, c.samples.slice(0, 5).join("\n")),
        ),
      ),
    );
    show(summary, true);
    show($("check-table"), true);
  }

  function clearPending() {
    pending = null;
    show($("lifecycle-apply"), false);
  }

  function showLifecycle(action, report) {
    const done = action === "archive" ? report.archived : report.purged;
    const verb = action === "archive" ? "archived" : "purged";
    const summary = report.dry_run
      ? `Dry run: ${count(done)} sessions would be ${verb}`
      : `${count(done)} sessions ${verb}`;
    $("lifecycle-summary").textContent =
      `${summary}, last active before ${when(report.cutoff)}. ` +
      (report.dry_run ? "Nothing was changed." : "");
    const figures = [];
    if (action === "archive") {
      figures.push(["tenants", count(report.tenants)]);
    } else {
      const expired =
        report.expired !== null ? count(report.expired)
          : report.dry_run ? "not counted in a dry run" : "not asked for";
      figures.push(["expired", expired], ["old", count(report.old)]);
    }
    figures.push(["skipped", count(report.skipped)], ["failed", count(report.failed)]);
    pairs($("lifecycle-figures"), figures);
    $("lifecycle-sample").replaceChildren(
      ...report.sample.slice(0, 10).map((name) => el("li", {}, name)),
      ...report.errors.slice(0, 10).map((e) => el("li", { class: "warning" }, e)),
    );
    show($("lifecycle-result"), true);
  }

  async function dryRun() {
    clearPending();
    const current = ticket("lifecycle");
    const action = $("lifecycle-action").value;
    const body = {
      older_than: $("lifecycle-older").value.trim(),
      all_tenants: $("lifecycle-all").checked,
    };
    if (action === "purge" && $("lifecycle-expired").checked) body.expired = true;
    const report = await post(LIFECYCLE[action], {}, { ...body, dry_run: true });
    if (!current()) return;
    showLifecycle(action, report);
    const n = action === "archive" ? report.archived : report.old;
    if (n === 0 && !body.expired) return;
    pending = { action, body, at: context };
    const button = $("lifecycle-apply");
    button.textContent = action === "archive"
      ? `Archive ${count(n)} sessions`
      : `Purge ${count(n)} sessions${body.expired ? " and the expired ones" : ""}`;
    show(button, true);
  }

  async function applyLifecycle() {
    const chosen = pending;
    clearPending();
    if (chosen === null || chosen.at !== context) return;
    const current = ticket("lifecycle");
    const report = await post(LIFECYCLE[chosen.action], {}, { ...chosen.body, dry_run: false });
    if (current()) showLifecycle(chosen.action, report);
  }

  async function restoreSession() {
    const current = ticket("restore");
    const id = $("restore-id").value.trim();
    const report = await post("../v1/admin/restore", {}, { session_id: id });
    if (!current()) return;
    const box = $("restore-result");
    box.textContent = report.reactivated
      ? `Session ${report.session_id} of tenant ${report.tenant} is active again.`
      : `Session ${report.session_id} was not archived (it is ${report.status}): ` +
        "nothing changed.";
    show(box, true);
  }

  // --- analytics: history per day, week or month --------------------------------------

  async function loadAnalytics() {
    const current = ticket("analytics");
    const found = await api("../v1/analytics", {
      days: $("analytics-days").value,
      group_by: $("analytics-group").value,
      owner: $("analytics-owner").value.trim(),
      top: 5,
    });
    if (!current()) return;
    $("analytics-range").textContent = `${found.start} to ${found.end}` +
      (found.owner === null ? "" : `, owner ${found.owner}`);
    const point = (label, p) => el(
      "tr",
      {},
      el("td", {}, label),
      el("td", { class: "num" }, count(p.created)),
      el("td", { class: "num" }, count(p.completed)),
      el("td", { class: "num" }, count(p.messages)),
      el("td", { class: "num" }, count(p.input_tokens + p.output_tokens)),
      el("td", { class: "num" }, money(p.cost)),
      el("td", { class: "num" }, p.avg_turns_per_session.toFixed(1)),
    );
    const total = point("total", found.totals);
    total.className = "total";
    $("analytics-rows").replaceChildren(
      ...found.series.slice().reverse().map((p) => point(p.start, p)),
      total,
    );
    $("analytics-owner-rows").replaceChildren(
      ...found.owners.slice().reverse().map((o) => el(
        "tr",
        {},
        el("td", {}, o.start),
        el("td", {}, o.owner === null ? el("span", { class: "muted" }, "(no owner)") : o.owner),
        el("td", { class: "num" }, count(o.messages)),
        el("td", { class: "num" }, count(o.tokens)),
        el("td", { class: "num" }, money(o.cost)),
      )),
    );
    show($("analytics-no-owners"), !found.owners.length);
  }

  // --- wiring -------------------------------------------------------------------------

  function showView(name, load) {
    view = name;
    for (const tab of $("views").querySelectorAll("[data-view]")) {
      tab.setAttribute("aria-selected", String(tab.dataset.view === name));
    }
    for (const panel of document.querySelectorAll("[data-view-panel]")) {
      show(panel, panel.dataset.viewPanel === name);
    }
    if (!load) return;
    show($("error"), false);
    const loading = name === "operations"
      ? Promise.all([loadDoctor(), loadDeliveries()]).catch(opsFailed)
      : name === "analytics" ? loadAnalytics() : reload(false);
    loading.catch(failed);
  }

  async function reload(fromStart) {
    show($("error"), false);
    if (fromStart) {
      filters = readFilters();
      cursors = [null];
      pageIndex = 0;
      closeConversation();
      clearOperations();
    }
    const opened = openId;
    await Promise.all([
      loadStats(),
      loadSessions(true),
      opened ? openSession(opened) : null,
      view === "operations"
        ? Promise.all([loadDoctor(), loadDeliveries()]).catch(opsFailed)
        : null,
      view === "analytics" ? loadAnalytics() : null,
    ]);
  }

  function start() {
    $("sign-in-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = $("key");
      const key = input.value.trim();
      input.value = "";
      signIn(key).catch((exc) => {
        if (exc instanceof ApiError && (exc.status === 401 || exc.status === 429)) {
          signOut(exc.message);
        } else {
          signOut(`Cannot sign in: ${exc.message}`);
        }
      });
    });
    $("sign-out").addEventListener("click", () => signOut(""));
    $("refresh").addEventListener("click", () => reload(false).catch(failed));
    $("tenant").addEventListener("change", () => {
      tenant = $("tenant").value;
      sessionStorage.setItem(TENANT, tenant);
      context += 1;
      reload(true).catch(failed);
    });
    $("search").addEventListener("submit", (event) => {
      event.preventDefault();
      show($("error"), false);
      filters = readFilters();
      cursors = [null];
      pageIndex = 0;
      loadSessions(true).catch(failed);
    });
    $("next-page").addEventListener("click", () => {
      if (nextCursor === null) return;
      cursors[pageIndex + 1] = nextCursor;
      pageIndex += 1;
      loadSessions(false).catch(failed);
    });
    $("prev-page").addEventListener("click", () => {
      if (pageIndex === 0) return;
      pageIndex -= 1;
      loadSessions(false).catch(failed);
    });
    $("close-conversation").addEventListener("click", closeConversation);
    for (const tab of $("views").querySelectorAll("[data-view]")) {
      tab.addEventListener("click", () => showView(tab.dataset.view, true));
    }
    const submit = (form, work) => {
      $(form).addEventListener("submit", (event) => {
        event.preventDefault();
        busy(event.submitter || $(form).querySelector("button"), work);
      });
    };
    $("analytics-form").addEventListener("submit", (event) => {
      event.preventDefault();
      show($("error"), false);
      loadAnalytics().catch(failed);
    });
    $("deliveries-refresh").addEventListener("click", (event) =>
      busy(event.currentTarget, loadDeliveries));
    submit("check-form", runCheck);
    submit("lifecycle-form", dryRun);
    submit("restore-form", restoreSession);
    $("lifecycle-apply").addEventListener("click", (event) =>
      busy(event.currentTarget, applyLifecycle));
    // what the confirm button applies is what the dry run showed: any change undoes it
    $("lifecycle-form").addEventListener("input", clearPending);
    $("lifecycle-action").addEventListener("change", () => {
      show($("lifecycle-expired-box"), $("lifecycle-action").value === "purge");
    });
    $("more-messages").addEventListener("click", () => moreMessages().catch(failed));

    const stored = sessionStorage.getItem(KEY);
    if (stored) {
      signIn(stored).catch((exc) => signOut(`Signed out: ${exc.message}`));
    } else {
      signOut("");
    }
  }

  start();
})();
