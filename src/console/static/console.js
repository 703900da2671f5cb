// session-manager web console: follows a session's event stream and sends the page's
// requests. No framework, no build step. Every POST carries the login's CSRF token.
"use strict";

(function () {
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  async function send(url, body) {
    const response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body || {}),
      credentials: "same-origin",
    });
    let data = {};
    try { data = await response.json(); } catch (e) { /* not JSON */ }
    if (!response.ok) throw new Error(data.error || ("HTTP " + response.status));
    return data;
  }

  function status(form, text, bad) {
    const p = form && form.querySelector(".status");
    if (!p) return;
    p.textContent = text;
    p.classList.toggle("error", !!bad);
  }

  // Log out.
  document.addEventListener("click", async (e) => {
    if (e.target.matches("[data-logout]")) {
      try { await send("/console/logout"); } finally { location.href = "/"; }
    }
  });

  // The start form on the sessions list.
  const start = document.getElementById("start");
  if (start) {
    start.addEventListener("submit", async (e) => {
      e.preventDefault();
      const f = new FormData(start);
      status(start, "Starting…");
      try {
        const data = await send("/console/api/sessions", {
          repo: f.get("repo"),
          branch: f.get("branch") || null,
          worktree: f.get("worktree") === "on",
          profile: f.get("profile") || null,
        });
        location.href = data.url;
      } catch (err) {
        status(start, err.message, true);
      }
    });
  }

  // A session's page.
  const section = document.querySelector("section.session");
  if (!section) return;
  const id = section.dataset.session;
  const log = document.getElementById("conversation");

  function element(entry) {
    const existing = document.getElementById("p-" + entry.post_id);
    const div = existing || document.createElement("div");
    div.id = "p-" + entry.post_id;
    div.className = "entry " + entry.kind;
    div.dataset.event = entry.id;
    return [div, !existing];
  }

  function render(entry) {
    const [div, fresh] = element(entry);
    div.replaceChildren();
    if (entry.kind === "inbound") {
      const who = document.createElement("div");
      who.className = "author";
      who.textContent = entry.author || "someone";
      div.appendChild(who);
    }
    if (entry.kind === "card") {
      const title = document.createElement("div");
      title.className = "title";
      title.textContent = entry.body.title || "";
      div.appendChild(title);
      const text = document.createElement("div");
      text.className = "text";
      text.innerHTML = entry.card_html || "";
      div.appendChild(text);
      const buttons = document.createElement("div");
      buttons.className = "buttons";
      for (const action of entry.body.actions || []) {
        const b = document.createElement("button");
        b.type = "button";
        b.textContent = action.label;
        b.className = action.style || "default";
        b.dataset.post = entry.post_id;
        b.dataset.action = action.id;
        buttons.appendChild(b);
      }
      div.appendChild(buttons);
    } else {
      const text = document.createElement("div");
      text.className = "text";
      text.innerHTML = entry.html;
      div.appendChild(text);
    }
    if (fresh) log.appendChild(div);
  }

  const stream = new EventSource("/console/sessions/" + encodeURIComponent(id) + "/events");
  stream.addEventListener("entry", (e) => {
    const entry = JSON.parse(e.data);
    if (entry.kind === "card") entry.card_html = entry.html_card || entry.html;
    render(entry);
    const near = log.scrollHeight - log.scrollTop - log.clientHeight < 200;
    if (near) log.scrollTop = log.scrollHeight;
  });

  log.addEventListener("click", async (e) => {
    const b = e.target.closest("button[data-action]");
    if (!b) return;
    b.disabled = true;
    const form = document.getElementById("say");
    try {
      const data = await send("/console/api/cards/" + encodeURIComponent(b.dataset.post) + "/" + encodeURIComponent(b.dataset.action));
      status(form, data.notice || "");
    } catch (err) {
      status(form, err.message, true);
    } finally {
      b.disabled = false;
    }
  });

  section.querySelectorAll("[data-command]").forEach((b) => {
    b.addEventListener("click", async () => {
      const form = document.getElementById("say");
      try {
        await send("/console/api/sessions/" + encodeURIComponent(id) + "/commands/" + b.dataset.command);
        status(form, "Sent !" + b.dataset.command + ".");
      } catch (err) {
        status(form, err.message, true);
      }
    });
  });

  const say = document.getElementById("say");
  say.addEventListener("submit", async (e) => {
    e.preventDefault();
    const area = say.querySelector("textarea");
    const text = area.value;
    if (!text.trim()) return;
    try {
      await send("/console/api/sessions/" + encodeURIComponent(id) + "/messages", { text });
      area.value = "";
      status(say, "");
    } catch (err) {
      status(say, err.message, true);
    }
  });
  say.querySelector("textarea").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) say.requestSubmit();
  });
})();
