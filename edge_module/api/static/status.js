// edge-module status page: refreshes from /status/page; no libraries, no build step.
// The grace countdown runs from the module's trusted clock: each document carries the
// seconds left, and the page counts down from the moment it received them (performance.now,
// a monotonic clock), never from the browser's wall clock.
"use strict";
(function () {
  var KEY_SLOT = "edge-module-api-key";
  var WORDS = {
    online: "Online: licensed and serving",
    grace: "Offline grace: serving, the billing endpoint is not answering",
    gated: "Gated: not serving"
  };
  var numbers = new Intl.NumberFormat("en-US");
  var doc = null;          // the last document
  var receivedAt = 0;      // performance.now() when it arrived
  var announced = "";      // what the polite live region last said
  var timer = null;

  function $(id) { return document.getElementById(id); }
  function text(id, value) { var el = $(id); if (el.textContent !== value) { el.textContent = value; } }
  function count(n) { return n === null || n === undefined ? "—" : numbers.format(n); }

  function duration(seconds) {
    var s = Math.max(0, Math.floor(seconds));
    if (s >= 2 * 86400) { return Math.floor(s / 86400) + " d " + Math.floor(s % 86400 / 3600) + " h"; }
    if (s >= 3600) { return Math.floor(s / 3600) + " h " + Math.floor(s % 3600 / 60) + " min"; }
    if (s >= 60) { return Math.floor(s / 60) + " min " + (s % 60) + " s"; }
    return s + " s";
  }

  function bytes(n) {
    var units = ["B", "KiB", "MiB", "GiB"];
    var i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i === 0 ? numbers.format(Math.round(n)) : n.toFixed(1)) + " " + units[i];
  }

  function iso(value) {  // "2026-11-28T05:12:03.123+00:00" -> "2026-11-28 05:12:03 UTC"
    if (!value) { return "never"; }
    var d = new Date(value);
    if (isNaN(d.getTime())) { return String(value); }
    return d.toISOString().slice(0, 19).replace("T", " ") + " UTC";
  }

  function ms(value) {
    if (value === null || value === undefined) { return "—"; }
    return (value < 10 ? value.toFixed(2) : numbers.format(Math.round(value))) + " ms";
  }

  function rate(value) {
    if (!value) { return "0"; }
    return value >= 10 ? numbers.format(Math.round(value)) : value.toFixed(value >= 1 ? 1 : 2);
  }

  function cell(row, value, cls) {
    var td = document.createElement("td");
    td.textContent = value;
    if (cls) { td.className = cls; }
    row.appendChild(td);
    return td;
  }

  function fillTable(id, rows, empty, columns) {
    var body = $(id).tBodies[0];
    var fresh = document.createElement("tbody");
    if (!rows.length) {
      var tr = fresh.insertRow();
      cell(tr, empty).colSpan = columns;
    }
    rows.forEach(function (cells) {
      var tr = fresh.insertRow();
      cells.forEach(function (c) {
        if (c && c.th) {
          var th = document.createElement("th");
          th.scope = "row";
          th.textContent = c.th;
          tr.appendChild(th);
        } else if (c && typeof c === "object") { cell(tr, c.text, c.cls); }
        else { cell(tr, c); }
      });
    });
    body.parentNode.replaceChild(fresh, body);
  }

  function remaining() {
    var grace = doc && doc.grace;
    if (!grace || grace.remainingSeconds === null || grace.remainingSeconds === undefined) {
      return null;
    }
    return Math.max(0, grace.remainingSeconds - (performance.now() - receivedAt) / 1000);
  }

  function tick() {
    if (!doc) { return; }
    var el = $("grace-left");
    var left = remaining();
    var state = doc.grace.state;
    var shown;
    if (left === null) { shown = state === "online" ? "no lease yet" : "none (no lease)"; }
    else if (state === "gated" && left === 0) { shown = "none: the grace has ended"; }
    else if (state === "online") { shown = duration(left) + " if the link drops now"; }
    else { shown = duration(left) + " left"; }
    el.setAttribute("data-seconds", left === null ? "" : String(Math.floor(left)));
    text("grace-left", shown);
    // The live region speaks once a minute (and on every state change), not every second.
    var say = WORDS[state] + ". " + (left === null ? "" : "Grace: " +
      (left >= 60 ? duration(Math.floor(left / 60) * 60) : duration(left)) + " left.");
    if (state !== "grace") { say = WORDS[state] + "."; }
    if (say !== announced && (left === null || left < 60 || Math.floor(left) % 60 === 0 ||
                              announced.indexOf(WORDS[state]) !== 0)) {
      announced = say;
      text("grace-announce", say);
    }
  }

  function render(d) {
    doc = d;
    receivedAt = performance.now();
    var state = d.grace.state;
    $("state-box").className = "state state-" + state;
    text("state", WORDS[state] || state);
    text("reason", d.apiStatus + ": " + d.apiStatusMessage);
    text("fix", (d.remedy || "").replace(/\((\d+) s left\)/, function (_, n) {
      return "(" + duration(Number(n)) + " left)";
    }));
    tick();

    var b = d.backlog, cap = d.ledgerCap;
    text("pending", count(b.pending) + " of " + count(cap.maxPendingRecords));
    text("oldest", b.oldestPendingAgeSeconds === null ? "none waiting" : duration(b.oldestPendingAgeSeconds));
    var last = iso(b.lastSuccessfulDrainAt);
    if (b.lastSuccessfulDrain) {
      last += " (" + duration((d.trustedTimeMs - b.lastSuccessfulDrain) / 1000) + " ago)";
    }
    text("last-upload", last);
    text("quarantined", count(b.quarantined));
    text("disk", bytes(b.ledgerBytes) + " of " + bytes(cap.maxLedgerBytes) + " (" +
      (cap.fillRatio > 0 && cap.fillRatio < 0.01 ? "under 1" : Math.round(cap.fillRatio * 100)) +
      " % full)");

    $("models-basic").hidden = true;
    $("models-table").hidden = false;
    text("models-caption", "Answers over the last " + duration(d.windowSeconds));
    fillTable("models-table", d.models.map(function (m) {
      var a = m.activity || {};
      return [{ th: m.name }, m.version,
        { text: m.state + (m.reason ? " (" + m.reason + ")" : ""), cls: m.state === "ready" ? "ok" : "bad" },
        { text: rate(a.answersPerSecond), cls: "num" },
        { text: ms(a.p50Ms), cls: "num" }, { text: ms(a.p99Ms), cls: "num" },
        { text: count(a.errors || 0), cls: "num" }];
    }), "No model is loaded.", 7);
    fillTable("transports-table", d.transports.map(function (t) {
      return [{ th: t.name }, { text: t.state, cls: t.ok ? "ok" : "bad" }, t.detail];
    }), "No transport.", 3);
    fillTable("errors-table", d.recentErrors.map(function (e) {
      return [{ th: e.code }, { text: count(e.count), cls: "num" },
        duration(e.lastSecondsAgo) + " ago"];
    }), "No errors answered since the module started.", 3);
    text("updated", "Updated " + iso(d.trustedTime) + " (module time); refreshes every " +
      d.refreshSeconds + " s.");
    $("link-error").hidden = true;
  }

  function showKeyForm(message) {
    $("key-form").hidden = false;
    text("key-error", message || "");
    $("key-input").focus();
  }

  function refresh() {
    var headers = { "Accept": "application/json" };
    var key = sessionStorage.getItem(KEY_SLOT);
    if (key) { headers["X-Api-Key"] = key; }
    if (!key && document.body.getAttribute("data-auth") === "required") {
      showKeyForm("");
      return;
    }
    fetch("/status/page", { headers: headers, cache: "no-store", credentials: "omit" })
      .then(function (response) {
        if (response.status === 401) {
          sessionStorage.removeItem(KEY_SLOT);
          document.body.setAttribute("data-auth", "required");
          showKeyForm(key ? "The module refused that key." : "");
          return null;
        }
        if (!response.ok) { throw new Error("the module answered HTTP " + response.status); }
        return response.json();
      })
      .then(function (d) {
        if (d) {
          $("key-form").hidden = true;
          render(d);
          schedule();
        }
      })
      .catch(function (err) {
        var el = $("link-error");
        el.textContent = "Cannot reach the module (" + err.message + "); the figures below " +
          "are from the last answer. Retrying.";
        el.hidden = false;
        schedule();
      });
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(refresh, ((doc && doc.refreshSeconds) || 2) * 1000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    $("key-form").addEventListener("submit", function (event) {
      event.preventDefault();
      var value = $("key-input").value;
      $("key-input").value = "";
      if (value) { sessionStorage.setItem(KEY_SLOT, value); refresh(); }
    });
    refresh();
    setInterval(tick, 1000);
  });
}());
