// pixfarm web gallery: live progress over server-sent events and a lazy-loaded result grid.
// No inline script anywhere (the Content-Security-Policy forbids it); no build step.
"use strict";

function redraw(root, p) {
  const state = root.querySelector('[data-field="state"]');
  if (state) { state.textContent = p.state; state.className = "state " + p.state; }
  const prog = root.querySelector('[data-field="progress"]');
  // p.bar is server-rendered markup made only of numbers (no user input).
  if (prog) { prog.innerHTML = p.bar; }
  const rate = root.querySelector('[data-field="rate"]');
  if (rate && p.rate != null) { rate.textContent = p.rate.toFixed(2); }
}

function jobsPage() {
  const live = document.getElementById("live");
  if (!live) return;
  const es = new EventSource(live.dataset.src);
  es.addEventListener("progress", (ev) => {
    const p = JSON.parse(ev.data);
    const row = document.getElementById("job-" + p.job);
    if (row) redraw(row, p);
  });
}

function jobPage() {
  const section = document.querySelector("section.job");
  const grid = document.getElementById("grid");
  if (!section || !grid) return;
  const job = section.dataset.job;
  const shown = new Set(Array.from(grid.querySelectorAll(".card")).map((c) => c.dataset.index));
  let exhausted = !document.getElementById("more");

  function append(html) {
    const t = document.createElement("template");
    t.innerHTML = html; // server-rendered, every user string escaped
    for (const card of Array.from(t.content.querySelectorAll(".card"))) {
      if (shown.has(card.dataset.index)) continue;
      shown.add(card.dataset.index);
      grid.appendChild(card);
    }
    const none = document.getElementById("no-results");
    if (none && shown.size > 0) none.remove();
  }

  const more = document.getElementById("more");
  if (more) {
    let loading = false;
    const io = new IntersectionObserver(async (entries) => {
      if (!entries.some((e) => e.isIntersecting) || loading || !more.dataset.next) return;
      loading = true;
      const res = await fetch(more.dataset.next, { credentials: "same-origin" });
      if (res.ok) {
        append(await res.text());
        const next = res.headers.get("x-next-page");
        if (next) { more.dataset.next = next; } else { io.disconnect(); more.remove(); exhausted = true; }
      }
      loading = false;
    }, { rootMargin: "800px" });
    io.observe(more);
  }

  if (section.dataset.terminal === "true") return;
  const es = new EventSource("/jobs/" + job + "/events");
  es.addEventListener("progress", (ev) => {
    const p = JSON.parse(ev.data);
    redraw(section, p);
    if (["succeeded", "partial", "failed", "canceled"].includes(p.state)) es.close();
  });
  es.addEventListener("item", async (ev) => {
    // New results join the grid once the pages before them are loaded (the grid stays in order).
    if (!exhausted || shown.has(ev.data)) return;
    const res = await fetch("/jobs/" + job + "/results?size=1&page=" + encodeURIComponent(ev.data),
      { credentials: "same-origin" });
    if (res.ok) append(await res.text());
  });
}

document.addEventListener("DOMContentLoaded", () => { jobsPage(); jobPage(); });
