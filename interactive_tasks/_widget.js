// The browser side of interactive_tasks.widgets (anywidget ESM). Python sends traits;
// buttons answer with model.send({action, ...}). Task text only ever goes in textContent.
const FINAL = new Set(["succeeded", "failed", "cancelled", "revoked"]);
const LABEL = { pending: "○ pending", running: "▶ running", paused: "‖ paused",
  retry: "↻ retry", succeeded: "✔ succeeded", failed: "✘ failed",
  cancelled: "⊘ cancelled", revoked: "⊘ revoked" };
const TASK_TRAITS = ["task_id", "name", "state", "current", "total", "progress_message",
  "rate", "eta", "rate_text", "eta_text", "lines", "question", "worker", "outcome", "notice", "error", "busy"];

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}
const num = (x) => (Number.isInteger(x) ? String(x) : x.toFixed(1));

function button(cls, text, title, onClick) {
  const b = el("button", `it-btn ${cls}`, text);
  b.type = "button";
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function inputBox(cls, placeholder, label, onSubmit) {
  const box = el("span", `it-input ${cls}`);
  const input = el("input");
  input.type = "text";
  input.placeholder = placeholder;
  const submit = () => { onSubmit(input.value); input.value = ""; };
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") submit(); e.stopPropagation(); });
  box.append(input, button(`${cls}-send`, label, label, submit));
  return box;
}

// One task's view; `send(msg)` reaches Python; `update(get)` redraws from a trait getter.
function taskView(send, compact) {
  const root = el("div", compact ? "it-task it-row" : "it-task it-widget");
  const head = el("div", "it-head");
  const badge = el("span", "it-state");
  const title = el("span", "it-title");
  const meta = el("span", "it-meta");
  head.append(badge, title, meta);
  const bar = el("div", "it-bar");
  const fill = el("div", "it-bar-fill");
  bar.append(fill);
  const count = el("span", "it-count");
  const speed = el("span", "it-speed");
  const progress = el("div", "it-progress");
  progress.append(bar, count, speed);
  const step = el("div", "it-step");
  const lines = el("div", "it-lines");
  const question = el("div", "it-question");
  const prompt = el("span", "it-prompt");
  const choices = el("span", "it-choices");
  const answer = inputBox("it-answer", "answer…", "Answer",
    (value) => send({ action: "answer", value }));
  question.append(prompt, choices, answer);
  const pause = button("it-pause", compact ? "‖" : "‖ Pause", "Pause at the next checkpoint",
    () => send({ action: "pause" }));
  const resume = button("it-resume", compact ? "▶" : "▶ Resume", "Resume",
    () => send({ action: "resume" }));
  const cancel = button("it-cancel", compact ? "✕" : "✕ Cancel", "Cancel the task",
    () => send({ action: "cancel" }));
  const controls = el("div", "it-controls");
  controls.append(pause, resume, cancel);
  const message = inputBox("it-message", "message to the task…", "Send",
    (data) => send({ action: "send", data }));
  if (!compact) controls.append(message);
  const status = el("div", "it-status");
  const outcome = el("div", "it-outcome");
  const last = el("div", "it-last");
  if (compact) {
    // One line per task: state, name, bar, count, ETA, the most telling line, buttons.
    last.append(status, question, outcome, lines, step);
    root.append(badge, title, bar, count, speed, last, controls);
  } else {
    root.append(head, progress, step, lines, question, controls, status, outcome);
  }
  let qid = null;

  function update(get) {
    const state = get("state") || "pending";
    const final = FINAL.has(state);
    const cur = get("current");
    const total = get("total");
    root.dataset.state = state;
    root.dataset.current = cur == null ? "" : String(cur);
    root.dataset.taskId = get("task_id") || "";
    badge.textContent = LABEL[state] || state;
    badge.className = `it-state it-state-${state}`;
    const name = get("name") || "task";
    const id = get("task_id") || "";
    title.textContent = `${compact ? name.split(".").pop() : name} ${id.slice(0, 8)}`;
    title.title = `${name} ${id}`;
    meta.textContent = get("worker") ? `on ${get("worker")}` : "";
    let frac = null;
    if (cur != null && total) frac = Math.min(1, Math.max(0, cur / total));
    else if (state === "succeeded") frac = 1;
    bar.classList.toggle("it-indeterminate", frac == null && !final && cur != null);
    fill.style.width = frac == null ? (final ? "0%" : "") : `${(frac * 100).toFixed(1)}%`;
    bar.dataset.state = state;
    if (!compact) progress.hidden = cur == null && state !== "succeeded";
    const percent = total && !compact ? ` (${Math.floor((cur / total) * 100)}%)` : "";
    count.textContent = cur == null ? "" : total ? `${num(cur)}/${num(total)}${percent}` : num(cur);
    // rate and ETA come formatted by the shared view model (interactive_tasks/view.py)
    const rated = get("rate_text") || "";
    const left = get("eta_text") || "";
    speed.textContent = compact ? left : [rated, left].filter(Boolean).join(" · ");
    speed.title = rated;
    step.textContent = get("progress_message") || "";
    step.hidden = !step.textContent;
    const items = get("lines") || [];
    const shown = compact ? items.slice(-1) : items;
    lines.replaceChildren(...shown.map((line) => {
      const row = el("div", `it-line it-line-${line.kind} it-level-${(line.level || "").toLowerCase()}`);
      row.textContent = line.kind === "message" ? `→ ${line.text}` : line.text;
      return row;
    }));
    lines.hidden = !shown.length;
    const q = get("question");
    question.hidden = !q;
    if (q && q.qid !== qid) {
      qid = q.qid;
      prompt.textContent = q.prompt;
      choices.replaceChildren(...(q.choices || []).map((c) =>
        button("it-choice", c, `Answer ${c}`, () => send({ action: "answer", value: c }))));
      answer.querySelector("input").value = "";
    }
    if (!q) qid = null;
    const paused = state === "paused";
    pause.disabled = final || paused;
    resume.disabled = final || !paused;
    cancel.disabled = final;
    for (const input of message.querySelectorAll("input, button")) input.disabled = final;
    const busy = get("busy");
    const error = get("error");
    const notice = get("notice");
    status.textContent = error || (busy ? `${busy}…` : notice || "");
    status.className = `it-status${error ? " it-error" : ""}`;
    status.hidden = !status.textContent;
    outcome.textContent = get("outcome") || "";
    outcome.hidden = !outcome.textContent;
    if (compact) {
      // Only the first of: control status, question, outcome, last line, progress message.
      let shownOne = false;
      for (const part of last.children) {
        part.hidden = part.hidden || shownOne;
        shownOne = shownOne || !part.hidden;
      }
    }
  }
  return { root, update };
}

function renderTask(model, el_) {
  const view = taskView((msg) => model.send(msg), false);
  el_.append(view.root);
  return view;
}

function renderWatch(model, el_) {
  const table = el("div", "it-watch");
  el_.append(table);
  const views = new Map();
  return {
    update() {
      const rows = model.get("rows") || [];
      const errors = model.get("errors") || {};
      const busy = model.get("busy") || {};
      const seen = new Set();
      rows.forEach((row, i) => {
        const id = row.task_id;
        seen.add(id);
        let view = views.get(id);
        if (!view) {
          view = taskView((msg) => model.send({ ...msg, task_id: id }), true);
          views.set(id, view);
        }
        // Move a row only when out of order: moving a node loses the focus of its input.
        if (table.children[i] !== view.root) table.insertBefore(view.root, table.children[i] || null);
        view.update((k) => (k === "error" ? errors[id] || "" : k === "busy" ? busy[id] || "" : row[k]));
      });
      for (const [id, view] of views) {
        if (!seen.has(id)) { view.root.remove(); views.delete(id); }
      }
    },
  };
}

export default {
  render({ model, el: root }) {
    const watch = model.get("view") === "watch";
    const view = watch ? renderWatch(model, root) : renderTask(model, root);
    const draw = watch ? () => view.update() : () => view.update((k) => model.get(k));
    let queued = false;
    const schedule = () => {
      if (queued) return;
      queued = true;
      queueMicrotask(() => { queued = false; draw(); });
    };
    const traits = watch ? ["rows", "errors", "busy"] : TASK_TRAITS;
    for (const name of traits) model.on(`change:${name}`, schedule);
    draw();
    return () => { for (const name of traits) model.off(`change:${name}`, schedule); };
  },
};
