// The operations console: the running system drawn live, the event stream, dead letters, the
// edge cache, catalog and stock, orders and users. Loaded by app.js for admins only.

const SVG = "http://www.w3.org/2000/svg";
const SERVICES = ["users", "products", "orders", "payments", "notifications", "delivery"];

/** Who consumes each event type (the saga's wiring), for the diagram's animation. */
const CONSUMERS = {
  "order.placed": ["payments", "notifications"],
  "order.confirmed": ["delivery", "notifications"],
  "order.cancelled": ["payments", "products", "notifications"],
  "payment.succeeded": ["orders"],
  "payment.failed": ["orders"],
  "payment.refunded": ["orders"],
  "shipment.scheduled": ["orders"],
  "shipment.shipped": ["orders"],
  "shipment.delivered": ["orders"],
  "product.created": ["gateway"],
  "product.updated": ["gateway"],
  "product.archived": ["gateway"],
  "stock.changed": ["gateway"],
};

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

/** The p99 in ms from the difference of two cumulative bucket lists [[le, count], ...]. */
function p99(now, before) {
  if (!now || !now.length) return null;
  const delta = now.map(([le, c], i) => [le, c - ((before && before[i] && before[i][1]) || 0)]);
  const total = delta[delta.length - 1][1];
  if (total <= 0) return null;
  const want = total * 0.99;
  const hit = delta.find(([, c]) => c >= want);
  return hit ? hit[0] * 1000 : null;
}

export async function render({ h, show, api, live, toast, money, when, statusName }) {
  const timers = [];
  const offs = [];
  const panel = h("div", { class: "panel", id: "console-panel" });

  // ----- the diagram -----
  const W = 900;
  const pos = { gateway: [W / 2, 50], bus: [W / 2, 330] };
  SERVICES.forEach((name, i) => (pos[name] = [75 + i * 150, 190]));
  // Each service's box; its metric line is set in a smaller size to fit.
  const svg = s("svg", { viewBox: `0 0 ${W} 400`, class: "diagram", role: "img", "aria-labelledby": "diagram-title" });
  svg.append(s("title", { id: "diagram-title" }, "The running system: gateway, services, event bus and stores"));
  for (const name of SERVICES) {
    svg.append(s("line", { class: "edge", x1: pos.gateway[0], y1: pos.gateway[1] + 22, x2: pos[name][0], y2: pos[name][1] - 26 }));
    svg.append(s("line", { class: "edge", x1: pos[name][0], y1: pos[name][1] + 26, x2: pos.bus[0], y2: pos.bus[1] - 22 }));
  }
  const nodes = {};
  const node = (name, label, w) => {
    const [x, y] = pos[name];
    const metric = s("text", { class: "metric", x: x, y: y + 10, "text-anchor": "middle" }, "…");
    const load = s("text", { class: "metric", x: x, y: y + 23, "text-anchor": "middle" }, "");
    const g = s(
      "g",
      { class: "node", "data-node": name },
      s("rect", { x: x - w / 2, y: y - 28, width: w, height: 58, rx: 8 }),
      s("text", { x: x, y: y - 8, "text-anchor": "middle" }, label),
      metric,
      load,
    );
    svg.append(g);
    nodes[name] = { g, metric, load };
  };
  node("gateway", "gateway", 220);
  SERVICES.forEach((n) => node(n, `${n} + db`, 144));
  node("bus", "event bus", 260);

  const pulse = (from, to) =>
    new Promise((done) => {
      const [x1, y1] = pos[from];
      const [x2, y2] = pos[to];
      const dot = s("circle", { class: "pulse", r: 6, cx: x1, cy: y1 });
      svg.append(dot);
      const t0 = performance.now();
      const step = (t) => {
        const k = Math.min(1, (t - t0) / 500);
        dot.setAttribute("cx", x1 + (x2 - x1) * k);
        dot.setAttribute("cy", y1 + (y2 - y1) * k);
        if (k < 1) requestAnimationFrame(step);
        else {
          dot.remove();
          done();
        }
      };
      requestAnimationFrame(step);
    });
  const animate = async (type, source) => {
    const from = pos[source] ? source : "bus";
    await pulse(from, "bus");
    await Promise.all((CONSUMERS[type] || []).filter((c) => pos[c]).map((c) => pulse("bus", c)));
  };

  // ----- health, rate and p99, from two reads of /v1/admin/system -----
  const lagLine = h("p", { id: "consumer-lag", class: "muted" }, "Consumer lag: …");
  let before = null;
  const poll = async () => {
    try {
      const sys = await api("GET", "/v1/admin/system");
      const t = performance.now();
      const gw = { name: "gateway", ready: true, ...sys.gateway };
      for (const svc of [gw, ...sys.services]) {
        const n = nodes[svc.name];
        if (!n) continue;
        const old = before && (svc.name === "gateway" ? before.sys.gateway : before.sys.services.find((x) => x.name === svc.name));
        const secs = before ? (t - before.t) / 1000 : 0;
        const rate = old && secs > 0 ? (svc.requests - old.requests) / secs : 0;
        const q = p99(svc.buckets, old && old.buckets);
        const health = svc.name === "gateway" ? "up" : svc.ready ? `ready ${svc.healthy}/${svc.replicas}` : "NOT READY";
        const p = q === null ? "–" : `${q < 1 ? q.toFixed(2) : Math.round(q)} ms`;
        n.metric.textContent = health;
        n.load.textContent = `${rate.toFixed(1)} req/s · p99 ${p}`;
        n.g.classList.toggle("down", svc.ready === false);
      }
      nodes.bus.metric.textContent = sys.bus || "no bus";
      const lags = Object.entries(sys.consumerLag || {});
      const waiting = lags.reduce((a, [, n]) => a + n, 0);
      nodes.bus.load.textContent = lags.length ? `consumer lag ${waiting}` : "";
      lagLine.textContent = lags.length
        ? `Consumer lag: ${lags.map(([c, n]) => `${c} ${n}`).join(" · ")}`
        : "Consumer lag: not reported by this process (consumers run elsewhere)";
      before = { sys, t };
    } catch (e) {
      nodes.gateway.metric.textContent = `unreachable: ${e.message}`;
    }
  };
  poll();
  timers.push(setInterval(poll, 2000));

  // ----- the event stream -----
  const rows = h("tbody", { id: "event-rows" });
  const eventsTable = h(
    "div",
    { class: "panel events" },
    h(
      "table",
      {},
      h("caption", { class: "sr-only" }, "Events as they are published"),
      h("thead", {}, h("tr", {}, ["Time", "Topic", "Type", "Key", "Partition/offset", "Trace"].map((c) => h("th", { scope: "col" }, c)))),
      rows,
    ),
  );
  offs.push(
    live.on((name, data) => {
      if (name === "reset") return;
      rows.prepend(
        h(
          "tr",
          { "data-type": name },
          h("td", {}, when(data.timeMs)),
          h("td", {}, data.topic),
          h("td", {}, name),
          h("td", {}, data.subject || ""),
          h("td", {}, `${data.partition}/${data.offset}`),
          h("td", {}, data.traceId ? data.traceId.slice(0, 12) : "–"),
        ),
      );
      while (rows.children.length > 100) rows.lastChild.remove();
      animate(name, data.source);
    }),
  );

  // ----- the tabs -----
  const views = {
    "Dead letters": async () => {
      const list = (await api("GET", "/v1/admin/dlq")).deadLetters || [];
      // One event by its id (again, if it was replayed), or every one not yet replayed.
      const replay = async (id) => {
        const r = await api("POST", "/v1/admin/dlq:replay", id ? { eventId: id } : {});
        toast(`Replayed ${(r.replayed || []).length} event(s)`);
        open("Dead letters");
      };
      const waiting = list.filter((d) => !d.replayed).length;
      return list.length === 0
        ? h("p", {}, "No parked events.")
        : h(
            "div",
            {},
            h("p", {}, `${waiting} waiting to be replayed. `, h("button", { type: "button", disabled: waiting === 0, onclick: () => replay(null) }, "Replay all waiting")),
            h(
            "table",
            {},
            h("thead", {}, h("tr", {}, ["Parked", "Topic", "Type", "Consumer", "Reason", "Attempts", "State", ""].map((c) => h("th", { scope: "col" }, c)))),
            h(
              "tbody",
              {},
              list.map((d) =>
                h(
                  "tr",
                  {},
                  h("td", {}, when(d.failed_at_ms)),
                  h("td", {}, d.original_topic),
                  h("td", {}, d.event_type),
                  h("td", {}, d.consumer),
                  h("td", {}, d.reason),
                  h("td", {}, d.attempts),
                  h("td", {}, d.replayed ? "replayed" : "parked"),
                  h("td", {}, d.event_id ? h("button", { type: "button", class: "secondary", onclick: () => replay(d.event_id) }, `Replay ${d.event_type}`) : "no event id"),
                ),
              ),
            ),
            ),
          );
    },
    "Edge cache": async () => {
      const c = await api("GET", "/v1/admin/cache");
      const key = h("input", { id: "purge-key", placeholder: "/v1/products?" });
      const purge = async (body) => {
        const r = await api("POST", "/v1/admin/cache:purge", body);
        toast(`Purged ${r.purged} entr${r.purged === 1 ? "y" : "ies"}`);
        open("Edge cache");
      };
      const ratio = c.hits + c.misses > 0 ? `${((100 * c.hits) / (c.hits + c.misses)).toFixed(1)} %` : "–";
      return h(
        "div",
        {},
        h(
          "table",
          {},
          h(
            "tbody",
            {},
            [
              ["Entries", c.entries],
              ["Memory", `${(c.memoryBytes / 1024).toFixed(0)} KiB`],
              ["Disk", `${(c.diskBytes / 1024).toFixed(0)} KiB`],
              ["Hits", c.hits],
              ["Misses", c.misses],
              ["Hit ratio", ratio],
              ["Evictions", c.evictions],
            ].map(([k, v]) => h("tr", {}, h("th", { scope: "row" }, k), h("td", { "data-stat": k }, v))),
          ),
        ),
        h("p", {}, h("button", { type: "button", id: "purge-all", onclick: () => purge({ all: true }) }, "Purge everything")),
        h("p", {}, h("label", { for: "purge-key" }, "Purge one key "), key, " ", h("button", { type: "button", class: "secondary", onclick: () => purge({ key: key.value }) }, "Purge key")),
      );
    },
    "Catalog and stock": async () => {
      const products = (await api("GET", "/v1/products?pageSize=50")).products || [];
      const stocks = await Promise.all(products.map((p) => api("GET", `/v1/products/${p.id}/stock`).catch(() => null)));
      const categories = (await api("GET", "/v1/categories")).categories || [];
      // A new product: price in the currency's major units, as a shop keeper types it.
      const error = h("p", { class: "error", role: "alert" });
      const field = (name, label, extra = {}) => h("label", {}, label, h("input", { name, required: true, ...extra }));
      const create = h(
        "form",
        { class: "form", id: "new-product" },
        field("sku", "SKU"),
        field("name", "Name"),
        field("description", "Description", { required: false }),
        field("price", "Price (EUR)", { type: "number", min: "0.01", step: "0.01" }),
        h("label", {}, "Category", h("select", { name: "categoryId" }, categories.map((c) => h("option", { value: c.id }, c.name)))),
        field("initialStock", "Initial stock", { type: "number", min: "0", value: "10" }),
        h("button", { type: "submit" }, "Create product"),
        error,
      );
      create.addEventListener("submit", async (e) => {
        e.preventDefault();
        const f = Object.fromEntries(new FormData(create));
        try {
          await api("POST", "/v1/products", {
            sku: f.sku,
            name: f.name,
            description: f.description,
            price: { amountMinor: String(Math.round(Number(f.price) * 100)), currency: "EUR" },
            categoryId: f.categoryId,
            initialStock: String(f.initialStock || 0),
          });
          toast(`Created ${f.name}`);
          open("Catalog and stock");
        } catch (err) {
          error.textContent = err.message;
        }
      });
      const table = h(
        "table",
        {},
        h("thead", {}, h("tr", {}, ["Product", "SKU", "Price", "Available", "Reserved", ""].map((c) => h("th", { scope: "col" }, c)))),
        h(
          "tbody",
          {},
          products.map((p, i) => {
            const input = h("input", { type: "number", min: "0", value: String(stocks[i] ? stocks[i].available || 0 : 0), "aria-label": `Stock of ${p.name}`, "data-stock": p.id });
            const name = h("input", { value: p.name, "aria-label": `Name of ${p.name}`, "data-name": p.id });
            const save = async () => {
              try {
                if (name.value && name.value !== p.name) {
                  await api("PATCH", `/v1/products/${p.id}`, { expectedVersion: p.version, name: name.value });
                }
                await api("PUT", `/v1/products/${p.id}/stock`, { available: Number(input.value) });
                toast(`${name.value}: stock set to ${input.value}`);
              } catch (err) {
                toast(err.message);
              }
            };
            return h(
              "tr",
              {},
              h("td", {}, name),
              h("td", {}, p.sku),
              h("td", {}, money(p.price)),
              h("td", {}, input),
              h("td", {}, stocks[i] ? stocks[i].reserved || 0 : "–"),
              h("td", {}, h("button", { type: "button", onclick: save }, "Save")),
            );
          }),
        ),
      );
      return h("div", {}, h("h3", {}, "New product"), create, h("h3", {}, "Products"), table);
    },
    Orders: async () => {
      const list = (await api("GET", "/v1/admin/orders?pageSize=50")).orders || [];
      const act = async (path, body, what) => {
        try {
          await api("POST", path, body);
          toast(what);
          open("Orders");
        } catch (e) {
          toast(e.message);
        }
      };
      return h(
        "table",
        {},
        h("thead", {}, h("tr", {}, ["Order", "Placed", "Status", "Total", "Actions"].map((c) => h("th", { scope: "col" }, c)))),
        h(
          "tbody",
          {},
          list.map((o) =>
            h(
              "tr",
              {},
              h("td", {}, o.id.slice(-8)),
              h("td", {}, when(o.createdAt)),
              h("td", {}, h("span", { class: `status ${statusName(o.status)}` }, statusName(o.status))),
              h("td", {}, money(o.total)),
              h(
                "td",
                {},
                h("button", { type: "button", class: "secondary", onclick: () => act(`/v1/orders/${o.id}/shipment:ship`, {}, "Shipped") }, "Ship"),
                " ",
                h("button", { type: "button", class: "secondary", onclick: () => act(`/v1/orders/${o.id}/shipment:deliver`, {}, "Delivered") }, "Deliver"),
                " ",
                h("button", { type: "button", class: "secondary", onclick: () => act(`/v1/orders/${o.id}:cancel`, { reason: "cancelled by an operator" }, "Cancelled") }, "Cancel"),
              ),
            ),
          ),
        ),
      );
    },
    Users: async () => {
      const users = (await api("GET", "/v1/admin/users?pageSize=50")).users || [];
      const setRoles = async (u, roles) => {
        await api("PUT", `/v1/admin/users/${u.id}/roles`, { roles });
        toast(`Roles of ${u.email}: ${roles.join(", ")}`);
        open("Users");
      };
      return h(
        "table",
        {},
        h("thead", {}, h("tr", {}, ["Email", "Name", "Roles", ""].map((c) => h("th", { scope: "col" }, c)))),
        h(
          "tbody",
          {},
          users.map((u) => {
            const admin = (u.roles || []).includes("admin");
            return h(
              "tr",
              {},
              h("td", {}, u.email),
              h("td", {}, u.displayName || ""),
              h("td", {}, (u.roles || []).join(", ")),
              h("td", {}, h("button", { type: "button", class: "secondary", onclick: () => setRoles(u, admin ? ["customer"] : ["customer", "admin"]) }, admin ? "Make customer" : "Make admin")),
            );
          }),
        ),
      );
    },
  };
  const tabs = h("div", { class: "tabs", role: "group", "aria-label": "Console sections" });
  const open = async (name) => {
    for (const b of tabs.children) b.setAttribute("aria-pressed", String(b.dataset.tab === name));
    panel.replaceChildren(h("p", { class: "muted" }, "Loading…"));
    try {
      panel.replaceChildren(h("h2", {}, name), await views[name]());
    } catch (e) {
      panel.replaceChildren(h("p", { class: "error" }, e.message));
    }
  };
  for (const name of Object.keys(views)) {
    tabs.append(h("button", { type: "button", class: "secondary", "data-tab": name, "aria-pressed": "false", onclick: () => open(name) }, name));
  }

  show(
    h(
      "div",
      { class: "console" },
      h("h1", {}, "Operations console"),
      svg,
      h("h2", {}, "Event stream"),
      lagLine,
      eventsTable,
      tabs,
      panel,
    ),
  );
  open("Dead letters");
  return () => {
    timers.forEach(clearInterval);
    offs.forEach((off) => off());
  };
}
