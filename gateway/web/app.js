// ShopVerse storefront and operations console: one ES module, no dependencies.
// The access token lives in this module's memory only; the refresh token is an HttpOnly
// cookie the gateway sets on /v1/auth/session (never readable here).

const CSRF = { "x-shopverse-csrf": "1" };
const state = { token: null, user: null, refreshTimer: null, view: "#/" };
const main = document.getElementById("main");

// ---------- DOM ----------

/** An element: h("a", {href: "#/"}, "text", child...). Text is always text, never HTML. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === false || v === null || v === undefined) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Puts a view on the page, unless the reader has moved on to another one meanwhile. */
function show(...nodes) {
  if ((location.hash || "#/") !== state.view) return;
  main.replaceChildren(...nodes);
}

function toast(text) {
  const box = document.getElementById("toast");
  const p = h("p", {}, text);
  box.append(p);
  setTimeout(() => p.remove(), 4000);
}

// ---------- money and time ----------

function money(m) {
  if (!m || !m.currency) return "";
  const fmt = new Intl.NumberFormat(undefined, { style: "currency", currency: m.currency });
  const digits = fmt.resolvedOptions().maximumFractionDigits;
  return fmt.format(Number(m.amountMinor || 0) / 10 ** digits);
}

function when(ts) {
  const d = typeof ts === "number" ? new Date(ts) : new Date(ts || 0);
  return isNaN(d) ? "" : d.toLocaleString();
}

const statusName = (s) => String(s || "").replace(/^(ORDER|SHIPMENT|PAYMENT)_STATUS_/, "");

// ---------- API ----------

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, body, retried) {
  const headers = { accept: "application/json" };
  if (body !== undefined) headers["content-type"] = "application/json";
  if (state.token) headers.authorization = `Bearer ${state.token}`;
  const r = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (r.status === 401 && state.token && !retried && (await refresh())) {
    return api(method, path, body, true);
  }
  const text = await r.text();
  const data = text ? JSON.parse(text) : {};
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

async function session(path, body) {
  const r = await fetch(`/v1/auth/session${path}`, {
    method: "POST",
    headers: { ...CSRF, "content-type": "application/json" },
    body: JSON.stringify(body || {}),
    credentials: "same-origin",
  });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

async function signedIn(pair) {
  const before = state.user && state.user.id;
  state.token = pair.accessToken;
  clearTimeout(state.refreshTimer);
  const secs = Number(pair.expiresIn || 900);
  state.refreshTimer = setTimeout(refresh, Math.max(10, secs - 30) * 1000);
  try {
    state.user = await api("GET", "/v1/me");
  } catch {
    state.user = null;
  }
  updateNav();
  // A refreshed token of the same user resumes the stream where it was.
  live.restart(!!before && !!state.user && state.user.id === before);
}

/** A new access token from the refresh cookie; false when there is no session. */
async function refresh() {
  try {
    await signedIn(await session("/refresh"));
    return true;
  } catch {
    state.token = null;
    state.user = null;
    updateNav();
    return false;
  }
}

const isAdmin = () => !!state.user && (state.user.roles || []).includes("admin");

function updateNav() {
  const inside = !!state.token;
  document.getElementById("nav-orders").hidden = !inside;
  document.getElementById("nav-inbox").hidden = !inside;
  document.getElementById("nav-console").hidden = !isAdmin();
  document.getElementById("nav-signin").hidden = inside;
  document.getElementById("signout").hidden = !inside;
  refreshCartCount();
}

async function refreshCartCount() {
  let n = 0;
  if (state.token) {
    try {
      const cart = await api("GET", "/v1/cart");
      n = (cart.lines || []).reduce((a, l) => a + Number(l.quantity || 0), 0);
    } catch {
      n = 0;
    }
  }
  document.getElementById("cart-count").textContent = String(n);
}

// ---------- live events (fetch-read server-sent events, so the token goes in a header) ----------

const live = {
  listeners: new Set(),
  controller: null,
  lastId: null,
  restart(resume = false) {
    if (this.controller) this.controller.abort();
    this.controller = null;
    if (!resume) this.lastId = null;
    if (state.token) this.run();
  },
  on(f) {
    this.listeners.add(f);
    return () => this.listeners.delete(f);
  },
  async run() {
    const controller = new AbortController();
    this.controller = controller;
    while (!controller.signal.aborted && state.token) {
      try {
        const headers = { authorization: `Bearer ${state.token}`, accept: "text/event-stream" };
        if (this.lastId) headers["last-event-id"] = this.lastId;
        const r = await fetch("/v1/events/stream", { headers, signal: controller.signal });
        if (r.status === 401) {
          if (!(await refresh())) return;
          continue;
        }
        if (!r.ok || !r.body) throw new Error(`stream ${r.status}`);
        if ((await this.read(r.body.getReader(), controller.signal)) === "expired") {
          // The server ends a stream when its token expires: refresh, then resume at once.
          if (!(await refresh())) return;
          continue;
        }
      } catch (e) {
        if (controller.signal.aborted) return;
      }
      await new Promise((ok) => setTimeout(ok, 2000));
    }
  },
  async read(reader, signal) {
    const decoder = new TextDecoder();
    let buf = "";
    while (!signal.aborted) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let at;
      while ((at = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, at);
        buf = buf.slice(at + 2);
        const ev = { id: null, name: "message", data: "" };
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const i = line.indexOf(": ");
          const [k, v] = i < 0 ? [line, ""] : [line.slice(0, i), line.slice(i + 2)];
          if (k === "id") ev.id = v;
          else if (k === "event") ev.name = v;
          else if (k === "data") ev.data += v;
        }
        if (!ev.data) continue;
        if (ev.name === "expired") return "expired";
        if (ev.id) this.lastId = ev.id;
        let data;
        try {
          data = JSON.parse(ev.data);
        } catch {
          continue;
        }
        for (const f of this.listeners) f(ev.name, data, ev.id);
      }
    }
  },
};

// ---------- views ----------

const routes = [
  [/^#?\/?$/, catalog],
  [/^#\/search\/(.*)$/, (q) => catalog(decodeURIComponent(q))],
  [/^#\/c\/([^/]+)$/, (c) => catalog("", c)],
  [/^#\/p\/([^/]+)$/, product],
  [/^#\/cart$/, cart],
  [/^#\/checkout$/, checkout],
  [/^#\/orders$/, orders],
  [/^#\/orders\/([^/]+)$/, order],
  [/^#\/notifications$/, inbox],
  [/^#\/signin$/, signin],
  [/^#\/signup$/, signup],
  [/^#\/console$/, consoleView],
];

let leave = null;

async function route() {
  if (leave) leave();
  leave = null;
  const hash = location.hash || "#/";
  state.view = hash;
  for (const [re, view] of routes) {
    const m = hash.match(re);
    if (m) {
      try {
        await view(...m.slice(1));
      } catch (e) {
        if (e instanceof ApiError && e.status === 401) {
          location.hash = "#/signin";
          return;
        }
        show(h("h1", {}, "Something went wrong"), h("p", { class: "error" }, e.message));
      }
      return;
    }
  }
  show(h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/" }, "Back to the shop")));
}

let categoriesCache = null;

async function catalog(query = "", categoryId = "", pageToken = "", back = []) {
  if (!categoriesCache) categoriesCache = (await api("GET", "/v1/categories")).categories || [];
  const params = new URLSearchParams({ pageSize: "12" });
  if (query) params.set("query", query);
  if (categoryId) params.set("categoryId", categoryId);
  if (pageToken) params.set("pageToken", pageToken);
  const page = await api("GET", `/v1/products?${params}`);
  const cats = h(
    "nav",
    { "aria-label": "Categories" },
    h("h2", {}, "Categories"),
    h(
      "ul",
      { class: "cats" },
      h("li", {}, h("a", { href: "#/", "aria-current": !categoryId && !query ? "page" : null }, "All products")),
      categoriesCache.map((c) =>
        h("li", {}, h("a", { href: `#/c/${c.id}`, "aria-current": c.id === categoryId ? "page" : null }, c.name)),
      ),
    ),
  );
  const title = page.correctedQuery
    ? `Results for “${page.correctedQuery}”`
    : query
      ? `Results for “${query}”`
      : categoriesCache.find((c) => c.id === categoryId)?.name || "All products";
  const corrected = page.correctedQuery ? h("p", { class: "muted", role: "status" }, `Nothing matched “${query}”; showing “${page.correctedQuery}” instead.`) : null;
  const list = (page.products || []).map((p) =>
    h(
      "li",
      { class: "card" },
      h("h3", {}, h("a", { href: `#/p/${p.id}` }, p.name)),
      h("p", { class: "muted" }, p.sku),
      h("p", { class: "price" }, money(p.price)),
      h("button", { type: "button", onclick: () => addToCart(p.id, 1) }, "Add to cart"),
    ),
  );
  const pager = h(
    "div",
    { class: "pager" },
    h("button", { type: "button", class: "secondary", disabled: back.length === 0, onclick: () => catalog(query, categoryId, back[back.length - 1], back.slice(0, -1)) }, "Previous page"),
    h("button", { type: "button", class: "secondary", disabled: !page.nextPageToken, onclick: () => catalog(query, categoryId, page.nextPageToken, [...back, pageToken]) }, "Next page"),
  );
  show(
    h(
      "div",
      { class: "layout" },
      cats,
      h("section", { "aria-labelledby": "list-title" }, h("h1", { id: "list-title" }, title), corrected, list.length ? h("ul", { class: "grid" }, list) : h("p", {}, "No products match."), pager),
    ),
  );
}

async function addToCart(productId, quantity) {
  if (!state.token) {
    toast("Sign in to use the cart");
    location.hash = "#/signin";
    return;
  }
  try {
    await api("POST", "/v1/cart/items", { productId, quantity });
    toast("Added to the cart");
    refreshCartCount();
  } catch (e) {
    toast(e.message);
  }
}

async function product(id) {
  const p = await api("GET", `/v1/products/${encodeURIComponent(id)}`);
  let stock = null;
  try {
    stock = await api("GET", `/v1/products/${encodeURIComponent(id)}/stock`);
  } catch {
    stock = null;
  }
  const available = stock ? Number(stock.available || 0) : null;
  const stockText =
    available === null ? "" : available === 0 ? "Out of stock" : available < 5 ? `Only ${available} left` : "In stock";
  const stockClass = available === 0 ? "stock-out" : available !== null && available < 5 ? "stock-low" : "stock-ok";
  const qty = h("input", { id: "qty", type: "number", min: "1", max: "99", value: "1" });
  const attrs = Object.entries(p.attributes || {});
  show(
    h(
      "article",
      { class: "panel" },
      h("h1", {}, p.name),
      h("p", { class: "price" }, money(p.price)),
      h("p", { class: stockClass, id: "stock" }, stockText),
      h("p", {}, p.description),
      attrs.length ? h("table", {}, h("tbody", {}, attrs.map(([k, v]) => h("tr", {}, h("th", { scope: "row" }, k), h("td", {}, v))))) : null,
      h(
        "div",
        { class: "form" },
        h("label", { for: "qty" }, "Quantity", qty),
        h("button", { type: "button", disabled: available === 0, onclick: () => addToCart(p.id, Number(qty.value || 1)) }, "Add to cart"),
      ),
    ),
  );
}

async function cart() {
  if (!state.token) return (location.hash = "#/signin");
  const c = await api("GET", "/v1/cart");
  const lines = c.lines || [];
  const setQty = async (line, q) => {
    try {
      if (q <= 0) await api("DELETE", `/v1/cart/items/${encodeURIComponent(line.productId)}`);
      else await api("PUT", `/v1/cart/items/${encodeURIComponent(line.productId)}`, { quantity: q });
      await cart();
      refreshCartCount();
    } catch (e) {
      toast(e.message);
    }
  };
  show(
    h("h1", {}, "Your cart"),
    lines.length === 0
      ? h("p", {}, "Your cart is empty. ", h("a", { href: "#/" }, "Browse the shop"))
      : h(
          "div",
          {},
          h(
            "table",
            {},
            h("thead", {}, h("tr", {}, h("th", {}, "Product"), h("th", {}, "Price"), h("th", {}, "Quantity"), h("th", {}, "Total"), h("th", {}, h("span", { class: "sr-only" }, "Remove")))),
            h(
              "tbody",
              {},
              lines.map((l) => {
                const q = h("input", { type: "number", min: "0", max: "99", value: String(l.quantity), "aria-label": `Quantity of ${l.name}`, onchange: (e) => e.target.value !== "" && Number.isInteger(Number(e.target.value)) && setQty(l, Number(e.target.value)) });
                return h(
                  "tr",
                  {},
                  h("td", {}, h("a", { href: `#/p/${l.productId}` }, l.name), l.available === false ? h("span", { class: "stock-out" }, " (unavailable)") : null),
                  h("td", {}, money(l.unitPrice)),
                  h("td", {}, q),
                  h("td", {}, money(l.lineTotal)),
                  h("td", {}, h("button", { type: "button", class: "secondary", onclick: () => setQty(l, 0) }, "Remove")),
                );
              }),
            ),
          ),
          h("p", { class: "price" }, `Subtotal: ${money(c.subtotal)}`),
          h("a", { href: "#/checkout" }, h("button", { type: "button", tabindex: "-1" }, "Check out")),
        ),
  );
}

const CARDS = [
  ["pm_card_ok", "Card that succeeds"],
  ["pm_card_declined", "Card that is declined"],
  ["pm_card_flaky", "Card that fails twice, then succeeds"],
];

function newKey() {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

async function checkout() {
  if (!state.token) return (location.hash = "#/signin");
  const c = await api("GET", "/v1/cart");
  if (!(c.lines || []).length) return (location.hash = "#/cart");
  const key = newKey();
  const field = (name, label, value = "", extra = {}) =>
    h("label", {}, label, h("input", { name, value, required: true, autocomplete: extra.autocomplete || "off", ...extra }));
  const error = h("p", { class: "error", role: "alert" });
  const form = h(
    "form",
    { class: "form", novalidate: false },
    field("recipient", "Recipient", state.user?.displayName || "", { autocomplete: "name" }),
    field("line1", "Street and number", "", { autocomplete: "address-line1" }),
    field("city", "City", "", { autocomplete: "address-level2" }),
    field("postalCode", "Postal code", "", { autocomplete: "postal-code" }),
    field("country", "Country (two letters)", "DE", { maxlength: "2", autocomplete: "country" }),
    h(
      "fieldset",
      {},
      h("legend", {}, "Payment method"),
      CARDS.map(([token, label], i) => h("label", {}, h("input", { type: "radio", name: "card", value: token, checked: i === 0 }), label)),
    ),
    h("p", { class: "price" }, `Subtotal: ${money(c.subtotal)}`),
    h("button", { type: "submit" }, "Place order"),
    error,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const f = new FormData(form);
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const o = await api("POST", "/v1/checkout", {
        idempotencyKey: key,
        paymentMethodToken: f.get("card"),
        shippingAddress: {
          recipient: f.get("recipient"),
          line1: f.get("line1"),
          city: f.get("city"),
          postalCode: f.get("postalCode"),
          country: String(f.get("country")).toUpperCase(),
        },
      });
      refreshCartCount();
      location.hash = `#/orders/${o.id}`;
    } catch (err) {
      error.textContent = err.message;
      button.disabled = false;
    }
  });
  show(h("h1", {}, "Checkout"), form);
}

async function orders() {
  if (!state.token) return (location.hash = "#/signin");
  const list = (await api("GET", "/v1/orders?pageSize=50")).orders || [];
  show(
    h("h1", {}, "My orders"),
    list.length === 0
      ? h("p", {}, "No orders yet.")
      : h(
          "table",
          {},
          h("thead", {}, h("tr", {}, h("th", {}, "Order"), h("th", {}, "Placed"), h("th", {}, "Status"), h("th", {}, "Total"))),
          h(
            "tbody",
            {},
            list.map((o) =>
              h(
                "tr",
                {},
                h("td", {}, h("a", { href: `#/orders/${o.id}` }, o.id.slice(-8))),
                h("td", {}, when(o.createdAt)),
                h("td", {}, h("span", { class: `status ${statusName(o.status)}` }, statusName(o.status))),
                h("td", {}, money(o.total)),
              ),
            ),
          ),
        ),
  );
}

/** The timeline's step for an event, or null. */
function step(name, data) {
  switch (name) {
    case "order.placed":
      return ["Order placed", "done"];
    case "payment.succeeded":
      return ["Payment succeeded", "done"];
    case "payment.failed":
      return [`Payment failed: ${data.reason || "declined"}`, "failed"];
    case "payment.refunded":
      return ["Payment refunded", "done"];
    case "order.confirmed":
      return ["Order confirmed", "done"];
    case "order.cancelled":
      return [`Order cancelled${data.reason ? `: ${data.reason}` : ""}`, "failed"];
    case "shipment.scheduled":
      return [`Shipment scheduled with ${data.carrier || "the carrier"}`, "done"];
    case "shipment.shipped":
      return [`Shipped${data.trackingNumber ? ` (tracking ${data.trackingNumber})` : ""}`, "done"];
    case "shipment.delivered":
      return ["Delivered", "done"];
    default:
      return null;
  }
}

async function order(id) {
  if (!state.token) return (location.hash = "#/signin");
  // Listen before reading: an event that comes while the page loads is applied after.
  const early = [];
  let apply = (name, data) => early.push([name, data]);
  leave = live.on((name, data) => data.orderId === id && apply(name, data));
  const o = await api("GET", `/v1/orders/${encodeURIComponent(id)}`);
  const status = h("span", { class: `status ${statusName(o.status)}`, id: "order-status" }, statusName(o.status));
  const steps = h("ol", { class: "timeline", "aria-live": "polite", id: "timeline" });
  const seen = new Set();
  const add = (key, text, cls, at) => {
    if (seen.has(key)) return;
    seen.add(key);
    steps.append(h("li", { class: cls, "data-step": key }, h("strong", {}, text), h("br"), h("span", { class: "muted" }, when(at))));
  };
  // What already happened, from the REST API.
  add("order.placed", "Order placed", "done", o.createdAt);
  try {
    const p = await api("GET", `/v1/orders/${encodeURIComponent(id)}/payment`);
    const ps = statusName(p.status);
    if (Number(p.attempts || 0) > 1) add("attempts", `Payment attempts: ${p.attempts}`, "done", o.updatedAt);
    if (ps === "SUCCEEDED" || ps === "CAPTURED") add("payment.succeeded", "Payment succeeded", "done", o.updatedAt);
    if (ps === "FAILED" || ps === "DECLINED") add("payment.failed", `Payment failed: ${p.failureReason || "declined"}`, "failed", o.updatedAt);
  } catch {
    /* no payment yet */
  }
  const st = statusName(o.status);
  if (["CONFIRMED", "SHIPPED", "DELIVERED"].includes(st)) add("order.confirmed", "Order confirmed", "done", o.updatedAt);
  if (st === "CANCELLED") add("order.cancelled", `Order cancelled${o.cancelReason ? `: ${o.cancelReason}` : ""}`, "failed", o.updatedAt);
  try {
    const s = await api("GET", `/v1/orders/${encodeURIComponent(id)}/shipment`);
    add("shipment.scheduled", `Shipment scheduled with ${s.carrier}`, "done", s.createdAt);
    if (["SHIPPED", "DELIVERED"].includes(statusName(s.status))) add("shipment.shipped", "Shipped", "done", s.updatedAt);
    if (statusName(s.status) === "DELIVERED") add("shipment.delivered", "Delivered", "done", s.updatedAt);
  } catch {
    /* not scheduled yet */
  }
  const notices = h("ul", { id: "order-notices" });
  const loadNotices = async () => {
    const n = (await api("GET", "/v1/notifications?pageSize=50").catch(() => ({}))).notifications || [];
    // Notices quote an order by its last eight characters, as the shop shows it.
    const mine = n.filter((x) => `${x.subject} ${x.body}`.includes(id.slice(-8)));
    notices.replaceChildren(...mine.map((x) => h("li", {}, `${when(x.createdAt)}: ${x.subject}`)));
  };
  loadNotices();
  // What happens next, as it happens.
  const attempts = async () => {
    const p = await api("GET", `/v1/orders/${encodeURIComponent(id)}/payment`).catch(() => null);
    if (p && Number(p.attempts || 0) > 1) add("attempts", `Payment attempts: ${p.attempts}`, "done", Date.now());
  };
  apply = (name, data) => {
    // Attempts that failed and were retried are counted by payments; shown once it settled.
    if (name.startsWith("payment.")) attempts();
    const s = step(name, data);
    if (s) add(name, s[0], s[1], data.timeMs);
    if (data.status && name.startsWith("order.")) {
      status.textContent = statusName(data.status);
      status.className = `status ${statusName(data.status)}`;
    }
    setTimeout(loadNotices, 500);
  };
  early.splice(0).forEach(([name, data]) => apply(name, data));
  show(
    h("h1", {}, `Order ${o.id.slice(-8)}`),
    h("p", {}, "Status: ", status, " · Total ", money(o.total)),
    h("h2", {}, "Timeline"),
    steps,
    h("h2", {}, "Notifications sent"),
    notices,
  );
}

async function inbox() {
  if (!state.token) return (location.hash = "#/signin");
  const n = (await api("GET", "/v1/notifications?pageSize=50")).notifications || [];
  show(
    h("h1", {}, "Inbox"),
    n.length === 0 ? h("p", {}, "No notifications.") : h("ul", {}, n.map((x) => h("li", {}, h("strong", {}, x.subject), h("br"), h("span", { class: "muted" }, when(x.createdAt)), h("p", {}, x.body)))),
  );
}

function authForm(title, fields, submit, footer) {
  const error = h("p", { class: "error", role: "alert" });
  const form = h(
    "form",
    { class: "form" },
    fields.map(([name, label, type, auto]) => h("label", {}, label, h("input", { name, type, required: true, autocomplete: auto }))),
    h("button", { type: "submit" }, title),
    error,
    footer,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      await submit(Object.fromEntries(new FormData(form)));
    } catch (err) {
      error.textContent = err.message;
    }
  });
  show(h("h1", {}, title), form);
  form.querySelector("input").focus();
}

function signin() {
  authForm(
    "Sign in",
    [
      ["email", "Email", "email", "username"],
      ["password", "Password", "password", "current-password"],
    ],
    async (f) => {
      await signedIn(await session("", { email: f.email, password: f.password }));
      toast("Signed in");
      location.hash = isAdmin() ? "#/console" : "#/";
    },
    h("p", {}, "New here? ", h("a", { href: "#/signup" }, "Create an account")),
  );
}

function signup() {
  authForm(
    "Create an account",
    [
      ["displayName", "Name", "text", "name"],
      ["email", "Email", "email", "username"],
      ["password", "Password (at least 8 characters)", "password", "new-password"],
    ],
    async (f) => {
      await api("POST", "/v1/auth/register", f);
      await signedIn(await session("", { email: f.email, password: f.password }));
      toast("Welcome");
      location.hash = "#/";
    },
    h("p", {}, "Have an account? ", h("a", { href: "#/signin" }, "Sign in")),
  );
}

async function signout() {
  await session("/logout").catch(() => {});
  state.token = null;
  state.user = null;
  clearTimeout(state.refreshTimer);
  live.restart();
  updateNav();
  location.hash = "#/";
}

// The console is its own module, loaded for admins only.
async function consoleView() {
  if (!isAdmin()) {
    show(h("h1", {}, "Operations console"), h("p", { class: "error" }, "The console is for administrators. Sign in with an admin account."));
    return;
  }
  const mod = await import(document.querySelector("meta[name=console]")?.content || "./console.js");
  leave = await mod.render({ h, show, api, live, toast, money, when, statusName });
}

// ---------- start ----------

document.getElementById("search").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = document.getElementById("q").value.trim();
  location.hash = q ? `#/search/${encodeURIComponent(q)}` : "#/";
});
document.getElementById("signout").addEventListener("click", signout);
window.addEventListener("hashchange", route);
refresh().finally(route);
