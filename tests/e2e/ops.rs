//! Operations: the systemd units pass `systemd-analyze`, the install script stages and removes
//! cleanly and idempotently, and the process speaks the systemd notify protocol.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::gateway::*;
use crate::common::*;

const UNITS: &[&str] = &[
    "shopverse.service",
    "shopverse-gateway.service",
    "shopverse@.service",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn units_verify_and_score_2_or_less() {
    let dir = tempfile::tempdir().unwrap();
    for unit in UNITS {
        // `verify` checks that ExecStart exists: point it at the binary under test.
        let text = std::fs::read_to_string(repo().join("systemd").join(unit))
            .unwrap()
            .replace("/usr/local/bin/shopverse", BIN);
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .expect("systemd-analyze (scripts/test installs it)");
        let said = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{unit}: {said}"
        );
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("{unit}: {text}"));
        let score: f64 = line
            .split(':')
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(score <= 2.0, "{unit}: exposure {score}");
    }
}

fn install(root: &Path, extra: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(repo().join("systemd/install.sh"))
        .args(["--root"])
        .arg(root)
        .args(["--binary", BIN])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().filter_map(Result::ok) {
            if e.path().is_dir() {
                dirs.push(e.path());
            } else {
                out.push(e.path().strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn install_is_idempotent_keeps_edits_and_uninstalls() {
    let root = tempfile::tempdir().unwrap();
    install(root.path(), &[]);
    let first = files(root.path());
    for must in [
        "usr/local/bin/shopverse",
        "etc/systemd/system/shopverse.service",
        "etc/systemd/system/shopverse@.service",
        "etc/shopverse/shopverse.toml",
        "etc/shopverse/distributed/orders.toml",
    ] {
        assert!(
            first.contains(&must.to_owned()),
            "{must} missing: {first:?}"
        );
    }
    install(root.path(), &[]);
    assert_eq!(files(root.path()), first, "a second run changes nothing");

    // An operator's edit survives a reinstall; the shipped file lands next to it.
    let conf = root.path().join("etc/shopverse/shopverse.toml");
    std::fs::write(&conf, "[data]\ndir = \"/srv/shop\"\n").unwrap();
    let said = install(root.path(), &[]);
    assert!(said.contains("kept your"), "{said}");
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        "[data]\ndir = \"/srv/shop\"\n"
    );
    assert!(
        root.path()
            .join("etc/shopverse/shopverse.toml.dist")
            .exists()
    );

    install(root.path(), &["--uninstall"]);
    let left = files(root.path());
    assert!(
        !left
            .iter()
            .any(|f| f.starts_with("usr/local/bin") || f.starts_with("etc/systemd")),
        "{left:?}"
    );
    assert!(
        left.contains(&"etc/shopverse/shopverse.toml".to_owned()),
        "configuration stays"
    );
    install(root.path(), &["--uninstall", "--purge"]);
    assert!(files(root.path()).is_empty());
}

#[test]
fn speaks_the_systemd_notify_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let sock_str = sock_path.display().to_string();
    let app = Appliance::binary(
        dir.path(),
        &[],
        &[("NOTIFY_SOCKET", &sock_str), ("WATCHDOG_USEC", "200000")],
    );
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    let t0 = Instant::now();
    while !(got.contains("READY=1") && got.contains("WATCHDOG=1")) {
        assert!(t0.elapsed() < Duration::from_secs(60), "{got}");
        let n = sock.recv(&mut buf).unwrap();
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
        got.push('\n');
    }
    assert!(got.contains("STATUS=gateway="), "{got}");
    app.stop();
    let t0 = Instant::now();
    while !got.contains("STOPPING=1") {
        assert!(t0.elapsed() < Duration::from_secs(30), "{got}");
        let n = sock.recv(&mut buf).unwrap();
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

/// Registers accounts without pause until stopped; `confirmed` holds the emails whose
/// registration was answered.
struct Writer {
    confirmed: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(users: SocketAddr) -> Writer {
        use shopverse_proto::users::v1::RegisterRequest;
        use shopverse_proto::users::v1::users_service_client::UsersServiceClient;
        let (confirmed, stop) = (
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(AtomicBool::new(false)),
        );
        let (c, s) = (confirmed.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut users = UsersServiceClient::new(channel(users).await);
            for i in 0.. {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let email = format!("load-{i}@example.com");
                let password = "a long password".to_owned();
                let req = RegisterRequest {
                    email: email.clone(),
                    password,
                    display_name: String::new(),
                };
                if users.register(req).await.is_ok() {
                    c.lock().unwrap().push(email);
                }
            }
        });
        Writer {
            confirmed,
            stop,
            task,
        }
    }

    fn confirmed(&self) -> Vec<String> {
        self.confirmed.lock().unwrap().clone()
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
    }
}

/// Every account's email, as an administrator lists them.
async fn every_email(users: SocketAddr) -> Vec<String> {
    use shopverse_proto::users::v1::ListUsersRequest;
    use shopverse_proto::users::v1::users_service_client::UsersServiceClient;
    let mut users = UsersServiceClient::new(channel(users).await);
    let (mut found, mut page_token) = (Vec::new(), String::new());
    loop {
        let list = ListUsersRequest {
            page_size: 200,
            page_token,
            email: String::new(),
        };
        let req = shopverse_kit::testing::as_user(list, "ops", &[shopverse_kit::Role::Admin]);
        let page = users.list_users(req).await.unwrap().into_inner();
        found.extend(page.users.into_iter().map(|u| u.email));
        if page.next_page_token.is_empty() {
            return found;
        }
        page_token = page.next_page_token;
    }
}

/// A copy of `backup` with its users database overwritten: refused whole, by checksum.
fn a_damaged_backup_is_refused(backup: &Path, scratch: &Path) {
    let damaged = scratch.join("damaged");
    std::fs::create_dir_all(&damaged).unwrap();
    for e in std::fs::read_dir(backup).unwrap().filter_map(Result::ok) {
        if e.path().is_file() {
            std::fs::copy(e.path(), damaged.join(e.file_name())).unwrap();
        }
    }
    std::fs::write(damaged.join("users.db"), b"garbage").unwrap();
    let target = tempfile::tempdir().unwrap();
    let from = ["restore", "--from", damaged.to_str().unwrap()];
    let (ok, _, err) = cli(target.path(), &from, &[]);
    assert!(!ok && err.contains("checksum mismatch"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_backup_under_writes_then_restore() {
    let live = tempfile::tempdir().unwrap();
    let backup_dir = live.path().join("backup");
    let backup = backup_dir.to_str().unwrap();
    let app = Appliance::start(live.path(), &["--demo"]);

    // A writer registers accounts without pause; we note which were confirmed before the backup.
    let writer = Writer::start(app.users);
    until("15 accounts", Duration::from_secs(30), || {
        writer.confirmed().len() >= 15
    });
    let before = writer.confirmed();
    let (ok, out, err) = cli(live.path(), &["backup", "--to", backup], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("backup complete"), "{out}");
    let during = writer.confirmed().len();
    writer.stop().await;
    assert!(during > before.len(), "writes went on during the backup");

    // Restoring under a running appliance is refused.
    let (ok, _, err) = cli(live.path(), &["restore", "--from", backup], &[]);
    assert!(!ok);
    assert!(err.contains("stop ShopVerse before restoring"), "{err}");
    app.stop();
    a_damaged_backup_is_refused(&backup_dir, live.path());

    // Restore into a new data dir and start there: every account confirmed before the backup
    // began is present, and the signing keys came along.
    let target = tempfile::tempdir().unwrap();
    let (ok, out, err) = cli(target.path(), &["restore", "--from", backup], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("restored"), "{out}");
    // A second appliance in this process: the binary (Pingora starts once per process).
    let app = Appliance::binary(target.path(), &[], &[]);
    let found = every_email(app.users).await;
    for email in &before {
        assert!(found.contains(email), "{email} lost by the backup");
    }
    let keys = std::fs::read_dir(backup_dir.join("keys")).unwrap().count();
    assert!(keys >= 2, "the key file and the manifest");
    app.stop();
}

#[test]
fn compose_file_is_accepted_by_docker_compose() {
    // The secrets the file names, as a deployer would create them (from the examples).
    let dir = tempfile::tempdir().unwrap();
    let deploy = dir.path().join("deploy");
    std::fs::create_dir_all(deploy.join("secrets")).unwrap();
    std::fs::copy(
        repo().join("deploy/compose.yaml"),
        deploy.join("compose.yaml"),
    )
    .unwrap();
    std::fs::copy(
        repo().join("deploy/postgres-init.sql"),
        deploy.join("postgres-init.sql"),
    )
    .unwrap();
    for e in std::fs::read_dir(repo().join("deploy/secrets"))
        .unwrap()
        .filter_map(Result::ok)
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(base) = name.strip_suffix(".example") {
            std::fs::copy(e.path(), deploy.join("secrets").join(base)).unwrap();
        }
    }
    let out = Command::new("docker-compose")
        .args(["-f"])
        .arg(deploy.join("compose.yaml"))
        .args(["config", "-q"])
        .output()
        .expect("docker-compose (scripts/test installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `kubernetes-validate --strict` accepts every manifest of `files`.
fn validate_manifests(files: &[PathBuf]) {
    let validator = Path::new(&python()).with_file_name("kubernetes-validate");
    let out = Command::new(&validator)
        .args(["--strict", "--quiet"])
        .args(files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{files:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kubernetes_manifests_validate_and_their_configs_load() {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    files.sort();
    validate_manifests(&files);
    // The configuration files inside the ConfigMap pass check-config.
    let tmp = tempfile::tempdir().unwrap();
    let script = "import sys, yaml\nfor d in yaml.safe_load_all(open(sys.argv[1])):\n  if d and d.get('kind') == 'ConfigMap':\n    for k, v in d['data'].items():\n      open(sys.argv[2] + '/' + k, 'w').write(v)\n";
    succeeds(
        Command::new(python())
            .args(["-c", script])
            .arg(dir.join("01-config.yaml"))
            .arg(tmp.path()),
    );
    let configs: Vec<PathBuf> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    assert_eq!(configs.len(), 2);
    let out = Command::new(BIN)
        .arg("check-config")
        .args(&configs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_policies() {
    let dir = tempfile::tempdir().unwrap();
    let policy = |burst: u32| {
        format!(
            "[[gateway.rate_limits]]\nname = \"login\"\npaths = [\"/v1/auth/\"]\nrequests = {burst}\nper_secs = 3600\nburst = {burst}\nby = \"ip\"\n"
        )
    };
    let gw = LoneGateway::start_with(dir.path(), "hup", &[], &policy(1000));
    let login = || {
        http(
            gw.addr,
            "POST",
            "/v1/auth/login",
            &[],
            br#"{"email":"a@b.co","password":"whatever pw"}"#,
        )
        .status
    };
    for _ in 0..5 {
        assert_eq!(login(), 503, "admitted (users is not running)");
    }
    // Tighten the policy in the file and send SIGHUP: no restart, the next requests see it.
    let cfg = dir.path().join("hup.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&policy(1000), &policy(1));
    std::fs::write(&cfg, text).unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status();
    let t0 = std::time::Instant::now();
    loop {
        if login() == 429 {
            break;
        }
        assert!(
            t0.elapsed().as_secs() < 10,
            "the reloaded policy never applied"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A broken file is refused and the running policy stays.
    std::fs::write(&cfg, "[gateway\n").unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status();
    // A positive barrier: the gateway counts the refused reload; only then is the answer final.
    let t0 = std::time::Instant::now();
    while !http(gw.admin, "GET", "/metrics", &[], b"")
        .body
        .contains("shopverse_config_reloads_total{outcome=\"refused\"} 1")
    {
        assert!(
            t0.elapsed().as_secs() < 10,
            "the broken file was never read"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(login(), 429);
    gw.stop();
}

/// A client asking `addr` for the categories on a new connection every 10 ms until stopped;
/// joined, it gives how many were answered by the gateway (503: its services are not running,
/// 429: its rate limit) and the answers of the others (no answer at all counts as refused).
fn steady_client(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut answered, mut refused) = (0, Vec::new());
        while !stop.load(Ordering::SeqCst) {
            let r = http(addr, "GET", "/v1/categories", &[], b"");
            if r.status == 503 || r.status == 429 {
                answered += 1
            } else {
                refused.push(format!("{} {}", r.status, r.body));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (answered, refused)
    })
}

/// Sends a request on `conn` after `after` and reads the answer to the end.
fn late_request(mut conn: std::net::TcpStream, after: Duration) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        std::thread::sleep(after);
        let _ = conn.write_all(b"GET /v1/categories HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut resp = String::new();
        let _ = conn.read_to_string(&mut resp);
        resp
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_upgrade_refuses_no_connection() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let listen = port.to_string();
    // No rate limit: the client's steady requests would otherwise use up the per-IP burst, and
    // the last check would get 429 rather than the new process's own 503.
    let env = [
        ("SHOPVERSE_GATEWAY__LISTEN", listen.as_str()),
        ("SHOPVERSE_GATEWAY__RATE_LIMITS", "[]"),
    ];
    let mut old = LoneGateway::start(dir.path(), "old", &env);
    assert_eq!(old.addr, port);
    let stop = Arc::new(AtomicBool::new(false));
    let client = steady_client(old.addr, stop.clone());
    // A client that connected to the old process and has not sent its request yet when that
    // process stops accepting is still answered. Pingora stops accepting 5 s after SIGQUIT and
    // ends the runtime a second (the configured grace) later; the request comes in between.
    let quiet = std::net::TcpStream::connect(old.addr).unwrap();
    quiet
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The new binary takes the sockets over; the old one hands them over on SIGQUIT and leaves.
    let new = LoneGateway::start_with_args(dir.path(), "old", &env, &["--upgrade"]);
    let pid = old.child.id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-QUIT", &pid])
        .status();
    let late = late_request(quiet, Duration::from_millis(5_500));
    let status = old.child.wait().unwrap();
    let late = late.join().unwrap();
    assert!(late.starts_with("HTTP/1.1 503"), "{late:?}");
    assert!(
        late.to_ascii_lowercase().contains("connection: close"),
        "{late:?}"
    );
    assert!(status.success(), "the old gateway exits cleanly: {status}");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let (answered, refused) = client.join().unwrap();
    assert!(answered > 10, "{answered}");
    assert!(
        refused.is_empty(),
        "refused during the upgrade: {refused:?}"
    );
    let served = http(new.addr, "GET", "/v1/categories", &[], b"").status;
    assert_eq!(served, 503, "the new process serves");
    new.stop();
}

/// A gateway started with `--upgrade` while the old one still holds the edge cache serves
/// uncached at first, opens the cache once the old process has left, and answers hits from it
/// (the old process's entries included) without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_gateway_serves_cache_hits_once_the_old_one_leaves() {
    let app_dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(app_dir.path(), &["--demo"]);
    let products = format!("[\"http://{}\"]", app.addrs["products"]);
    let dir = tempfile::tempdir().unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let env = [
        ("SHOPVERSE_GATEWAY__LISTEN", listen.as_str()),
        ("SHOPVERSE_GATEWAY__RATE_LIMITS", "[]"),
        ("SHOPVERSE_GATEWAY__UPSTREAMS__PRODUCTS", products.as_str()),
    ];
    let mut old = LoneGateway::start(dir.path(), "gw", &env);
    let cached = |gw| {
        let r = http(gw, "GET", "/v1/categories", &[], b"");
        assert_eq!(r.status, 200, "{}", r.body);
        r.header("x-cache").map(str::to_owned)
    };
    cached(old.addr);
    assert_eq!(cached(old.addr).as_deref(), Some("HIT"));

    let new = LoneGateway::start_with_args(dir.path(), "gw", &env, &["--upgrade"]);
    let _ = std::process::Command::new("kill")
        .args(["-QUIT", &old.child.id().to_string()])
        .status();
    assert!(old.child.wait().unwrap().success());
    until(
        "the new gateway answers from the edge cache",
        Duration::from_secs(20),
        || cached(new.addr).as_deref() == Some("HIT"),
    );
    assert!(
        metric(new.admin, "shopverse_edge_cache_hits_total") >= 1,
        "the hit was counted by the new process"
    );
    new.stop();
    app.stop();
}

/// `Key=value` lines of a unit file, `%i` filled in with `instance`.
fn unit_settings(unit: &str, instance: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(repo().join("systemd").join(unit))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%i", instance)))
        .collect()
}

/// The appliance unit, the gateway unit and two instances of the service template each keep
/// state in a directory of their own (systemd hands a unit's state directory to that unit's
/// dynamic user at every start, so a shared or nested one would be taken from the other), and
/// each process's `--data-dir` is its unit's state directory. Started side by side from a
/// staged install, as their `ExecStart` lines say, each runs and writes only there. State an
/// earlier version kept inside the appliance's directory is moved by the install script.
#[test]
fn units_keep_their_state_apart_and_run_side_by_side() {
    let layout = [
        ("shopverse.service", ""),
        ("shopverse-gateway.service", ""),
        ("shopverse@.service", "orders"),
        ("shopverse@.service", "users"),
    ];
    let mut dirs = Vec::new();
    let mut starts = Vec::new();
    for (unit, instance) in layout {
        let settings = unit_settings(unit, instance);
        let get = |k: &str| {
            settings
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{unit}: no {k}"))
        };
        let state = get("StateDirectory");
        let exec = get("ExecStart");
        let data_dir = exec
            .split_whitespace()
            .skip_while(|w| *w != "--data-dir")
            .nth(1)
            .unwrap_or_else(|| panic!("{unit}: no --data-dir in {exec}"))
            .to_owned();
        assert_eq!(
            data_dir,
            format!("/var/lib/{state}"),
            "{unit} {instance}: the data directory is the unit's state directory"
        );
        dirs.push(state);
        starts.push(exec);
    }
    for (i, a) in dirs.iter().enumerate() {
        for b in &dirs[i + 1..] {
            assert!(
                a != b && !b.starts_with(&format!("{a}/")) && !a.starts_with(&format!("{b}/")),
                "state directories {a} and {b} overlap"
            );
        }
    }

    // A staged install with the old layout's state: moved, once.
    let root = tempfile::tempdir().unwrap();
    let old = root.path().join("var/lib/private/shopverse/orders/keep");
    std::fs::create_dir_all(old.parent().unwrap()).unwrap();
    std::fs::write(&old, "mine").unwrap();
    let said = install(root.path(), &[]);
    assert!(said.contains("moved"), "{said}");
    assert_eq!(
        std::fs::read_to_string(root.path().join("var/lib/private/shopverse-orders/keep")).unwrap(),
        "mine"
    );
    assert!(!install(root.path(), &[]).contains("moved"));

    // The appliance, the gateway and the orders service from their ExecStart lines, paths
    // under the staged root, listening on free ports; the distributed service on SQLite and
    // the embedded log (no cluster here).
    let staged = |word: &str| -> std::ffi::OsString {
        if word.starts_with('/') && word != "/usr/local/bin/shopverse" {
            root.path().join(&word[1..]).into_os_string()
        } else {
            word.into()
        }
    };
    let args_of = |exec: &str| -> Vec<std::ffi::OsString> {
        exec.split_whitespace().skip(1).map(staged).collect()
    };
    let mut up = args_of(&starts[0]);
    up.extend(["--any-ports-on", "127.0.0.1"].map(Into::into));
    let appliance = Appliance::spawn(&up, &[]);
    let users = format!("[\"http://{}\"]", appliance.users);
    let mut gw = args_of(&starts[1]);
    gw.extend(["--listen", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"].map(Into::into));
    let gateway = Appliance::spawn(&gw, &[("SHOPVERSE_GATEWAY__UPSTREAMS__USERS", &users)]);
    let orders_db = format!(
        "sqlite://{}",
        root.path()
            .join("var/lib/shopverse-orders/orders.db")
            .display()
    );
    let orders = Appliance::spawn(
        &args_of(&starts[2]),
        &[
            ("SHOPVERSE_SERVICES__ORDERS__LISTEN", "127.0.0.1:0"),
            ("SHOPVERSE_SERVICES__ORDERS__DATABASE", &orders_db),
            ("SHOPVERSE_ADMIN__LISTEN", "127.0.0.1:0"),
            ("SHOPVERSE_EVENTS__BACKEND", "embedded"),
        ],
    );
    for (who, app) in [
        ("appliance", &appliance),
        ("gateway", &gateway),
        ("orders", &orders),
    ] {
        let (status, _) = http_get(app.admin, "/healthz");
        assert_eq!(status, 200, "{who} answers");
    }
    let (status, _) = http_get(gateway.addrs["gateway"], "/.well-known/jwks.json");
    assert_eq!(
        status, 200,
        "the gateway reaches the appliance's users service"
    );
    let lib = root.path().join("var/lib");
    let own = |dir: &str| files(&lib.join(dir));
    let (mine, gateways, orders_own) = (
        own("shopverse"),
        own("shopverse-gateway"),
        own("shopverse-orders"),
    );
    assert!(mine.iter().any(|f| f == "users.db"), "{mine:?}");
    assert!(
        gateways.iter().any(|f| f.starts_with("edge-cache/")),
        "{gateways:?}"
    );
    assert!(
        orders_own.iter().any(|f| f == "orders.db"),
        "{orders_own:?}"
    );
    assert!(
        !mine
            .iter()
            .any(|f| f.starts_with("gateway/") || f.starts_with("orders/")),
        "the appliance's directory holds only its own files: {mine:?}"
    );
    orders.stop();
    gateway.stop();
    appliance.stop();
}

/// `shopverse keys manifest` prints the signing keys as a Kubernetes Secret; two users
/// replicas whose keys folder is that Secret, mounted read-only, publish the same keys, write
/// nothing there, and keep them across a restart: a token one signs, the other verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_replicas_sign_with_the_keys_of_one_secret() {
    use base64::Engine as _;
    use shopverse_proto::users::v1::GetJwksRequest;
    use shopverse_proto::users::v1::users_service_client::UsersServiceClient;
    let src = tempfile::tempdir().unwrap();
    let out = succeeds(
        Command::new(BIN)
            .args(["keys", "manifest", "--data-dir"])
            .arg(src.path()),
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    let manifest = src.path().join("secret.yaml");
    std::fs::write(&manifest, &yaml).unwrap();
    validate_manifests(&[manifest]);
    // The Secret's files, as Kubernetes would mount them in each pod.
    let secret: Vec<(String, Vec<u8>)> = yaml
        .split("\ndata:\n")
        .nth(1)
        .unwrap()
        .lines()
        .map(|l| {
            let (name, b64) = l.trim().split_once(": ").unwrap();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap();
            (name.to_owned(), bytes)
        })
        .collect();
    assert!(secret.iter().any(|(n, _)| n == "keys.json"), "{yaml}");
    assert!(secret.iter().any(|(n, _)| n.ends_with(".key")), "{yaml}");
    let replica = |name: &str| {
        let dir = src.path().join(name);
        let keys = dir.join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        for (file, bytes) in &secret {
            std::fs::write(keys.join(file), bytes).unwrap();
        }
        dir
    };
    let start = |dir: &Path| {
        let args: Vec<std::ffi::OsString> = vec![
            "serve".into(),
            "users".into(),
            "--data-dir".into(),
            dir.into(),
        ];
        Appliance::spawn(
            &args,
            &[
                ("SHOPVERSE_SERVICES__USERS__LISTEN", "127.0.0.1:0"),
                ("SHOPVERSE_ADMIN__LISTEN", "127.0.0.1:0"),
            ],
        )
    };
    let kids = |addr: SocketAddr| async move {
        let mut users = UsersServiceClient::new(channel(addr).await);
        let mut kids: Vec<String> = users
            .get_jwks(GetJwksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .keys
            .into_iter()
            .map(|k| k.kid)
            .collect();
        kids.sort();
        kids
    };
    let (a, b) = (replica("a"), replica("b"));
    let (one, two) = (start(&a), start(&b));
    let published = kids(one.addrs["users"]).await;
    assert!(!published.is_empty());
    assert_eq!(
        published,
        kids(two.addrs["users"]).await,
        "both publish the same keys"
    );
    for (file, _) in &secret {
        assert!(
            published
                .iter()
                .any(|k| file == "keys.json" || file == &format!("{k}.key"))
        );
    }
    one.stop();
    let again = start(&a);
    assert_eq!(
        kids(again.addrs["users"]).await,
        published,
        "a restart keeps them"
    );
    for dir in [&a, &b] {
        assert_eq!(
            files(&dir.join("keys")).len(),
            secret.len(),
            "nothing was written into the mounted keys"
        );
    }
    again.stop();
    two.stop();
}
