// itask web: the browser side. Plain ES module, no dependencies. Live data comes from two
// server-sent event streams (the cluster, and one task); task text only ever goes into
// textContent. Rate, ETA and outcome words come formatted by the server's view model.
const FINAL = new Set(["succeeded", "failed", "cancelled", "revoked"]);
const STATES = ["pending", "running", "paused", "retry", "succeeded", "failed", "cancelled",
  "revoked"];
const main = document.getElementById("main");
const liveBadge = document.getElementById("live");
const keyInput = document.getElementById("key");
let config = { read_only: true, csrf: "" };
let cluster = null;          // the last cluster message
let clusterListeners = [];   // pages that redraw on cluster changes
let leave = () => {};        // the current page's clean-up

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}
const num = (x) => (Number.isInteger(x) ? String(x) : x.toFixed(1));
function dur(s) {  // the same words as interactive_tasks.view.format_duration
  s = Math.max(0, Math.floor(s));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${String(Math.floor(s / 60) % 60).padStart(2, "0")}m`;
  return `${Math.floor(s / 86400)}d${String(Math.floor(s / 3600) % 24).padStart(2, "0")}h`;
}
function badge(state) { return el("span", `badge s-${state}`, state); }
function setBar(b, cur, total, state) {
  b.dataset.state = state;
  const frac = cur != null && total ? Math.min(1, Math.max(0, cur / total)) : (state === "succeeded" ? 1 : 0);
  b.firstChild.style.width = `${(frac * 100).toFixed(1)}%`;
  return b;
}
function bar(cur, total, state) {
  const b = el("div", "bar");
  b.append(el("i"));
  return setBar(b, cur, total, state);
}
function clear(node) { node.replaceChildren(); return node; }

// -- live cluster stream ------------------------------------------------------------------
function connectCluster() {
  const source = new EventSource("/api/stream/cluster");
  source.onopen = () => { liveBadge.textContent = "● live"; liveBadge.classList.add("on"); };
  source.onerror = () => { liveBadge.textContent = "○ reconnecting"; liveBadge.classList.remove("on"); };
  source.onmessage = (msg) => {
    cluster = JSON.parse(msg.data);
    for (const fn of clusterListeners) fn(cluster);
  };
}
function onCluster(fn) {
  clusterListeners.push(fn);
  if (cluster) fn(cluster);
  return () => { clusterListeners = clusterListeners.filter((f) => f !== fn); };
}

// -- control --------------------------------------------------------------------------------
async function control(taskId, body) {
  const headers = { "Content-Type": "application/json", "X-CSRF-Token": config.csrf };
  const key = keyInput.value || sessionStorage.getItem("itask-key") || "";
  if (key) headers["X-Itask-Key"] = key;
  const resp = await fetch(`/api/task/${encodeURIComponent(taskId)}/control`, {
    method: "POST", headers, body: JSON.stringify(body), credentials: "same-origin" });
  let data = {};
  try { data = await resp.json(); } catch (e) { data = { error: resp.statusText }; }
  if (!resp.ok) throw new Error(`${resp.status}: ${data.error || resp.statusText}`);
  return data;
}

// -- charts (SVG polylines) ----------------------------------------------------------------
function lineChart(series, { height = 120, width = 800, ymax = 0 } = {}) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  let x0 = Infinity, x1 = -Infinity, y1 = ymax || 0;
  for (const s of series) for (const [x, y] of s.points) {
    x0 = Math.min(x0, x); x1 = Math.max(x1, x); y1 = Math.max(y1, y);
  }
  if (!(x1 > x0)) x1 = x0 + 1;
  if (!(y1 > 0)) y1 = 1;
  series.forEach((s, i) => {
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("class", s.cls || `s${i + 1}`);
    line.setAttribute("points", s.points.map(([x, y]) =>
      `${(((x - x0) / (x1 - x0)) * width).toFixed(1)},${(height - 4 - (y / y1) * (height - 8)).toFixed(1)}`).join(" "));
    svg.append(line);
  });
  return svg;
}

// -- Tasks page ----------------------------------------------------------------------------
function tasksPage(params) {
  main.append(el("h1", null, "Tasks"));
  const filters = el("div", "filters");
  const state = el("select");
  state.id = "f-state";
  for (const s of ["", "active", ...STATES]) {
    const o = el("option", null, s || "any state"); o.value = s; state.append(o);
  }
  const inputs = {};
  for (const [name, hint] of [["name", "name"], ["worker", "worker"], ["queue", "queue"], ["q", "task id"]]) {
    const i = el("input"); i.id = `f-${name}`; i.placeholder = hint; i.value = params.get(name) || "";
    inputs[name] = i;
  }
  state.value = params.get("state") || "";
  filters.append(state, inputs.name, inputs.worker, inputs.queue, inputs.q);
  const table = el("table", "tasks");
  const head = el("tr");
  for (const h of ["ID", "Task", "State", "Progress", "Worker", "Queue", "Age"]) head.append(el("th", null, h));
  const thead = el("thead"); thead.append(head);
  const tbody = el("tbody");
  table.append(thead, tbody);
  const pager = el("div", "pager");
  const prev = el("button", null, "‹ Newer"), next = el("button", null, "Older ›");
  const info = el("span", "dim");
  pager.append(prev, info, next);
  main.append(filters, table, pager);
  let page = Number(params.get("page") || 1);
  let pending = false, again = false;

  async function load() {
    if (pending) { again = true; return; }
    pending = true;
    const q = new URLSearchParams({ state: state.value, page: String(page) });
    for (const [k, i] of Object.entries(inputs)) if (i.value) q.set(k, i.value);
    try {
      const resp = await fetch(`/api/tasks?${q}`, { credentials: "same-origin" });
      const data = await resp.json();
      draw(data);
    } finally {
      pending = false;
      if (again) { again = false; load(); }
    }
  }
  function draw(data) {
    clear(tbody);
    for (const t of data.tasks) {
      const tr = el("tr", "task-row");
      tr.dataset.id = t.id;
      const link = el("a", "mono", t.id.slice(0, 8)); link.href = `#/task/${encodeURIComponent(t.id)}`;
      link.title = t.id;
      const idCell = el("td"); idCell.append(link);
      const stateCell = el("td"); stateCell.append(badge(t.state));
      const prog = el("td");
      if (t.current != null) {
        prog.append(bar(t.current, t.total, t.state));
        prog.title = t.total ? `${num(t.current)}/${num(t.total)}` : `${num(t.current)} done`;
      }
      const begin = t.received ?? t.started;
      const age = begin != null ? dur((t.finished ?? data.now) - begin) : "";
      tr.append(idCell, el("td", null, t.name), stateCell, prog, el("td", null, t.worker),
        el("td", null, t.queue), el("td", "num", age));
      tbody.append(tr);
    }
    if (!data.tasks.length) {
      const tr = el("tr"); const td = el("td", "empty", "no tasks"); td.colSpan = 7; tr.append(td); tbody.append(tr);
    }
    const pages = Math.max(1, Math.ceil(data.total / data.per_page));
    info.textContent = `page ${data.page} of ${pages} · ${data.total} tasks`;
    prev.disabled = data.page <= 1;
    next.disabled = data.page >= pages;
  }
  prev.onclick = () => { page = Math.max(1, page - 1); load(); };
  next.onclick = () => { page += 1; load(); };
  const refilter = () => { page = 1; load(); };
  state.onchange = refilter;
  for (const i of Object.values(inputs)) i.oninput = refilter;
  load();  // at once; then again whenever the cluster changes
  return onCluster(() => load());
}

// -- Task page -----------------------------------------------------------------------------
function taskPage(taskId) {
  const head = el("div", "task-head");
  const title = el("h1", null, taskId);
  const stateBadge = el("span", "badge", "…"); stateBadge.id = "state";
  const meta = el("span", "meta");
  head.append(title, stateBadge, meta);
  const notice = el("div", "notice");
  const progressRow = el("div", "progress-row");
  const progressBar = bar(null, null, "pending"); progressBar.id = "bar";
  const nums = el("span", "nums mono"); nums.id = "progress";
  const speed = el("span", "nums mono"); speed.id = "speed";
  progressRow.append(progressBar, nums, speed);
  const step = el("div", "step");
  const pausedNote = el("div", "paused-note", "⏸ paused: the task is on hold until it is resumed");
  const chartBox = el("div");
  const question = el("div", "question"); question.id = "question";
  const controls = el("div", "controls"); controls.id = "controls";
  const status = el("div", "status"); status.id = "status";
  const outcome = el("div", "outcome"); outcome.id = "outcome";
  const traceback = el("pre", "traceback"); traceback.id = "traceback";
  const lines = el("div", "lines"); lines.id = "lines";
  main.append(head, notice, progressRow, step, pausedNote, chartBox, question, controls, status,
    outcome, traceback, el("h2", null, "Events"), lines);
  let view = null;
  let chart = [];
  const busy = { on: false };

  async function act(body, label) {
    status.className = "status"; status.textContent = `${label}…`;
    busy.on = true; drawControls();
    try {
      await control(taskId, body);
      status.textContent = `${label}: delivered`;
    } catch (e) {
      status.className = "status error"; status.textContent = `${label} failed: ${e.message}`;
    } finally { busy.on = false; drawControls(); }
  }
  const buttons = {};
  if (!config.read_only) {
    for (const [action, label, cls] of [["pause", "Pause"], ["resume", "Resume"],
      ["hard-pause", "Hard pause"], ["cancel", "Cancel", "danger"]]) {
      const b = el("button", cls || null, label);
      b.dataset.action = action;
      b.onclick = () => act({ action }, label);
      buttons[action] = b; controls.append(b);
    }
    const msg = el("input"); msg.id = "message"; msg.placeholder = "message (JSON or text)";
    const send = el("button", null, "Send"); send.dataset.action = "send";
    const sendIt = () => {
      let data = msg.value; if (!data) return;
      try { data = JSON.parse(data); } catch (e) { /* plain text */ }
      msg.value = ""; act({ action: "send", data }, "send");
    };
    send.onclick = sendIt;
    msg.onkeydown = (e) => { if (e.key === "Enter") sendIt(); };
    buttons.send = send; controls.append(msg, send);
  }
  function drawControls() {
    if (!view) return;
    const final = view.final;
    for (const [action, b] of Object.entries(buttons)) {
      b.disabled = busy.on || final || (action === "resume" && view.state !== "paused") ||
        ((action === "pause" || action === "hard-pause") && view.state === "paused");
    }
    controls.hidden = config.read_only || final;
  }
  function drawQuestion() {
    clear(question);
    const q = view.question;
    question.hidden = !q;
    if (!q) return;
    question.append(el("div", "prompt", `? ${q.prompt}`));
    if (config.read_only) return;
    const answer = el("input"); answer.id = "answer"; answer.placeholder = "your answer";
    const go = el("button", null, "Answer"); go.dataset.action = "answer";
    const submit = (value) => act({ action: "answer", value }, "answer");
    go.onclick = () => submit(answer.value);
    answer.onkeydown = (e) => { if (e.key === "Enter") submit(answer.value); };
    for (const choice of q.choices || []) {
      const c = el("button", null, choice); c.onclick = () => submit(choice); question.append(c);
    }
    question.append(answer, go);
  }
  function draw() {
    title.textContent = `${view.name || "task"} `;
    title.append(el("span", "mono dim", view.task_id));
    stateBadge.className = `badge s-${view.state}`;
    stateBadge.textContent = view.state;
    meta.textContent = [view.worker && `worker ${view.worker}`, view.pid && `pid ${view.pid}`,
      view.run > 1 && `run ${view.run}`].filter(Boolean).join(" · ");
    notice.textContent = view.notice || "";
    const cur = view.current, total = view.total;
    setBar(progressBar, cur, total, view.state);
    nums.textContent = cur == null ? "" : total ? `${num(cur)}/${num(total)} ${Math.floor((cur / total) * 100)}%` : `${num(cur)} done`;
    speed.textContent = [view.rate_text, view.eta_text].filter(Boolean).join("  ");
    step.textContent = view.progress_message || "";
    pausedNote.hidden = view.state !== "paused";
    outcome.className = `outcome s-${view.state}`;
    outcome.textContent = view.outcome || "";
    outcome.hidden = !view.outcome;
    traceback.textContent = view.traceback || "";
    traceback.hidden = !view.traceback;
    drawQuestion();
    drawControls();
    drawChart();
  }
  function drawChart() {
    clear(chartBox);
    if (chart.length > 1) chartBox.append(lineChart([{ points: chart }], { ymax: view.total || 0 }));
  }
  function addEntries(entries) {
    const base = view && view.started;
    for (const e of entries) {
      const row = el("div", `line k-${e.kind} level-${(e.level || "").toLowerCase()}`);
      row.dataset.seq = `${e.run}.${e.seq}`;
      const t = base != null ? `+${(e.ts - base).toFixed(1)}s` : new Date(e.ts * 1000).toLocaleTimeString();
      const kind = e.kind === "log" ? (e.level || "log").toUpperCase() : e.kind;
      row.append(el("span", "t", t), el("span", "k", kind), document.createTextNode(e.text || ""));
      lines.append(row);
    }
    if (entries.length) lines.scrollTop = lines.scrollHeight;
  }
  const source = new EventSource(`/api/stream/task/${encodeURIComponent(taskId)}`);
  source.onmessage = (msg) => {
    const data = JSON.parse(msg.data);
    if (data.reset) clear(lines);
    view = data.view;
    if (data.chart) chart = data.chart;
    else if (data.point && (!chart.length || chart[chart.length - 1][0] !== data.point[0])) chart.push(data.point);
    addEntries(data.entries || []);
    draw();
    if (view.final) source.close();
  };
  return () => source.close();
}

// -- Workers page --------------------------------------------------------------------------
function workersPage() {
  main.append(el("h1", null, "Workers"));
  const table = el("table", "workers");
  const tr = el("tr");
  for (const h of ["Worker", "PID", "State", "Pool", "Queues", "Busy", "Active", "Processed", "Uptime", "Task"]) tr.append(el("th", null, h));
  const thead = el("thead"); thead.append(tr);
  const tbody = el("tbody");
  table.append(thead, tbody);
  main.append(table);
  return onCluster((c) => {
    clear(tbody);
    for (const w of c.workers) {
      const row = el("tr", w.online ? "worker" : "worker offline");
      const children = w.children || [];
      const busy = children.filter((x) => x.state === "busy").length;
      const stateCell = el("td"); stateCell.append(el("span", w.online ? "s-running" : "s-failed", w.online ? "online" : "offline"));
      row.append(el("td", "mono", w.worker), el("td", "num", String(w.pid ?? "")), stateCell,
        el("td", null, `${w.pool || "?"} ×${w.concurrency ?? children.length}`),
        el("td", null, (w.queues || []).join(", ")), el("td", "num", String(busy)),
        el("td", "num", String(w.active ?? 0)), el("td", "num", String(w.processed ?? 0)),
        el("td", "num", dur(w.uptime || 0)), el("td"));
      tbody.append(row);
      children.forEach((child, i) => {
        const crow = el("tr", "child");
        const task = el("td");
        if (child.task_id) {
          const a = el("a", null, `${child.task || ""} ${child.task_id.slice(0, 8)}`);
          a.href = `#/task/${encodeURIComponent(child.task_id)}`; task.append(a);
        }
        crow.append(el("td", null, `${i === children.length - 1 ? "└" : "├"} process`),
          el("td", "num", String(child.pid ?? "")), el("td", null, child.state || "?"),
          el("td"), el("td"), el("td"), el("td"), el("td"), el("td"), task);
        tbody.append(crow);
      });
    }
    if (!c.workers.length) {
      const r = el("tr"); const td = el("td", "empty", "no workers"); td.colSpan = 10; r.append(td); tbody.append(r);
    }
  });
}

// -- Overview page -------------------------------------------------------------------------
function overviewPage() {
  main.append(el("h1", null, "Overview"));
  const cards = el("div", "cards");
  const rateBox = el("div"), statesBox = el("div"), legend = el("div", "legend");
  const queues = el("table", "queues");
  main.append(cards, el("h2", null, "Tasks finished per second"), rateBox,
    el("h2", null, "Tasks by state"), statesBox, legend, el("h2", null, "Queues"), queues);
  const shown = ["running", "paused", "pending", "succeeded", "failed"];
  return onCluster((c) => {
    const o = c.overview;
    clear(cards);
    const card = (label, value, id) => {
      const d = el("div", "card"); if (id) d.id = id;
      d.append(el("b", null, String(value)), el("span", null, label)); cards.append(d);
    };
    card("workers online", `${o.online}/${o.workers}`);
    for (const s of ["running", "paused", "pending", "succeeded", "failed"]) card(s, o.counts[s] || 0);
    card("dead letters", o.dead_letters ?? "?", "dead-letters");
    const h = o.history;
    const rates = [];
    for (let i = 1; i < h.length; i++) {
      const dt = h[i].ts - h[i - 1].ts;
      if (dt > 0) rates.push([h[i].ts, Math.max(0, (h[i].finished - h[i - 1].finished) / dt)]);
    }
    clear(rateBox).append(lineChart([{ points: rates }]));
    clear(statesBox).append(lineChart(shown.map((s) => ({
      cls: `c-${s}`, points: h.map((p) => [p.ts, p.states[s] || 0]) }))));
    clear(legend);
    shown.forEach((s) => legend.append(el("span", `c-${s}`, `— ${s}`)));
    clear(queues);
    const tr = el("tr"); tr.append(el("th", null, "Queue"), el("th", "num", "Waiting")); queues.append(tr);
    for (const [q, n] of Object.entries(o.queues)) {
      const r = el("tr"); r.append(el("td", "mono", q), el("td", "num", String(n))); queues.append(r);
    }
  });
}

// -- routing ---------------------------------------------------------------------------------
function route() {
  leave();
  clear(main);
  const hash = location.hash.replace(/^#\/?/, "") || "tasks";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  const [page, ...rest] = path.split("/");
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === page);
  if (page === "task" && rest.length) leave = taskPage(decodeURIComponent(rest.join("/")));
  else if (page === "workers") leave = workersPage();
  else if (page === "overview") leave = overviewPage();
  else leave = tasksPage(params);
}

async function start() {
  const resp = await fetch("/api/config", { credentials: "same-origin" });
  config = await resp.json();
  document.body.dataset.readOnly = String(config.read_only);
  document.getElementById("readonly").hidden = !config.read_only;
  const keyBox = document.getElementById("key-box");
  keyBox.hidden = config.read_only;
  // the key stays in this tab (sessionStorage), never in a URL
  keyInput.value = sessionStorage.getItem("itask-key") || "";
  keyInput.onchange = () => sessionStorage.setItem("itask-key", keyInput.value);
  connectCluster();
  window.addEventListener("hashchange", route);
  route();
  document.body.dataset.ready = "true";
}
start();
