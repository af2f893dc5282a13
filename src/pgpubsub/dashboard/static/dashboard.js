// pgpubsub dashboard: live parts of the pages, and the live tail.
// Everything a server sent as text is inserted as text (textContent), never as markup.
"use strict";

const REFRESH_MS = 2000;
const TAIL_ROWS = 500;     // rows the tail keeps on the page
const TAIL_BUFFER = 1000;  // lines waiting for the next frame before the oldest are dropped

function refreshLive(live) {
  let busy = false;
  const tick = async () => {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const response = await fetch(location.href, {
        headers: {"X-Pgpubsub-Partial": "1"}, credentials: "same-origin", cache: "no-store",
      });
      // The server renders this fragment with every value escaped.
      live.innerHTML = await response.text();
      live.dataset.refreshed = String(Date.now());
    } catch (e) {
      live.dataset.offline = "1";
    } finally {
      busy = false;
    }
  };
  setInterval(tick, REFRESH_MS);
}

function tail(table) {
  const body = table.querySelector("tbody");
  const state = document.getElementById("tail-state");
  const count = document.getElementById("tail-count");
  const droppedText = document.getElementById("tail-dropped");
  let pending = [];
  let received = 0;
  let dropped = 0;
  let scheduled = false;

  const flush = () => {
    scheduled = false;
    const rows = document.createDocumentFragment();
    for (const [at, payload] of pending.slice(-TAIL_ROWS).reverse()) {
      const tr = document.createElement("tr");
      const when = document.createElement("td");
      const text = document.createElement("td");
      when.textContent = at.slice(11, 23);
      text.className = "payload";
      text.textContent = payload;
      tr.append(when, text);
      rows.append(tr);
    }
    dropped += Math.max(0, pending.length - TAIL_ROWS);
    pending = [];
    body.prepend(rows);
    while (body.rows.length > TAIL_ROWS) body.deleteRow(-1);
    count.textContent = String(received);
    droppedText.textContent = String(dropped);
  };

  const source = new EventSource(table.dataset.events);
  source.addEventListener("ready", () => {
    state.textContent = "listening";
    state.dataset.state = "listening";
  });
  source.onmessage = (event) => {
    const data = JSON.parse(event.data);
    received += data.lines.length;
    dropped += data.dropped;
    pending.push(...data.lines);
    if (pending.length > TAIL_BUFFER) {
      dropped += pending.length - TAIL_BUFFER;
      pending = pending.slice(-TAIL_BUFFER);
    }
    if (!scheduled) {
      scheduled = true;
      requestAnimationFrame(flush);
    }
  };
  source.onerror = () => {
    state.textContent = "reconnecting…";
    state.dataset.state = "reconnecting";
  };
}

document.addEventListener("DOMContentLoaded", () => {
  const live = document.querySelector("[data-live]");
  if (live) refreshLive(live);
  const table = document.getElementById("tail");
  if (table) tail(table);
  if (document.querySelector("[data-retry]")) setTimeout(() => location.reload(), 5000);
});
