// Helix web app: follows a session's open reply live, and refreshes the admin page's figures.
// Plain JavaScript, no build step.
//
// The page marks the open reply with data-live-reply and data-after (the event id just before the
// reply's first event). The script clears the reply and rebuilds it from the session's event stream,
// so what it shows is the events' own text whatever moment the page was rendered at; EventSource
// resumes with Last-Event-ID after a dropped connection.
"use strict";

(function () {
  const POLL_MS = 1500;
  const ENDED = ["complete", "error", "cancelled"];
  // Phases of a reply still waiting for a runner: the page keeps polling its place in line and estimate.
  const WAITING = ["queued", "no_runner"];
  const NO_RUNNER_TEXT = "no runner serves this model";

  // A wait in words, as the page template writes it: "40 s", "3 min", "1.5 h".
  function about(seconds) {
    if (seconds < 90) return `${Math.max(1, Math.round(seconds))} s`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
    return `${Math.round(seconds / 360) / 10} h`;
  }

  // JSON text indented as the page's pretty_json filter does it; text that does not parse (cut short) as it is.
  function prettyJson(text) {
    if (!text) return text || "";
    try {
      return JSON.stringify(JSON.parse(text), null, 2);
    } catch (err) {
      return text;
    }
  }

  function follow(page, reply) {
    const interactionId = Number(reply.dataset.interactionId);
    const training = page.dataset.mode === "finetune";
    const label = reply.querySelector(".phase");
    const output = reply.querySelector(".output");
    const bar = reply.querySelector("progress");
    const detail = reply.querySelector(".progress-detail");
    const errorBox = reply.querySelector(".error");
    const estimate = reply.querySelector(".estimate");
    // A reply asked for as JSON streams as text and is indented once it is complete.
    const asJson = reply.dataset.format === "json";
    let phase = label.dataset.phase;
    let position = Number(label.dataset.queuePosition) || null;
    let poller = null;

    // `outlook`: the reply's estimate fields (the session JSON's, or an `estimate` event's), when known.
    function show(next, queuePosition, outlook) {
      phase = next;
      if (queuePosition) position = queuePosition;
      label.dataset.phase = next;
      label.className = "phase phase-" + next;
      if (next === "queued" && position) label.textContent = `queued (${position} in line)`;
      else if (next === "no_runner") label.textContent = (outlook && outlook.phase_detail) || NO_RUNNER_TEXT;
      else label.textContent = next;
      if (next !== "queued") {
        estimate.hidden = true;
      } else if (outlook) {
        const wait = outlook.estimated_wait_seconds;
        estimate.hidden = typeof wait !== "number";
        estimate.textContent = estimate.hidden ? "" : `starts in about ${about(wait)}`;
      }
      if (WAITING.includes(next) && !poller) {
        poller = setInterval(pollQueue, POLL_MS);
      } else if (!WAITING.includes(next) && poller) {
        clearInterval(poller);
        poller = null;
      }
    }

    function clearPartial() {
      output.textContent = "";
      bar.hidden = true;
      detail.textContent = "";
    }

    async function fetchState() {
      const response = await fetch(page.dataset.stateUrl, {headers: {Accept: "application/json"}});
      if (response.status === 401) {
        location.reload(); // signed out: the page itself sends the browser to sign in
        return null;
      }
      if (!response.ok) return null;
      const session = await response.json();
      return {session, item: session.interactions.find((i) => i.id === interactionId)};
    }

    async function pollQueue() {
      const state = await fetchState();
      if (state && state.item && WAITING.includes(phase) && WAITING.includes(state.item.phase)) {
        show(state.item.phase, state.item.queue_position, state.item);
      }
    }

    function showFiles(files) {
      let box = reply.querySelector(".files");
      if (!files.length) return;
      if (!box) {
        box = document.createElement("div");
        box.className = "files";
        output.after(box);
      }
      box.textContent = "";
      for (const file of files) {
        const href = page.dataset.filesUrl + file.id;
        const link = document.createElement("a");
        link.href = href;
        if (file.kind === "output" && file.content_type.startsWith("image/")) {
          const img = document.createElement("img");
          img.src = href;
          img.alt = file.name;
          img.dataset.fileId = file.id;
          link.append(img);
        } else {
          link.className = "file";
          link.textContent = file.name;
        }
        box.append(link, " ");
      }
    }

    // The reply's tool calls, built as the page template's tool_call_list macro writes them.
    function showToolCalls(calls) {
      const old = reply.querySelector(".tool-calls");
      if (old) old.remove();
      if (!calls.length) return;
      const list = document.createElement("ol");
      list.className = "tool-calls";
      for (const call of calls) {
        const item = document.createElement("li");
        item.className = "tool-call";
        item.dataset.callId = call.id;
        const intro = document.createElement("p");
        const name = document.createElement("code");
        name.className = "tool-name";
        name.textContent = call.name;
        intro.append("Calls ", name, " with");
        const args = document.createElement("pre");
        args.className = "arguments";
        args.textContent = prettyJson(call.arguments);
        item.append(intro, args);
        if (call.result !== null && call.result !== undefined) {
          const said = document.createElement("p");
          said.textContent = "which returned";
          const result = document.createElement("pre");
          result.className = "result";
          result.textContent = prettyJson(call.result);
          item.append(said, result);
        }
        list.append(item);
      }
      output.after(list);
    }

    async function finish(data) {
      source.close();
      const cancel = reply.querySelector("form.cancel");
      if (cancel) cancel.hidden = true;
      const state = await fetchState();
      if (state && state.item) {
        // The reply as stored: the same text, now final (and indented, when it was asked for as JSON).
        output.textContent = asJson ? prettyJson(state.item.output) : state.item.output;
        showFiles(state.item.files);
        showToolCalls(state.item.tool_calls || []);
      }
      if (data.state === "error") {
        errorBox.textContent = data.error || (state && state.item && state.item.error) || "";
        errorBox.hidden = !errorBox.textContent;
      }
      reply.dataset.state = data.state;
      show(data.state);
      delete reply.dataset.liveReply;
      // A finished fine-tune has switched the session to inference: it can be chatted with now.
      const form = page.querySelector("form.continue");
      if (form && state && state.session.mode === "create") form.hidden = false;
    }

    clearPartial();
    const source = new EventSource(`${page.dataset.eventsUrl}?after=${reply.dataset.after}`);
    const mine = (event) => {
      const data = JSON.parse(event.data);
      return data.interaction_id === interactionId ? data : null;
    };

    source.addEventListener("token", (event) => {
      const data = mine(event);
      if (!data) return;
      output.append(data.text);
      if (phase !== "generating") show("generating");
    });

    source.addEventListener("progress", (event) => {
      const data = mine(event);
      if (!data) return;
      if (data.total) {
        bar.max = data.total;
        bar.value = data.step || 0;
        bar.hidden = false;
        let text = `step ${data.step} of ${data.total}`;
        if (typeof data.loss === "number") text += ` · loss ${data.loss.toFixed(4)}`;
        detail.textContent = text;
      }
      const working = training ? "training" : "generating";
      if (phase !== working) show(working);
    });

    source.addEventListener("estimate", (event) => {
      const data = mine(event);
      if (data && WAITING.includes(phase)) show(data.phase, data.queue_position, data);
    });

    source.addEventListener("state", (event) => {
      const data = mine(event);
      if (!data) return;
      if (data.state === "queued") {
        clearPartial(); // a lost attempt: the next one streams the reply from its start
        show("queued");
        pollQueue();
      } else if (data.state === "running") {
        show("loading");
      } else if (ENDED.includes(data.state)) {
        finish(data);
      }
    });

    source.onerror = () => {
      // A 401 or 404 closes the stream for good (a network error retries on its own): show the page anew.
      if (source.readyState === EventSource.CLOSED) setTimeout(() => location.reload(), 2000);
    };
    if (WAITING.includes(phase)) show(phase);
  }

  // A region marked data-refresh="MS" (the admin page) is fetched again every MS milliseconds and swapped
  // in place, so the reader keeps their scroll position and focus; a [data-refresh-toggle] box pauses it.
  function refresh(region) {
    const toggle = document.querySelector("[data-refresh-toggle]");
    setInterval(async () => {
      if ((toggle && !toggle.checked) || document.hidden) return;
      let response;
      try {
        response = await fetch(location.href, {headers: {Accept: "text/html"}});
      } catch (err) {
        return; // the server is away for a moment: the next tick tries again
      }
      if (response.redirected || response.status === 401) {
        location.reload(); // signed out: the page itself sends the browser to sign in
        return;
      }
      if (!response.ok) return; // a hiccup: the figures shown stay until the next try
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html").querySelector("[data-refresh]");
      if (fresh) region.replaceChildren(...fresh.childNodes);
    }, Number(region.dataset.refresh));
  }

  document.addEventListener("DOMContentLoaded", () => {
    const page = document.querySelector("section.session");
    const reply = page && page.querySelector("[data-live-reply]");
    if (reply) follow(page, reply);
    document.querySelectorAll("[data-refresh]").forEach(refresh);
  });
})();
