// The grid explorer's script: fetch the coordinator's public JSON, draw it,
// and do it again every few seconds. No framework and nothing from another
// origin. Every value that came from the grid is written with textContent or
// setAttribute, never parsed as markup: a node chooses its model names.
"use strict";

(function () {
  const REFRESH_MS = 5000;
  /// One providers listing per model at most this many models, so a grid
  /// with many models does not cost the coordinator a burst of requests.
  const MAX_MODELS = 50;

  /// An element with attributes and children (strings become text nodes).
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") e.className = v;
      else e.setAttribute(k, String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  async function getJson(path) {
    const r = await fetch(path, { headers: { accept: "application/json" }, cache: "no-store" });
    if (!r.ok) throw new Error(path + " answered " + r.status);
    return r.json();
  }

  /// Set every element that shows `name`: its text and its raw value.
  function stat(name, value, text) {
    for (const e of document.querySelectorAll('[data-stat="' + name + '"]')) {
      e.setAttribute("data-value", value === null || value === undefined ? "" : String(value));
      e.textContent = text === undefined ? (value === null || value === undefined ? "–" : String(value)) : text;
    }
  }

  /// USD with as many decimals as it needs (at most six), for prices.
  function usd(n) {
    if (typeof n !== "number" || !isFinite(n)) return "–";
    let s = n.toFixed(6).replace(/0+$/, "");
    if (s.length - s.indexOf(".") - 1 < 2) s = n.toFixed(2);
    return "$" + s;
  }

  function seconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return "≤ " + round(s * 1000, 1) + " ms";
    return "≤ " + s + " s";
  }

  function round(n, digits) {
    const f = Math.pow(10, digits);
    return Math.round(n * f) / f;
  }

  function shortId(id) {
    return id.length > 14 ? id.slice(0, 8) + "…" + id.slice(-4) : id;
  }

  function badge(kind, text, title) {
    return el("span", { class: "badge " + kind, title: title }, text);
  }

  function levelBadge(level) {
    const title = {
      hardware: "Hardware evidence verified against the vendor's roots and this coordinator's policy",
      simulated: "Simulated evidence: development mode only, never counted as hardware",
      self_reported: "No hardware evidence: the node's word only",
      none: "Not attested",
    }[level];
    return badge("level-" + level, level.replace("_", "-"), title);
  }

  function replace(container, children, emptyText, emptyTag) {
    container.replaceChildren(...children);
    if (children.length === 0) {
      container.append(emptyTag === "tr"
        ? el("tr", { class: "empty" }, el("td", { colspan: 10 }, emptyText))
        : el("p", { class: "empty" }, emptyText));
    }
  }

  function drawCapacity(capacity, explorer, models, providerCount) {
    stat("nodes-online", capacity.active_nodes);
    stat("nodes-total", capacity.total_nodes);
    stat("nodes-available", capacity.available_nodes);
    stat("slots-busy", explorer.capacity.slots_busy);
    stat("slots-total", explorer.capacity.slots_total);
    const pct = round(explorer.capacity.load * 100, 1);
    stat("load", pct, pct + " %");
    document.getElementById("load-bar").style.width = Math.min(100, pct) + "%";
    stat("models-count", models.data.length);
    stat("providers-count", providerCount);
  }

  function drawTraffic(t) {
    stat("window-seconds", t.window_seconds, String(Math.round(t.window_seconds)));
    stat("requests", t.requests);
    stat("jobs-completed", t.jobs_completed);
    stat("jobs-per-minute", round(t.jobs_per_minute, 1));
    stat("jobs-failed", t.jobs_failed + t.jobs_aborted);
    stat("tokens-per-second", round(t.completion_tokens_per_second, 2));
    stat("completion-tokens", t.completion_tokens);
    stat("latency-requests", t.latency.requests);
    stat("latency-p50", t.latency.p50_seconds, seconds(t.latency.p50_seconds));
    stat("latency-p95", t.latency.p95_seconds, seconds(t.latency.p95_seconds));
    stat("latency-p99", t.latency.p99_seconds, seconds(t.latency.p99_seconds));
  }

  function drawModels(models, gridModels, listings) {
    const byId = new Map(gridModels.models.map((m) => [m.id, m]));
    const rows = models.data.map((m) => {
      const g = byId.get(m.id) || {};
      const listing = listings.get(m.id);
      const cheapest = listing && listing.providers.length ? listing.providers[0] : null;
      return el("tr", {
        "data-model": m.id,
        "data-context-window": m.context_window,
        "data-node-count": g.sgl_node_count,
      },
      el("td", {}, el("code", {}, m.id)),
      el("td", { class: "num" }, m.context_window ? m.context_window.toLocaleString("en") : "–"),
      el("td", { class: "num" }, g.sgl_node_count === undefined ? "–" : g.sgl_node_count),
      el("td", { class: "num" }, usd(g.price_input_per_m) + " / " + usd(g.price_output_per_m)),
      el("td", { class: "num" }, cheapest ? usd(cheapest.input_per_m) + " / " + usd(cheapest.output_per_m) : "–"));
    });
    replace(document.getElementById("models"), rows, "No model is served right now.", "tr");
  }

  function drawProviders(listings) {
    const rows = [];
    for (const [model, listing] of listings) {
      for (const p of listing.providers) {
        rows.push(el("tr", {
          "data-provider": p.node_id,
          "data-model": model,
          "data-input-per-m": p.input_per_m,
          "data-output-per-m": p.output_per_m,
          "data-blended-per-1k": p.blended_per_1k,
          "data-online": p.online,
          "data-custom": p.is_custom,
        },
        el("td", {}, el("code", {}, model)),
        el("td", { title: p.node_id }, el("code", {}, shortId(p.node_id))),
        el("td", {}, p.tee_type),
        el("td", { class: "num" }, usd(p.input_per_m)),
        el("td", { class: "num" }, usd(p.output_per_m)),
        el("td", { class: "num" }, usd(p.blended_per_1k)),
        el("td", {}, p.is_custom ? badge("custom", "custom", "Set by the node's operator") : badge("muted", "reference", "The grid's reference price")),
        el("td", { class: "num" }, round(p.load * 100, 0) + " %"),
        el("td", { class: "num" }, p.reputation),
        el("td", {}, p.online ? badge("ok", "online") : badge("off", "offline"))));
      }
    }
    replace(document.getElementById("providers"), rows, "No provider is listed.", "tr");
  }

  const MARK = { pass: "✓", fail: "✗", skipped: "–" };

  function drawNodes(explorer) {
    const cards = explorer.nodes.map((n) => {
      const att = n.attestation;
      const checks = att ? att.checks : [];
      const failed = checks.some((c) => c.status === "fail");
      const verdict = !att ? "none" : checks.length === 0 ? "self_reported" : failed ? "rejected" : "verified";
      const head = el("header", {},
        el("code", { class: "node-id", title: n.node_id }, shortId(n.node_id)),
        badge("state-" + n.state, n.state.replace("_", " ")),
        levelBadge(n.attestation_level),
        el("span", { class: "tee" }, "TEE: " + n.tee_type));
      const facts = el("dl", {},
        el("dt", {}, "Models"), el("dd", {}, n.models.join(", ") || "–"),
        el("dt", {}, "Slots"), el("dd", { "data-busy": n.busy, "data-slots": n.slots }, n.busy + " busy of " + n.slots),
        el("dt", {}, "Jobs"), el("dd", {}, n.jobs_completed + " completed, " + n.jobs_failed + " failed"),
        el("dt", {}, "Verified at"), el("dd", {}, att ? att.verified_at : "–"),
        el("dt", {}, "Policy"), el("dd", {}, att && att.policy_digest ? el("code", { title: att.policy_digest }, att.policy_digest.slice(0, 23) + "…") : "–"),
        el("dt", {}, "Evidence"), el("dd", {}, att && att.evidence_format
          ? el("a", { href: att.evidence_url }, att.evidence_format + " evidence")
          : "none sent"));
      let steps;
      if (checks.length > 0) {
        steps = el("ol", { class: "steps" }, ...checks.map((c) =>
          el("li", { "data-step": c.step, "data-status": c.status, class: c.status },
            el("span", { class: "mark", "aria-label": c.status }, MARK[c.status] || "?"),
            el("span", { class: "step" }, c.step),
            el("span", { class: "detail" }, c.detail))));
      } else {
        steps = el("p", { class: "steps-none" }, att
          ? "Self-reported: the node sent no hardware evidence, so there is no verdict to show."
          : "Not attested: the node has not answered a challenge yet.");
      }
      return el("article", {
        class: "node",
        "data-node": n.node_id,
        "data-state": n.state,
        "data-level": n.attestation_level,
        "data-verdict": verdict,
        "data-checks": checks.length,
      }, head, facts, steps);
    });
    replace(document.getElementById("nodes"), cards, "No node has registered.");
  }

  function setStatus(kind, text) {
    document.getElementById("status").textContent = text;
    document.getElementById("status-dot").className = "dot " + kind;
  }

  async function refresh() {
    try {
      const [explorer, capacity, models, gridModels] = await Promise.all([
        getJson("/grid/explorer.json"),
        getJson("/grid/capacity"),
        getJson("/v1/models"),
        getJson("/grid/models"),
      ]);
      const ids = models.data.map((m) => m.id).slice(0, MAX_MODELS);
      const lists = await Promise.all(ids.map((id) => getJson("/v1/providers?model=" + encodeURIComponent(id))));
      const listings = new Map(ids.map((id, i) => [id, lists[i]]));
      const providerCount = lists.reduce((n, l) => n + l.providers.length, 0);
      drawCapacity(capacity, explorer, models, providerCount);
      drawTraffic(explorer.traffic);
      drawModels(models, gridModels, listings);
      drawProviders(listings);
      drawNodes(explorer);
      document.getElementById("updated").textContent = explorer.generated_at;
      document.body.setAttribute("data-updated", explorer.generated_at);
      document.body.setAttribute("data-state", "ready");
      setStatus("ok", "live");
    } catch (e) {
      // What was drawn stays; it is marked stale until a refresh works.
      const was = document.body.getAttribute("data-state");
      document.body.setAttribute("data-state", was === "ready" || was === "stale" ? "stale" : "error");
      setStatus("bad", "cannot reach the coordinator: " + e.message);
    } finally {
      setTimeout(refresh, REFRESH_MS);
    }
  }

  document.addEventListener("DOMContentLoaded", refresh);
})();
