// autoprune dashboard: a small single-page app over the /v1 API. No framework, no external assets: the
// Pareto plot is SVG drawn here. The API key lives in sessionStorage and goes out as `Authorization: Bearer`;
// live progress reads the job's Server-Sent Events through fetch (EventSource cannot send that header).
"use strict";

(() => {
  const KEY_STORE = "autoprune.apiKey";
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];
  const FINETUNED = "#ea580c";

  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
  const esc = (s) =>
    String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  const sleep = (ms, signal) =>
    new Promise((resolve) => {
      const t = setTimeout(resolve, ms);
      if (signal) signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
    });

  // --- formatting -------------------------------------------------------------------------------------------
  const num = (v, d = 4) => (typeof v === "number" && Number.isFinite(v) ? v.toFixed(d) : "–");
  const si = (v) => {
    if (typeof v !== "number" || !Number.isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(2) + " G";
    if (a >= 1e6) return (v / 1e6).toFixed(2) + " M";
    if (a >= 1e3) return (v / 1e3).toFixed(1) + " k";
    return String(v);
  };
  const bytes = (v) => {
    if (typeof v !== "number" || !Number.isFinite(v)) return "–";
    if (v >= 1 << 20) return (v / (1 << 20)).toFixed(2) + " MiB";
    if (v >= 1 << 10) return (v / (1 << 10)).toFixed(1) + " KiB";
    return v + " B";
  };
  const speed = (v) => (typeof v === "number" && Number.isFinite(v) ? v.toFixed(2) + "×" : "–");
  const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
  const shortId = (id) => String(id || "").slice(0, 8);
  const planText = (plan) => {
    const ratios = (plan && plan.ratios) || {};
    const parts = Object.entries(ratios).filter(([, r]) => r > 0).map(([g, r]) => `${g}=${Number(r).toFixed(2)}`);
    return parts.length ? parts.join(", ") : "unpruned";
  };

  // --- state ---------------------------------------------------------------------------------------------------
  const app = {
    key: sessionStorage.getItem(KEY_STORE) || "",
    catalog: null,
    names: new Map(), // model / dataset id -> name
    view: null, // {name, cleanup()}
  };

  class Unauthorized extends Error {}

  function notice(text) {
    const el = $("#notice");
    el.textContent = text || "";
    el.hidden = !text;
  }

  async function problemText(r) {
    try {
      const p = await r.json();
      return `${r.status} ${p.title || r.statusText}: ${p.detail || ""}`.trim();
    } catch {
      return `${r.status} ${r.statusText}`;
    }
  }

  /** A /v1 call with the key; a 401 logs out, any other error throws with the problem's detail. */
  async function api(path, opts = {}) {
    const headers = Object.assign({ Authorization: `Bearer ${app.key}` }, opts.headers || {});
    const r = await fetch(path, Object.assign({}, opts, { headers }));
    if (r.status === 401) {
      logout(`The API key was refused (${(await problemText(r)).replace(/^401 /, "")}). Log in again.`);
      throw new Unauthorized("unauthorized");
    }
    if (!r.ok) throw new Error(await problemText(r));
    return r;
  }
  const getJson = async (path, opts) => (await api(path, opts)).json();
  const postJson = (path, body) =>
    getJson(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

  function report(err) {
    if (err instanceof Unauthorized || (err && err.name === "AbortError")) return;
    notice(String((err && err.message) || err));
  }

  // --- login ---------------------------------------------------------------------------------------------------
  function logout(message) {
    app.key = "";
    sessionStorage.removeItem(KEY_STORE);
    app.catalog = null;
    show("login");
    $("#login-error").textContent = message || "";
  }

  async function login(key) {
    app.key = key;
    const r = await fetch("/v1/catalog", { headers: { Authorization: `Bearer ${key}` } });
    if (!r.ok) {
      app.key = "";
      throw new Error(r.status === 401 ? "That key was refused." : await problemText(r));
    }
    app.catalog = await r.json();
    sessionStorage.setItem(KEY_STORE, key);
  }

  async function catalog() {
    if (!app.catalog) app.catalog = await getJson("/v1/catalog");
    return app.catalog;
  }

  // --- views and routing ---------------------------------------------------------------------------------------
  function show(name) {
    if (app.view && app.view.cleanup) app.view.cleanup();
    app.view = { name, cleanup: null };
    for (const v of $$(".view")) v.hidden = v.id !== `view-${name}`;
    const authed = name !== "login";
    $("#nav").hidden = !authed;
    $("#logout").hidden = !authed;
    $("#tooltip").hidden = true;
    return app.view;
  }

  function route() {
    notice("");
    if (!app.key) return logout("");
    const hash = location.hash.replace(/^#\/?/, "");
    const [head, ...rest] = hash.split("/");
    const arg = decodeURIComponent(rest.join("/"));
    const views = { jobs: jobsView, submit: submitView, job: jobView, compare: compareView };
    const fn = views[head] || jobsView;
    fn(arg).catch(report);
  }

  // --- job list ------------------------------------------------------------------------------------------------
  async function nameOf(kind, id) {
    const k = `${kind}:${id}`;
    if (!app.names.has(k)) {
      app.names.set(k, id.slice(0, 8));
      try {
        const row = await getJson(`/v1/${kind}/${encodeURIComponent(id)}`);
        app.names.set(k, row.name || row.architecture || row.builtin || id.slice(0, 8));
      } catch (err) {
        if (err instanceof Unauthorized) throw err;
      }
    }
    return app.names.get(k);
  }

  function bestText(best) {
    if (!best) return "–";
    const sp = best.speedup ?? (best.latency_ratio ? 1 / best.latency_ratio : null);
    return `#${best.index}${best.stage === "finetuned" ? " (fine-tuned)" : ""}: q ${num(best.quality)} · ${speed(sp)}`;
  }

  function progressCell(job) {
    const p = job.progress || {};
    const total = p.total || 0;
    const bar = total ? `<progress max="${total}" value="${Math.min(p.done || 0, total)}"></progress>` : "";
    return `${bar}${p.done || 0}${total ? "/" + total : ""}`;
  }

  function stateBadge(job) {
    const s = job.state + (job.cancel_requested && !TERMINAL.has(job.state) ? " (cancelling)" : "");
    return `<span class="state ${esc(job.state)}">${esc(s)}</span>`;
  }

  async function jobsView() {
    const view = show("jobs");
    const selected = new Set();
    let timer = null;
    let shown = null;
    const tbody = $("#jobs-table tbody");
    const compareBtn = $("#compare-selected");
    compareBtn.disabled = true;
    compareBtn.onclick = () => { location.hash = `#/compare/${[...selected].join(",")}`; };

    async function refresh() {
      const page = await getJson("/v1/jobs?limit=200");
      if (app.view !== view) return;
      const rows = [];
      for (const j of page.items) {
        const [model, data] = await Promise.all([nameOf("models", j.model_id), nameOf("datasets", j.dataset_id)]);
        const spec = j.spec || {};
        rows.push(`<tr data-job="${esc(j.id)}">
          <td><input type="checkbox" class="pick" value="${esc(j.id)}" ${selected.has(j.id) ? "checked" : ""}
               aria-label="select for comparison"></td>
          <td><a href="#/job/${esc(j.id)}" title="${esc(j.id)}"><code>${esc(shortId(j.id))}</code></a></td>
          <td>${stateBadge(j)}</td>
          <td>${esc(spec.strategy || "")}</td>
          <td>${esc(model)} · ${esc(data)}</td>
          <td class="progress">${progressCell(j)}</td>
          <td>${esc(bestText(j.best))}</td>
          <td>${esc(when(j.created_at))}</td>
          <td>${TERMINAL.has(j.state) || j.cancel_requested ? "" : `<button type="button" class="small danger cancel" data-job="${esc(j.id)}">Cancel</button>`}</td>
        </tr>`);
      }
      if (app.view !== view) return;
      const html = rows.join("");
      if (shown !== html) { // re-render only on change: a click or a hover survives the refresh
        tbody.innerHTML = html;
        shown = html;
      }
      $("#jobs-empty").hidden = page.items.length > 0;
      compareBtn.disabled = selected.size < 2;
    }

    tbody.onclick = async (ev) => {
      const pick = ev.target.closest("input.pick");
      if (pick) {
        if (pick.checked) selected.add(pick.value);
        else selected.delete(pick.value);
        compareBtn.disabled = selected.size < 2;
        return;
      }
      const btn = ev.target.closest("button.cancel");
      if (btn) {
        btn.disabled = true;
        try {
          await api(`/v1/jobs/${encodeURIComponent(btn.dataset.job)}/cancel`, { method: "POST" });
          await refresh();
        } catch (err) { report(err); }
      }
    };

    const loop = async () => {
      try { await refresh(); } catch (err) { report(err); if (err instanceof Unauthorized) return; }
      if (app.view === view) timer = setTimeout(loop, 2000);
    };
    view.cleanup = () => clearTimeout(timer);
    await loop();
  }

  // --- submit --------------------------------------------------------------------------------------------------
  async function submitView() {
    show("submit");
    const cat = await catalog();
    const fill = (sel, items, chosen) => {
      const el = $(sel);
      el.innerHTML = items.map((v) => `<option${v === chosen ? " selected" : ""}>${esc(v)}</option>`).join("");
    };
    fill("#f-architecture", cat.architectures, cat.architectures.includes("resnet20") ? "resnet20" : cat.architectures[0]);
    fill("#f-dataset", cat.datasets, cat.datasets.includes("digits") ? "digits" : cat.datasets[0]);
    const strategies = cat.strategies.map((s) => s.name);
    fill("#f-strategy", strategies, strategies.includes(cat.default_strategy) ? cat.default_strategy : strategies[0]);
    $("#f-strategy").title = "";
    $("#f-metric").innerHTML = `<option value="">(default)</option>` + cat.metrics.map((m) => `<option>${esc(m)}</option>`).join("");
    $("#f-formats").innerHTML = "<legend>Export formats</legend>" + cat.export_formats
      .map((f) => `<label><input type="checkbox" name="format" value="${esc(f)}" checked> ${esc(f)}</label>`)
      .join("");
    $("#f-status").textContent = "";
    $("#f-submit").disabled = false;
  }

  async function submitJob(ev) {
    ev.preventDefault();
    const status = $("#f-status");
    const button = $("#f-submit");
    const formats = $$("#f-formats input:checked").map((i) => i.value);
    if (!formats.length) { status.textContent = "Pick at least one export format."; return; }
    button.disabled = true;
    try {
      status.textContent = "creating the dataset…";
      const dataset = await postJson("/v1/datasets", { builtin: $("#f-dataset").value });
      status.textContent = "creating the model…";
      const arch = encodeURIComponent($("#f-architecture").value);
      const model = await getJson(`/v1/models?architecture=${arch}`, { method: "POST" });
      const body = {
        model_id: model.id,
        dataset_id: dataset.id,
        strategy: $("#f-strategy").value,
        budget: parseInt($("#f-budget").value, 10),
        finetune_top: parseInt($("#f-finetune-top").value || "0", 10),
        seed: parseInt($("#f-seed").value || "0", 10),
        batch_size: parseInt($("#f-batch-size").value || "1", 10),
        export_formats: formats,
      };
      if ($("#f-metric").value) body.metric = $("#f-metric").value;
      if ($("#f-select").value) body.select = $("#f-select").value;
      if ($("#f-max-ratio").value !== "") body.max_ratio = parseFloat($("#f-max-ratio").value);
      status.textContent = "submitting the job…";
      const job = await postJson("/v1/jobs", body);
      location.hash = `#/job/${job.id}`;
    } catch (err) {
      if (!(err instanceof Unauthorized)) status.textContent = String(err.message || err);
      button.disabled = false;
    }
  }

  // --- the Pareto plot (SVG) -----------------------------------------------------------------------------------
  const pointKey = (p) => `${p.stage}:${p.index}`;

  /** The non-dominated points: quality up, measured latency down. */
  function front(points) {
    const sorted = [...points].sort((a, b) => a.latency_ms - b.latency_ms || b.quality - a.quality);
    const out = [];
    let bestQ = -Infinity;
    for (const p of sorted) if (p.quality > bestQ) { out.push(p); bestQ = p.quality; }
    return out;
  }

  function niceTicks(lo, hi, n = 5) {
    const span = hi - lo;
    if (!(span > 0)) return [lo];
    const raw = span / n;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const err = raw / mag;
    const step = (err >= 7.5 ? 10 : err >= 3.5 ? 5 : err >= 1.5 ? 2 : 1) * mag;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
    return out;
  }

  function domain(values) {
    let lo = Math.min(...values);
    let hi = Math.max(...values);
    if (!(hi > lo)) { const pad = Math.abs(lo) * 0.05 || 0.05; lo -= pad; hi += pad; }
    const pad = (hi - lo) * 0.06;
    return [lo - pad, hi + pad];
  }

  const diamond = (x, y, r) => `M${x} ${y - r}L${x + r} ${y}L${x} ${y + r}L${x - r} ${y}Z`;

  /**
   * Draw `groups` ([{label, color, points, best}]) into `container`; every evaluation is one `.pt` element
   * (data-g: group, data-k: stage:index) and hovering one shows its figures and plan.
   */
  function drawPlot(container, groups, { metric = "quality", legend = false } = {}) {
    const W = 760, H = 420, L = 64, R = 18, T = 16, B = 46;
    const all = groups.flatMap((g) => g.points);
    const multi = groups.length > 1;
    container._groups = groups;
    if (!all.length) {
      container.innerHTML = `<svg viewBox="0 0 ${W} ${H}" role="img"><text class="empty" x="${W / 2}" y="${H / 2}"
        text-anchor="middle">waiting for the first evaluation…</text></svg>`;
      return;
    }
    const [x0, x1] = domain(all.map((p) => p.latency_ms));
    const [y0, y1] = domain(all.map((p) => p.quality));
    const sx = (v) => +(L + ((v - x0) / (x1 - x0)) * (W - L - R)).toFixed(2);
    const sy = (v) => +(H - B - ((v - y0) / (y1 - y0)) * (H - T - B)).toFixed(2);
    const parts = [];
    for (const t of niceTicks(x0, x1)) {
      const x = sx(t);
      parts.push(`<line class="grid-line" x1="${x}" x2="${x}" y1="${T}" y2="${H - B}"/>`,
        `<text x="${x}" y="${H - B + 16}" text-anchor="middle">${t}</text>`);
    }
    for (const t of niceTicks(y0, y1)) {
      const y = sy(t);
      parts.push(`<line class="grid-line" x1="${L}" x2="${W - R}" y1="${y}" y2="${y}"/>`,
        `<text x="${L - 6}" y="${y + 4}" text-anchor="end">${t}</text>`);
    }
    parts.push(`<g class="axis"><line x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`,
      `<line x1="${L}" x2="${L}" y1="${T}" y2="${H - B}"/></g>`,
      `<text class="axis-label" x="${(L + W - R) / 2}" y="${H - 8}" text-anchor="middle">measured latency (ms)</text>`,
      `<text class="axis-label" transform="translate(14 ${(T + H - B) / 2}) rotate(-90)" text-anchor="middle">${esc(metric)}</text>`);

    groups.forEach((g, gi) => {
      const color = g.color;
      const onFront = new Set(front(g.points).map(pointKey));
      const f = front(g.points);
      if (f.length > 1) {
        let d = `M${sx(f[0].latency_ms)} ${sy(f[0].quality)}`;
        for (const p of f.slice(1)) d += `H${sx(p.latency_ms)}V${sy(p.quality)}`;
        parts.push(`<path class="front" stroke="${color}" d="${d}"/>`);
      }
      const search = new Map(g.points.filter((p) => p.stage === "search").map((p) => [p.index, p]));
      for (const p of g.points) {
        const s = p.stage === "finetuned" && search.get(p.index);
        if (s) {
          parts.push(`<line class="link" stroke="${FINETUNED}" x1="${sx(s.latency_ms)}" y1="${sy(s.quality)}"
            x2="${sx(p.latency_ms)}" y2="${sy(p.quality)}"/>`);
        }
      }
      for (const p of g.points) {
        const k = pointKey(p);
        const x = sx(p.latency_ms), y = sy(p.quality);
        const cls = `pt ${p.stage}${onFront.has(k) ? " on" : " off"}`;
        const attrs = `data-g="${gi}" data-k="${esc(k)}"`;
        if (p.stage === "finetuned") {
          parts.push(`<path class="${cls}" ${attrs} d="${diamond(x, y, 6)}" fill="${FINETUNED}" stroke="${FINETUNED}"/>`);
        } else {
          parts.push(`<circle class="${cls}" ${attrs} cx="${x}" cy="${y}" r="4.5" fill="${color}" stroke="${color}"/>`);
        }
      }
      const base = search.get(0);
      if (base) {
        const x = sx(base.latency_ms), y = sy(base.quality);
        parts.push(`<rect class="mark unpruned" x="${x - 8}" y="${y - 8}" width="16" height="16"/>`);
        if (!multi) parts.push(`<text class="mark-label" x="${x - 11}" y="${y - 11}" text-anchor="end">unpruned</text>`);
      }
      const best = g.best && g.points.find((p) => p.index === g.best.index && p.stage === (g.best.stage || "search"));
      if (best) {
        const x = sx(best.latency_ms), y = sy(best.quality);
        parts.push(`<circle class="mark best" cx="${x}" cy="${y}" r="10"/>`);
        if (!multi) {
          const edge = x > W - R - 50; // near the right edge: the label goes below, to the left
          parts.push(`<text class="mark-label" x="${edge ? x - 13 : x + 13}" y="${edge ? y + 24 : y - 10}"
            text-anchor="${edge ? "end" : "start"}">best</text>`);
        }
      }
    });
    let legendHtml = "";
    if (legend) {
      legendHtml = `<div class="legend">` + groups.map((g) =>
        `<span><svg class="swatch" width="26" height="12"><line x1="0" x2="26" y1="6" y2="6" stroke="${g.color}" stroke-width="3"/></svg>
         ${esc(g.label)}</span>`).join("") +
        `</div><p class="hint">□ unpruned · ◯ best · ◆ fine-tuned · hollow: off the front</p>`;
    }
    container.innerHTML = `<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="Pareto front">${parts.join("")}</svg>${legendHtml}`;
  }

  function tooltipHtml(g, p, multi) {
    const plan = p.plan ? planText(p.plan) : "(loading…)";
    const sp = p.speedup ?? (p.latency_ratio ? 1 / p.latency_ratio : null);
    return `${multi ? `<div>${esc(g.label)}</div>` : ""}
      <b>#${p.index}</b> ${esc(p.stage)}${p.index === 0 && p.stage === "search" ? " (unpruned)" : ""}<br>
      quality ${num(p.quality)}${p.test_quality != null ? ` · test ${num(p.test_quality)}` : ""}<br>
      latency ${num(p.latency_ms, 3)} ms · speed-up ${speed(sp)}<br>
      MACs ${si(p.macs)} · params ${si(p.params)} · size ${bytes(p.size_bytes)}<br>
      <span class="plan">${esc(plan)}</span>`;
  }

  function attachTooltip(container) {
    const tip = $("#tooltip");
    container.addEventListener("mousemove", (ev) => {
      const el = ev.target.closest && ev.target.closest(".pt");
      const groups = container._groups || [];
      if (!el) { tip.hidden = true; return; }
      const g = groups[+el.dataset.g];
      const p = g && g.points.find((q) => pointKey(q) === el.dataset.k);
      if (!p) { tip.hidden = true; return; }
      tip.innerHTML = tooltipHtml(g, p, groups.length > 1);
      tip.hidden = false;
      const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
      const y = Math.min(ev.clientY + 14, window.innerHeight - tip.offsetHeight - 8);
      tip.style.left = `${x}px`;
      tip.style.top = `${y}px`;
    });
    container.addEventListener("mouseleave", () => { tip.hidden = true; });
  }

  // --- evaluations ---------------------------------------------------------------------------------------------
  /** An evaluation as the plot and table use it, from an EvaluationOut row or an event's summary. */
  function normalise(e) {
    const ratio = e.latency_ratio;
    return {
      index: e.index,
      stage: e.stage || "search",
      quality: e.quality,
      test_quality: e.test_quality ?? null,
      latency_ms: e.latency_ms,
      latency_ratio: ratio,
      speedup: e.speedup ?? (ratio ? 1 / ratio : null),
      macs: e.macs,
      params: e.params,
      size_bytes: e.size_bytes,
      reward: e.reward,
      on_front: e.on_front ?? null,
      plan: e.plan || null,
      record: e.record || null,
    };
  }

  async function allEvaluations(jobId) {
    const out = [];
    for (let offset = 0; ; ) {
      const page = await getJson(`/v1/jobs/${encodeURIComponent(jobId)}/evaluations?limit=1000&offset=${offset}`);
      out.push(...page.items.map(normalise));
      offset += page.items.length;
      if (!page.items.length || offset >= page.total) return out;
    }
  }

  /** Read a job's SSE stream through fetch (with the key), resuming after the last event id until `done()`. */
  async function followEvents(jobId, onEvent, signal, done, { after = 0, exports = false } = {}) {
    let last = after;
    while (!signal.aborted) {
      try {
        const q = [last ? `after=${last}` : "", exports ? "follow_exports=true" : ""].filter(Boolean).join("&");
        const r = await api(`/v1/jobs/${encodeURIComponent(jobId)}/events${q ? "?" + q : ""}`, {
          signal, headers: { Accept: "text/event-stream" },
        });
        const reader = r.body.getReader();
        const decoder = new TextDecoder();
        let buf = "";
        let ev = { event: "message", data: [], id: null };
        for (;;) {
          const { value, done: end } = await reader.read();
          if (end) break;
          buf += decoder.decode(value, { stream: true });
          let m;
          while ((m = /\r\n|\n|\r(?!$)/.exec(buf))) {
            const line = buf.slice(0, m.index);
            buf = buf.slice(m.index + m[0].length);
            if (line === "") {
              if (ev.data.length) {
                if (ev.id) last = parseInt(ev.id, 10) || last;
                let data = ev.data.join("\n");
                try { data = JSON.parse(data); } catch { /* plain text */ }
                onEvent(ev.event, data);
              }
              ev = { event: "message", data: [], id: null };
              continue;
            }
            if (line.startsWith(":")) continue;
            const i = line.indexOf(":");
            const field = i < 0 ? line : line.slice(0, i);
            const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
            if (field === "event") ev.event = val;
            else if (field === "data") ev.data.push(val);
            else if (field === "id") ev.id = val;
          }
        }
      } catch (err) {
        if (signal.aborted || err instanceof Unauthorized) return;
      }
      if (done()) return;
      await sleep(1500, signal);
    }
  }

  // --- one job -------------------------------------------------------------------------------------------------
  const COLUMNS = {
    index: (p) => p.index, stage: (p) => p.stage, quality: (p) => p.quality, test_quality: (p) => p.test_quality,
    latency_ms: (p) => p.latency_ms, speedup: (p) => p.speedup, macs: (p) => p.macs, params: (p) => p.params,
    size_bytes: (p) => p.size_bytes, reward: (p) => p.reward, on_front: (p) => (p.on_front ? 1 : 0),
  };

  async function jobView(jobId) {
    const view = show("job");
    const ctrl = new AbortController();
    const jv = {
      job: null, points: new Map(), exports: [], requests: { items: [], pending: 0, done: 0, total: 0 },
      sort: { key: "index", dir: 1 }, phase: {}, refetch: null, lastId: 0, followingExports: false,
    };
    view.cleanup = () => { ctrl.abort(); clearTimeout(jv.refetch); clearTimeout(drawing); };
    $("#job-id").textContent = jobId;
    $("#job-log").innerHTML = "";
    $("#job-downloads tbody").innerHTML = "";
    $("#job-protocol").innerHTML = "";
    $("#job-evals tbody").innerHTML = "";
    const plot = $("#job-plot");
    const metric = () => (jv.job && jv.job.spec && jv.job.spec.metric) || "quality";
    const points = () => [...jv.points.values()];
    const live = () => app.view === view;

    function renderHeader() {
      const j = jv.job;
      if (!j) return;
      const badge = $("#job-state");
      badge.className = `state ${j.state}`;
      badge.textContent = j.state + (j.cancel_requested && !TERMINAL.has(j.state) ? " (cancelling)" : "");
      $("#job-cancel").hidden = TERMINAL.has(j.state) || j.cancel_requested;
      const s = j.spec || {};
      const facts = [
        ["strategy", s.strategy], ["model", app.names.get(`models:${j.model_id}`) || shortId(j.model_id)],
        ["dataset", app.names.get(`datasets:${j.dataset_id}`) || shortId(j.dataset_id)], ["budget", s.budget],
        ["metric", s.metric], ["select", s.select], ["fine-tune top", s.finetune_top],
        ["export formats", (s.export_formats || []).join(", ")], ["best point", bestText(j.best)],
        ["created", when(j.created_at)], ["started", when(j.started_at)], ["finished", when(j.finished_at)],
      ];
      $("#job-summary").innerHTML = facts.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v ?? "–")}</dd>`).join("");
      const err = $("#job-error");
      err.hidden = !j.error;
      err.textContent = j.error || "";
      renderProgress();
    }

    function renderProgress(phase, done, total) {
      const j = jv.job;
      if (phase !== undefined) jv.phase = { phase, done, total };
      const bar = $("#job-progress");
      let label = "search";
      let text = "";
      let value = 0;
      let max = 1;
      const p = (j && j.progress) || {};
      if (j && TERMINAL.has(j.state)) {
        label = j.state;
        value = max = 1;
        text = `${p.done || 0}${p.total ? "/" + p.total : ""} evaluations`;
      } else if (jv.phase && jv.phase.phase && jv.phase.phase !== "search") {
        label = jv.phase.phase;
        value = jv.phase.done || 0;
        max = jv.phase.total || 1;
        text = jv.phase.total ? `${value}/${max}` : "";
      } else if (j) {
        label = j.state === "queued" ? "queued" : "search";
        value = p.done || 0;
        max = p.total || 1;
        text = `${value}${p.total ? "/" + p.total : ""} evaluations`;
      }
      $("#job-phase").textContent = label;
      $("#job-progress-text").textContent = text;
      bar.max = max;
      bar.value = Math.min(value, max);
    }

    function renderPlot() {
      const short = shortId(jobId);
      drawPlot(plot, [{ label: short, short, color: COLORS[0], points: points(), best: jv.job && jv.job.best }], { metric: metric() });
    }

    function renderTable() {
      const { key, dir } = jv.sort;
      const get = COLUMNS[key];
      const rows = points().sort((a, b) => {
        const va = get(a), vb = get(b);
        if (va == null && vb == null) return a.index - b.index;
        if (va == null) return 1;
        if (vb == null) return -1;
        return (va < vb ? -1 : va > vb ? 1 : a.index - b.index) * dir;
      });
      const best = jv.job && jv.job.best;
      $("#job-evals tbody").innerHTML = rows.map((p) => {
        const isBest = best && best.index === p.index && (best.stage || "search") === p.stage;
        return `<tr data-k="${esc(pointKey(p))}" class="${isBest ? "best" : ""}">
          <td class="num">${p.index}</td><td>${esc(p.stage)}${isBest ? " ★" : ""}</td>
          <td class="num">${num(p.quality)}</td><td class="num">${num(p.test_quality)}</td>
          <td class="num">${num(p.latency_ms, 3)}</td><td class="num">${speed(p.speedup)}</td>
          <td class="num">${si(p.macs)}</td><td class="num">${si(p.params)}</td><td class="num">${bytes(p.size_bytes)}</td>
          <td class="num">${num(p.reward)}</td><td>${p.on_front ? "✓" : ""}</td>
          <td class="plan">${esc(p.plan ? planText(p.plan) : "")}</td></tr>`;
      }).join("");
      for (const th of $$("#job-evals th[data-sort]")) {
        th.classList.toggle("asc", th.dataset.sort === key && dir > 0);
        th.classList.toggle("desc", th.dataset.sort === key && dir < 0);
      }
      $("#job-evals-count").textContent = `(${rows.length})`;
    }

    function renderProtocol() {
      // a pruned point's protocol: the unpruned model is timed alone, the candidates interleaved with it
      const timed = points().filter((p) => p.record && p.record.latency);
      const withRecord = timed.find((p) => p.index > 0) || timed[0];
      if (!withRecord) return;
      const lat = withRecord.record.latency;
      const pr = lat.protocol || {};
      const base = points().find((p) => p.index === 0 && p.stage === "search");
      const facts = [
        ["runtime", pr.runtime], ["threads", pr.threads], ["batch size", pr.batch_size], ["warm-up runs", pr.warmup],
        ["timed runs", pr.repeats], ["interleaved with the unpruned model", pr.interleaved ? "yes" : "no"],
        ["meter", pr.meter], ["machine", pr.machine],
        ["cores / exclusive", `${(pr.cpus || []).join(",") || "–"} / ${pr.exclusive || "off"}` +
          (pr.lock_wait_ms ? ` (waited ${num(pr.lock_wait_ms, 0)} ms)` : "")],
        ["load (1 min) before / after", `${num(pr.load_before, 2)} / ${num(pr.load_after, 2)}`],
        ["unpruned latency", base ? `${num(base.latency_ms, 3)} ms` : "–"],
        ["versions", Object.entries(pr.versions || {}).map(([k, v]) => `${k} ${v}`).join(", ")],
      ];
      $("#job-protocol").innerHTML = facts.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v ?? "–")}</dd>`).join("");
    }

    /** Per point of the front (the front so far while the job runs; the best, and any point exported on
     * request): a download button per exported format, an export button for a format not exported yet, its
     * state while queued or running. The best is marked once the job has finished (it is chosen then). */
    function renderDownloads() {
      const tbody = $("#job-downloads tbody");
      const j = jv.job || {};
      const formats = (j.spec && j.spec.export_formats) || [];
      const byPoint = new Map();
      const group = (stage, index) => {
        const k = `${stage}:${index}`;
        if (!byPoint.has(k)) byPoint.set(k, { stage, index, best: false, items: new Map() });
        return byPoint.get(k);
      };
      if (j.state && j.state !== "queued") for (const p of points()) if (p.on_front) group(p.stage, p.index);
      if (TERMINAL.has(j.state) && j.best && Number.isInteger(j.best.index)) {
        group(j.best.stage || "search", j.best.index).best = true;
      }
      for (const e of jv.exports) {
        const g = group(e.stage, e.index);
        g.items.set(e.format, { export: e });
        g.best = g.best || (e.meta && e.meta.best === true);
      }
      for (const r of jv.requests.items) {
        const g = byPoint.get(`${r.stage}:${r.index}`);
        if (g && !g.items.has(r.format)) g.items.set(r.format, { request: r });
      }
      const groups = [...byPoint.values()].sort((a, b) => (b.best - a.best) || a.index - b.index);
      $("#job-downloads-hint").hidden = groups.length > 0;
      const rq = jv.requests;
      const prog = $("#job-exports-progress");
      prog.hidden = !rq.total;
      prog.textContent = rq.total ? `exports: ${rq.done}/${rq.total} made${rq.pending ? `, ${rq.pending} queued or running` : ""}` : "";
      tbody.innerHTML = groups.map((g) => {
        const p = jv.points.get(`${g.stage}:${g.index}`);
        const names = [...new Set([...formats, ...g.items.keys()])];
        const cells = names.map((fmt) => {
          const it = g.items.get(fmt) || {};
          const data = `data-stage="${esc(g.stage)}" data-index="${g.index}" data-format="${esc(fmt)}"`;
          if (it.export) {
            const e = it.export;
            const name = (e.meta && e.meta.filename) || `job-${shortId(jobId)}-${e.stage}-${e.index}.${e.format}`;
            return `<button type="button" class="small download" data-url="${esc(e.url)}" data-filename="${esc(name)}"
              ${data} title="${esc(bytes(e.size_bytes))}">${esc(fmt)}</button>`;
          }
          const r = it.request;
          if (r && (r.state === "queued" || r.state === "running")) {
            return `<span class="pending" ${data}>${esc(fmt)}: ${r.state === "running" ? "exporting…" : "queued"}</span>`;
          }
          const failed = r && r.state === "failed";
          return `<button type="button" class="small secondary export" ${data}
            title="${esc(failed ? "failed: " + (r.error || "") : "export this point")}">${failed ? "retry " : "export "}${esc(fmt)}</button>`;
        }).join(" ");
        return `<tr class="${g.best ? "best" : ""}" data-k="${esc(g.stage + ":" + g.index)}">
          <td>#${g.index} ${esc(g.stage)}${g.best ? " ★ best" : ""}</td>
          <td class="num">${p ? num(p.quality) : ""}</td><td class="num">${p ? speed(p.speedup) : ""}</td>
          <td>${cells}</td></tr>`;
      }).join("");
    }

    /** After the job: follow its export events (``follow_exports``) while some of its exports are queued. */
    function followExports() {
      if (jv.followingExports || !live()) return;
      jv.followingExports = true;
      followEvents(jobId, onEvent, ctrl.signal, () => !live() || jv.requests.pending === 0, { after: jv.lastId, exports: true })
        .catch(report)
        .finally(() => { jv.followingExports = false; if (live()) scheduleReload(0); });
    }

    async function requestExport(btn) {
      btn.disabled = true;
      try {
        await postJson(`/v1/jobs/${encodeURIComponent(jobId)}/exports`, {
          point: parseInt(btn.dataset.index, 10), stage: btn.dataset.stage, format: btn.dataset.format,
        });
        await reload();
      } finally {
        btn.disabled = false;
      }
    }

    async function reload() {
      const [job, evals] = await Promise.all([
        getJson(`/v1/jobs/${encodeURIComponent(jobId)}`), allEvaluations(jobId),
      ]);
      if (!live()) return;
      jv.job = job;
      for (const e of evals) jv.points.set(pointKey(e), e);
      if (job.state !== "queued") { // a running job's points can be exported while it runs
        const [exports, requests] = await Promise.all([
          getJson(`/v1/jobs/${encodeURIComponent(jobId)}/models`), getJson(`/v1/jobs/${encodeURIComponent(jobId)}/exports`),
        ]);
        if (!live()) return;
        jv.exports = exports;
        jv.requests = requests;
        renderDownloads();
        if (requests.pending > 0 && TERMINAL.has(job.state)) followExports(); // while it runs: its own stream
      }
      renderHeader();
      renderPlot();
      renderTable();
      renderProtocol();
    }

    // a replayed stream delivers many events at once: draw once for them, not once each
    let drawing = null;
    function renderSoon() {
      if (drawing) return;
      drawing = setTimeout(() => {
        drawing = null;
        if (!live()) return;
        renderHeader();
        renderPlot();
        renderTable();
      }, 40);
    }

    function scheduleReload(ms = 800) {
      clearTimeout(jv.refetch);
      jv.refetch = setTimeout(() => reload().catch(report), ms);
    }

    function addLog(text, at) {
      const li = document.createElement("li");
      li.textContent = `${at ? new Date(at).toLocaleTimeString() + "  " : ""}${text}`;
      $("#job-log").append(li);
    }

    function onEvent(kind, ev) {
      if (!live()) return;
      if (ev && Number.isInteger(ev.id)) {
        if (kind !== "snapshot" && ev.id <= jv.lastId) return; // already seen (the export stream resumes after it)
        jv.lastId = Math.max(jv.lastId, ev.id);
      }
      if (kind === "snapshot") {
        jv.job = Object.assign(jv.job || {}, ev);
        renderHeader();
        return;
      }
      const data = (ev && ev.data) || {};
      if (kind === "evaluation") {
        const s = normalise(data.evaluation || {});
        const k = pointKey(s);
        const fresh = !jv.points.has(k);
        if (fresh) jv.points.set(k, s); // the full row (plan, record) comes with the reload
        if (jv.job) {
          jv.job.progress = { done: data.done ?? jv.job.progress.done, total: data.total ?? jv.job.progress.total };
          jv.job.best = data.best ?? jv.job.best;
          jv.job.front_size = data.front_size ?? jv.job.front_size;
        }
        if (s.stage === "search" && jv.phase.phase !== "fine-tune") jv.phase = { phase: "search" };
        renderSoon();
        if (fresh) scheduleReload();
      } else if (kind === "state") {
        if (jv.job) jv.job.state = ev.to_state;
        addLog(`${ev.from_state || "–"} → ${ev.to_state}${data.error ? ": " + data.error : data.reason ? ": " + data.reason : ""}`, ev.created_at);
        renderHeader();
        scheduleReload(TERMINAL.has(ev.to_state) ? 0 : 600);
      } else if (kind === "finetune") {
        renderProgress(`fine-tuning point ${data.index}`, data.step, data.total);
      } else if (kind === "log") {
        const msg = data.message || JSON.stringify(data);
        addLog(msg, ev.created_at);
        if (/^fine-tuning point/.test(msg)) renderProgress("fine-tune", 0, 0);
        if (/^exporting/.test(msg)) renderProgress("export", data.done || 0, data.total || 0);
      } else if (kind === "export") {
        const pt = data.point || {};
        addLog(`${data.ok ? "exported" : "export failed:"} #${pt.index} ${pt.stage} as ${data.format}` +
          (data.seconds != null ? ` (${num(data.seconds, 1)} s)` : "") + (data.ok ? "" : ` ${data.error || ""}`) +
          ` — ${data.done}/${data.total}`, ev.created_at);
        if (jv.job && !TERMINAL.has(jv.job.state)) renderProgress("export", data.done || 0, data.total || 0);
        scheduleReload(300);
      } else if (kind === "probes") {
        addLog(`groups probed: ${(data.probes || []).length} probes in ${num(data.seconds, 1)} s`, ev.created_at);
      } else if (kind === "sensitivity") {
        const groups = Object.keys((data.sensitivity && data.sensitivity.groups) || data.sensitivity || {}).length;
        addLog(`latency table measured${groups ? ` (${groups} entries)` : ""}`, ev.created_at);
      }
    }

    $("#job-cancel").onclick = async () => {
      $("#job-cancel").disabled = true;
      try {
        jv.job = await getJson(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" });
        renderHeader();
      } catch (err) { report(err); }
      $("#job-cancel").disabled = false;
    };
    $("#job-evals thead").onclick = (ev) => {
      const th = ev.target.closest("th[data-sort]");
      if (!th) return;
      const key = th.dataset.sort;
      jv.sort = { key, dir: jv.sort.key === key ? -jv.sort.dir : 1 };
      renderTable();
    };
    $("#job-downloads").onclick = (ev) => {
      const btn = ev.target.closest("button.download");
      if (btn) download(btn).catch(report);
      const exp = ev.target.closest("button.export");
      if (exp) requestExport(exp).catch(report);
    };

    renderPlot();
    await reload();
    Promise.all([nameOf("models", jv.job.model_id), nameOf("datasets", jv.job.dataset_id)]).then(() => live() && renderHeader(), report);
    followEvents(jobId, onEvent, ctrl.signal, () => !live() || (jv.job && TERMINAL.has(jv.job.state))).catch(report);
  }

  /** Fetch an export with the key and save it through a blob URL; the button records the bytes received. */
  async function download(btn) {
    btn.disabled = true;
    try {
      const r = await api(btn.dataset.url);
      const blob = await r.blob();
      const cd = r.headers.get("content-disposition") || "";
      const m = /filename\*=UTF-8''([^;]+)|filename="?([^";]+)"?/i.exec(cd);
      const name = m ? decodeURIComponent(m[1] || m[2]) : btn.dataset.filename;
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = name;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 60000);
      btn.dataset.bytes = String(blob.size);
      btn.dataset.saved = name;
      btn.classList.add("done");
      btn.title = `downloaded ${bytes(blob.size)} as ${name}`;
    } finally {
      btn.disabled = false;
    }
  }

  // --- compare -------------------------------------------------------------------------------------------------
  async function compareView(arg) {
    const view = show("compare");
    let timer = null;
    view.cleanup = () => clearTimeout(timer);
    const ids = arg.split(",").map((s) => s.trim()).filter(Boolean);
    const page = await getJson("/v1/jobs?limit=200");
    if (app.view !== view) return;
    $("#compare-choices").innerHTML = page.items.map((j) =>
      `<label><input type="checkbox" value="${esc(j.id)}" ${ids.includes(j.id) ? "checked" : ""}>
        <code>${esc(shortId(j.id))}</code> ${esc((j.spec || {}).strategy || "")} · budget ${esc((j.spec || {}).budget ?? "–")}
        <span class="state ${esc(j.state)}">${esc(j.state)}</span></label>`).join("") || `<span class="hint">no jobs yet</span>`;
    $("#compare-form").onsubmit = (ev) => {
      ev.preventDefault();
      const chosen = $$("#compare-choices input:checked").map((i) => i.value);
      location.hash = `#/compare/${chosen.join(",")}`;
    };
    const plot = $("#compare-plot");
    if (!ids.length) {
      plot.innerHTML = `<p class="hint">Choose jobs above.</p>`;
      $("#compare-table tbody").innerHTML = "";
      return;
    }
    const refresh = async () => {
      const jobs = await Promise.all(ids.map((id) => getJson(`/v1/jobs/${encodeURIComponent(id)}`)));
      const evals = await Promise.all(ids.map(allEvaluations));
      if (app.view !== view) return;
      const groups = jobs.map((j, i) => {
        const s = j.spec || {};
        const short = shortId(j.id);
        return { label: `${short} ${s.strategy || ""} (budget ${s.budget ?? "–"})`, short, color: COLORS[i % COLORS.length], points: evals[i], best: j.best, job: j };
      });
      const metrics = [...new Set(jobs.map((j) => (j.spec || {}).metric || "quality"))];
      drawPlot(plot, groups, { metric: metrics.join(" / "), legend: true });
      $("#compare-table tbody").innerHTML = `<tr><th>job</th><th>strategy</th><th>state</th><th class="num">evaluations</th>
        <th class="num">front</th><th class="num">best speed-up within 1% quality</th><th>best point</th></tr>` +
        groups.map((g) => {
          const base = g.points.find((p) => p.index === 0 && p.stage === "search");
          const ok = base ? g.points.filter((p) => p.quality >= base.quality - Math.abs(base.quality) * 0.01) : [];
          const top = ok.length ? Math.max(...ok.map((p) => p.speedup || 0)) : null;
          return `<tr><td><a href="#/job/${esc(g.job.id)}"><code>${esc(g.short)}</code></a></td>
            <td>${esc((g.job.spec || {}).strategy || "")}</td><td>${stateBadge(g.job)}</td>
            <td class="num">${g.points.length}</td><td class="num">${front(g.points).length}</td>
            <td class="num">${speed(top)}</td><td>${esc(bestText(g.job.best))}</td></tr>`;
        }).join("");
      if (jobs.some((j) => !TERMINAL.has(j.state))) timer = setTimeout(() => refresh().catch(report), 3000);
    };
    await refresh();
  }

  // --- start ---------------------------------------------------------------------------------------------------
  function start() {
    $("#login-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const key = $("#login-key").value.trim();
      $("#login-error").textContent = "";
      try {
        await login(key);
        $("#login-key").value = "";
        route();
      } catch (err) {
        $("#login-error").textContent = String(err.message || err);
      }
    });
    $("#logout").addEventListener("click", () => logout(""));
    $("#submit-form").addEventListener("submit", submitJob);
    attachTooltip($("#job-plot"));
    attachTooltip($("#compare-plot"));
    window.addEventListener("hashchange", route);
    route();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
