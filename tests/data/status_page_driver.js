// Runs the status page's scripts under node against a live server, with just enough of
// a DOM for them (no browser here): tests/test_status_page.py appends the page's
// scripts and a call to scenario(). Prints the page's text as JSON at each step.
"use strict";
const BASE = process.env.LLMUX_URL;
const ADMIN_KEY = process.env.LLMUX_ADMIN_KEY;

class FakeElement {
  constructor(tag, id) {
    Object.assign(this, {tagName: tag, id, children: [], hidden: false, className: "",
                         dataset: {}, style: {}, value: "", own: "", listeners: {}});
  }
  append(...nodes) { this.children.push(...nodes); }
  replaceChildren(...nodes) { this.children = []; this.own = ""; this.append(...nodes); }
  get textContent() {
    return this.own + this.children.map((c) => (typeof c === "string" ? c : c.textContent))
      .join("");
  }
  set textContent(text) { this.children = []; this.own = String(text); }
  addEventListener(type, listener) { (this.listeners[type] ||= []).push(listener); }
  focus() {}
  *walk() {
    yield this;
    for (const c of this.children) if (typeof c !== "string") yield* c.walk();
  }
}

const elements = {};
const storage = new Map();
if (process.env.LLMUX_FIRST_KEY) storage.set("llmux.adminKey", process.env.LLMUX_FIRST_KEY);
globalThis.document = {
  getElementById: (id) => (elements[id] ||= new FakeElement("div", id)),
  createElement: (tag) => new FakeElement(tag),
  querySelectorAll: () => [],
};
globalThis.sessionStorage = {
  getItem: (k) => (storage.has(k) ? storage.get(k) : null),
  setItem: (k, v) => storage.set(k, String(v)),
  removeItem: (k) => storage.delete(k),
};
const confirmed = [];
globalThis.confirm = (question) => { confirmed.push(question); return true; };
const serverFetch = globalThis.fetch;
globalThis.fetch = (path, init) => serverFetch(BASE + path, init);

function page() {
  const text = (id) => document.getElementById(id).textContent;
  const rows = {};
  for (const row of document.getElementById("models").children) {
    rows[row.children[0].children[0].textContent] = row.children.map((c) => c.textContent);
  }
  return {conn: text("conn"), loginShown: !document.getElementById("login").hidden,
          loginError: text("login-error"), mainShown: !document.getElementById("main").hidden,
          devices: text("devices"), models: rows, events: text("events"),
          notice: text("notice"), confirmed};
}

async function until(predicate, what) {
  const deadline = Date.now() + 20000;
  while (!predicate(page())) {
    if (Date.now() > deadline) {
      console.log(JSON.stringify({timeout: what, page: page()}));
      process.exit(1);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  console.log(JSON.stringify({step: what, page: page()}));
}

function click(model, label) {
  for (const row of document.getElementById("models").children) {
    if (row.children[0].children[0].textContent !== model) continue;
    for (const node of row.walk()) if (node.tagName === "button" && node.textContent === label) {
      return node.onclick();
    }
  }
  throw new Error("no button " + label + " for " + model);
}

async function scenario() {
  await until((p) => p.loginShown && p.loginError !== "", "the key form shows the error");
  document.getElementById("key").value = ADMIN_KEY;
  document.getElementById("login").listeners.submit[0]({preventDefault() {}});
  await until((p) => p.conn === "live" && p.mainShown && !p.loginShown, "live");
  await serverFetch(BASE + "/v1/chat/completions", {
    method: "POST",
    headers: {"Authorization": "Bearer " + ADMIN_KEY, "Content-Type": "application/json"},
    body: JSON.stringify({model: "small", messages: [{role: "user", content: "hi"}]}),
  });
  await until((p) => p.models.small && p.models.small[3] === "ready", "small loaded");
  await click("small", "Unload");
  await until((p) => p.models.small[3] === "unloaded", "small unloaded");
  process.exit(0);
}
