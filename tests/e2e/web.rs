//! The storefront and the operations console in a real browser: Debian's Chromium, driven
//! through WebDriver (chromedriver) by a small client over the W3C protocol's JSON, with
//! axe-core run in each page checked (serious and critical violations fail the test).
//! Screenshots go to `$CARGO_TARGET_TMPDIR/screenshots`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use crate::common::*;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless Chromium under chromedriver, one session.
struct Browser {
    driver: Child,
    at: SocketAddr,
    session: String,
    base: String,
}

impl Browser {
    fn start(gateway: SocketAddr) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let bin = std::env::var("SHOPVERSE_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let driver = Command::new(&bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{bin}: {e} (scripts/test installs chromium-driver)"));
        let at: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        until("chromedriver answers", Duration::from_secs(20), || {
            std::net::TcpStream::connect(at).is_ok()
        });
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000"]
            }
        }}});
        let mut b = Browser {
            driver,
            at,
            session: String::new(),
            base: format!("http://{gateway}"),
        };
        let created = b.raw("POST", "/session", &caps);
        b.session = created["sessionId"].as_str().unwrap().to_owned();
        b
    }

    fn raw(&self, method: &str, path: &str, body: &Value) -> Value {
        // A GET or DELETE has no body: chromedriver reads one as the command's parameters.
        let body = match method {
            "GET" | "DELETE" => String::new(),
            _ => body.to_string(),
        };
        let (status, text) = webdriver_call(self.at, method, path, &body);
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("webdriver {method} {path}: {text}"));
        assert_eq!(status, 200, "webdriver {method} {path}: {v}");
        v["value"].clone()
    }

    fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        self.raw(method, &format!("/session/{}{path}", self.session), &body)
    }

    /// Opens a page of the gateway's site (`#/cart`, say).
    fn open(&self, hash: &str) {
        self.cmd(
            "POST",
            "/url",
            json!({"url": format!("{}/{hash}", self.base)}),
        );
    }

    fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": args}),
        )
    }

    /// The first element `css` finds, waiting up to 20 s for it.
    fn find(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found = self.js(
                "const e = document.querySelector(arguments[0]); return e ? [e] : [];",
                json!([css]),
            );
            if let Some(e) = found.as_array().and_then(|a| a.first()) {
                return e[ELEMENT].as_str().unwrap().to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no {css} on {} at {}",
                self.text("body"),
                self.js("return location.href;", json!([]))
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `css`'s text contains `text`.
    fn wait_text(&self, css: &str, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.js(
                "const e = document.querySelector(arguments[0]); return e ? (e.innerText ?? e.textContent) : '';",
                json!([css]),
            );
            if now.as_str().unwrap_or("").contains(text) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{css} never said {text:?}: {now}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the element `css` finds is shown (not `hidden`).
    fn wait_shown(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.js(
            "const e = document.querySelector(arguments[0]); return !!e && !e.hidden;",
            json!([css]),
        ) != json!(true)
        {
            assert!(Instant::now() < deadline, "{css} is never shown");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Clicks the first element `css` finds once there is one (found and clicked in one step:
    /// a view that renders again in between leaves no stale reference).
    fn click(&self, css: &str) {
        self.find(css);
        let clicked = self.js(
            "const e = document.querySelector(arguments[0]); if (e) { e.click(); return true; } return false;",
            json!([css]),
        );
        assert_eq!(clicked, json!(true), "{css} went away before the click");
    }

    /// Types `text` into the input `css` finds, as keystrokes (after clearing it); a view that
    /// renders again meanwhile is waited out.
    fn type_in(&self, css: &str, text: &str) {
        for _ in 0..5 {
            let e = self.find(css);
            let path = format!("/session/{}/element/{e}", self.session);
            let (a, _) = webdriver_call(self.at, "POST", &format!("{path}/clear"), "{}");
            let body = json!({"text": text}).to_string();
            let (b, _) = webdriver_call(self.at, "POST", &format!("{path}/value"), &body);
            if a == 200 && b == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("could not type into {css}");
    }

    fn text(&self, css: &str) -> String {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? (e.innerText ?? e.textContent) : '';",
            json!([css]),
        )
        .as_str()
        .unwrap_or("")
        .to_owned()
    }

    /// Clicks the first button whose text is `label`.
    fn press(&self, label: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let pressed = self.js(
                "const b = [...document.querySelectorAll('button')].find(b => b.innerText.trim() === arguments[0] && !b.disabled);
                 if (b) { b.click(); return true; } return false;",
                json!([label]),
            );
            if pressed == json!(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no button {label:?}: {}",
                self.text("main")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&self, name: &str) {
        let png = self.cmd("GET", "/screenshot", json!(null));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), bytes).unwrap();
    }

    /// Runs axe-core in the page; panics on serious or critical violations.
    fn accessible(&self, page: &str) {
        let axe = std::fs::read_to_string(
            std::env::var("SHOPVERSE_AXE_JS").expect("SHOPVERSE_AXE_JS: scripts/test sets it up"),
        )
        .unwrap();
        self.js(&format!("{axe}\nreturn true;"), json!([]));
        let found = self.cmd(
            "POST",
            "/execute/async",
            json!({"script": "const done = arguments[arguments.length - 1];
                axe.run(document).then(r => done(r.violations
                    .filter(v => v.impact === 'serious' || v.impact === 'critical')
                    .map(v => ({id: v.id, impact: v.impact, help: v.help,
                               nodes: v.nodes.map(n => n.target.join(' '))}))))
                  .catch(e => done([{id: 'axe failed', help: String(e)}]));",
                   "args": []}),
        );
        assert_eq!(found, json!([]), "accessibility of {page}: {found:#}");
    }
}

/// One WebDriver call: chromedriver keeps connections open whatever the request says, so the
/// answer is read to its `Content-Length`, not to the connection's end.
fn webdriver_call(at: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{BufRead, BufReader, Read, Write};
    let s = std::net::TcpStream::connect(at).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {at}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    (&s).write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let (mut status, mut length) = (0u16, 0usize);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    if let Some(code) = line.split_whitespace().nth(1) {
        status = code.parse().unwrap_or(0);
    }
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut buf = vec![0u8; length];
    r.read_exact(&mut buf).unwrap();
    (status, String::from_utf8_lossy(&buf).into_owned())
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let path = format!("/session/{}", self.session);
            let _ = webdriver_call(self.at, "DELETE", &path, "");
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Checks out the cart in the page with the payment method labelled `card`; returns once the
/// order page shows.
fn checkout(b: &Browser, card: &str) {
    b.open("#/checkout");
    b.type_in("input[name=recipient]", "Sam Shopper");
    b.type_in("input[name=line1]", "1 Main St");
    b.type_in("input[name=city]", "Berlin");
    b.type_in("input[name=postalCode]", "10115");
    b.click(&format!("input[value={card}]"));
    b.press("Place order");
    b.find("#timeline");
}

/// Signs in through the page's form.
fn sign_in(b: &Browser, email: &str, password: &str) {
    b.open("#/signin");
    b.type_in("input[name=email]", email);
    b.type_in("input[name=password]", password);
    b.press("Sign in");
}

fn add_first_product_to_cart(b: &Browser) {
    b.open("#/");
    b.click(".cats li:nth-child(2) a");
    b.find(".cats li:nth-child(2) a[aria-current=page]");
    b.click(".grid .card h3 a");
    b.find("#stock");
    b.press("Add to cart");
    b.wait_text("#cart-count", "1");
}

/// A shopper signs up, browses a category, opens a product, adds it to the cart, changes the
/// quantity, and checks out three times, once with each payment method: the order page's
/// timeline reaches CONFIRMED, CANCELLED with the decline's reason, and CONFIRMED after two
/// failed attempts, each without a reload. No token is in web storage or readable cookies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shopper_signs_up_buys_and_watches_each_order_live() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &["--demo"]);
    let b = Browser::start(app.addrs["gateway"]);

    b.open("#/");
    b.find(".grid .card");
    b.accessible("the catalog");
    b.screenshot("storefront");
    b.open("#/signup");
    b.type_in("input[name=displayName]", "Sam Shopper");
    b.type_in("input[name=email]", "sam@example.com");
    b.type_in("input[name=password]", "sam password 123");
    b.press("Create an account");
    b.wait_shown("#nav-orders");
    b.find(".grid .card");

    add_first_product_to_cart(&b);
    b.open("#/cart");
    b.type_in("td input[type=number]", "2\t");
    b.wait_text("#cart-count", "2");
    b.accessible("the cart");

    // The page is never reloaded: a marker set now is still there when the saga ends. Live
    // steps take room kept for them: what is on the page does not move (layout shift, as the
    // browser measures it, under 0.1, the "good" mark of Core Web Vitals).
    checkout(&b, "pm_card_ok");
    b.js(
        "window.__stillHere = true; window.__cls = 0;
         new PerformanceObserver(l => l.getEntries().forEach(e => {
             if (!e.hadRecentInput) window.__cls += e.value; }))
           .observe({type: 'layout-shift', buffered: false});",
        json!([]),
    );
    b.wait_text("#order-status", "CONFIRMED");
    b.wait_text("#timeline", "Shipment scheduled");
    let cls = b.js("return window.__cls;", json!([])).as_f64().unwrap();
    assert!(
        cls < 0.1,
        "the order page shifted by {cls} while it updated"
    );
    b.wait_text("#order-notices", "confirmed");
    assert_eq!(
        b.js("return window.__stillHere === true;", json!([])),
        json!(true)
    );
    b.accessible("an order");
    b.screenshot("order-timeline");

    add_first_product_to_cart(&b);
    checkout(&b, "pm_card_declined");
    b.js("window.__stillHere = true;", json!([]));
    b.wait_text("#order-status", "CANCELLED");
    b.wait_text("#timeline", "card declined");
    assert_eq!(
        b.js("return window.__stillHere === true;", json!([])),
        json!(true)
    );

    add_first_product_to_cart(&b);
    checkout(&b, "pm_card_flaky");
    b.wait_text("#order-status", "CONFIRMED");
    b.wait_text("#timeline", "Payment attempts: 3");

    let storage = b.js(
        "return [localStorage.length, sessionStorage.length, document.cookie];",
        json!([]),
    );
    assert_eq!(
        storage,
        json!([0, 0, ""]),
        "tokens stay out of page storage"
    );
    b.open("#/orders");
    b.wait_text("main", "CANCELLED");
    b.open("#/notifications");
    b.find("main ul li");

    // On a phone: the same checker passes and nothing is wider than the screen.
    b.cmd("POST", "/window/rect", json!({"width": 390, "height": 844}));
    b.open("#/");
    b.find(".grid .card");
    b.accessible("the catalog on a phone");
    let wider = b.js(
        "return document.documentElement.scrollWidth > window.innerWidth + 1;",
        json!([]),
    );
    assert_eq!(wider, json!(false), "the catalog is wider than a phone");
    b.screenshot("storefront-phone");
    drop(b);
    app.stop();
}

/// An admin watches an order's events arrive in the console's stream, replays a parked event
/// from the dead letters, purges the edge cache and changes stock; a customer cannot open the
/// console.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_runs_the_shop_from_the_console_and_a_customer_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = with_admin(dir.path(), &[]);
    let gw = app.addrs["gateway"];
    let b = Browser::start(gw);

    // A customer first: no console.
    let (_, customer_token) = customer(gw, "cory@example.com");
    sign_in(&b, "cory@example.com", PASSWORD);
    b.wait_shown("#nav-orders");
    // Signed in, the page goes to the catalog: wait for it before going elsewhere.
    b.find(".grid .card");
    b.open("#/console");
    b.wait_text("main", "for administrators");
    let refused = http(
        gw,
        "GET",
        "/v1/admin/system",
        &[("authorization", &customer_token)],
        b"",
    );
    assert_eq!(refused.status, 403, "{}", refused.body);
    b.press("Sign out");
    b.wait_shown("#nav-signin");
    // Signed out, the page goes to the catalog: wait for it before going elsewhere.
    b.find(".grid .card");

    sign_in(&b, "root@example.com", "root password 123");
    b.find("svg.diagram");
    b.wait_text(".diagram [data-node=orders] .metric", "ready");

    // An order placed elsewhere moves through the stream the console shows.
    let r = buy_with(
        gw,
        &[("authorization", &customer_token)],
        0,
        "console-order-1",
        "pm_card_ok",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    b.find("svg.diagram circle.pulse");
    b.find("#event-rows tr[data-type='order.placed']");
    b.find("#event-rows tr[data-type='order.confirmed']");
    b.find("#event-rows tr[data-type='shipment.scheduled']");
    b.wait_text("#consumer-lag", "payments");
    b.accessible("the console");
    b.screenshot("console");

    // A poison event, parked by the orders topic's consumers, replayed from the console.
    let url = format!("sqlite://{}", dir.path().join("events.db").display());
    let log = shopverse_events::embedded::EmbeddedLog::open(&url, 4)
        .await
        .unwrap();
    use shopverse_events::EventBus;
    log.publish(&[shopverse_events::OutRecord {
        topic: shopverse_events::envelope::TOPIC_ORDERS.into(),
        key: "poison".into(),
        headers: vec![("event-id".into(), "poison-1".into())],
        payload: vec![0xde, 0xad, 0xbe, 0xef],
    }])
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        b.press("Dead letters");
        std::thread::sleep(Duration::from_millis(300));
        let parked = b.js(
            "return [...document.querySelectorAll('#console-panel td')].some(t => t.innerText === 'parked');",
            json!([]),
        );
        if parked == json!(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nothing parked: {}",
            b.text("#console-panel")
        );
    }
    b.press("Replay all waiting");
    b.wait_text("#toast", "Replayed");
    b.wait_text("#console-panel", "replayed");

    // The edge cache: a cached list, purged from the console.
    let _ = http(gw, "GET", "/v1/categories", &[], b"");
    b.press("Edge cache");
    b.press("Purge everything");
    b.wait_text("#toast", "Purged");

    // Stock: set in the console, read back through the API.
    b.press("Catalog and stock");
    b.find("input[data-stock]");
    let product = b
        .js(
            "return document.querySelector('input[data-stock]').dataset.stock;",
            json!([]),
        )
        .as_str()
        .unwrap()
        .to_owned();
    b.type_in("input[data-stock]", "42");
    b.press("Save");
    b.wait_text("#toast", "stock set to 42");
    let stock = http(
        gw,
        "GET",
        &format!("/v1/products/{product}/stock"),
        &[],
        b"",
    )
    .json();
    assert_eq!(
        stock["available"].to_string().trim_matches('"'),
        "42",
        "{stock}"
    );
    // The customer's order, shipped from the console.
    b.press("Orders");
    b.press("Ship");
    b.wait_text("#toast", "Shipped");
    let order = r.json()["id"].as_str().unwrap().to_owned();
    let shipment = http(
        gw,
        "GET",
        &format!("/v1/orders/{order}/shipment"),
        &[("authorization", &customer_token)],
        b"",
    )
    .json();
    assert_eq!(shipment["status"], "SHIPMENT_STATUS_SHIPPED", "{shipment}");

    // A new product, created in the console, is in the catalog with its price and stock.
    b.press("Catalog and stock");
    b.type_in("#new-product input[name=sku]", "SV-NEW-1");
    b.type_in("#new-product input[name=name]", "Console Lamp");
    b.type_in("#new-product input[name=price]", "12.50");
    b.type_in("#new-product input[name=initialStock]", "7");
    b.press("Create product");
    b.wait_text("#toast", "Created Console Lamp");
    let made = http(gw, "GET", "/v1/skus/SV-NEW-1", &[], b"").json();
    assert_eq!(made["name"], "Console Lamp", "{made}");
    assert_eq!(made["price"]["amountMinor"], "1250", "{made}");
    drop(b);
    app.stop();
}
