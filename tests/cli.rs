//! The command line: check-config, module-env, and run with a clean SIGTERM shutdown.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

const BIN: &str = env!("CARGO_BIN_EXE_edgehub");

fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("edgehub-cli-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("edgehub.json");
    std::fs::write(&p, body).expect("write config");
    p
}

fn good_config(dir: &Path) -> String {
    format!(
        r#"{{"deviceId": "edge1", "iothubHostname": "h.azure-devices.net", "gatewayHostname": "localhost",
            "listen": {{"amqps": "127.0.0.1:0", "mqtts": "127.0.0.1:0", "https": null, "metrics": "127.0.0.1:0"}},
            "dataDir": "{}", "modules": {{"A": {{}}}},
            "$edgeHub": {{"schemaVersion": "1.1", "routes": {{"up": "FROM /messages/* INTO $upstream"}},
                          "storeAndForwardConfiguration": {{"timeToLiveSecs": 60}}}}}}"#,
        dir.join("data").display()
    )
}

#[test]
fn the_default_config_is_valid() {
    let out = Command::new(BIN)
        .args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/edgehub.json"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_reports_every_error_with_its_path() {
    let dir = temp_dir();
    let cfg = write_config(
        &dir,
        r#"{"deviceId": "a b", "listen": {"amqps": "x"}, "dataDir": "d", "extra": 1,
            "$edgeHub": {"schemaVersion": "1.1", "routes": {"bad": "FROM x INTO y"}, "storeAndForwardConfiguration": {}}}"#,
    );
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for path in [
        "$.deviceId",
        "$.listen.amqps",
        "$.extra",
        "$.iothubHostname",
        "$[\"$edgeHub\"].routes.bad",
    ] {
        assert!(err.contains(path), "{path} missing from:\n{err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn module_env_prints_exactly_two_lines_and_creates_the_ca() {
    let dir = temp_dir();
    let cfg = write_config(&dir, &good_config(&dir));
    let out = Command::new(BIN)
        .args(["module-env", "--module", "A", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let cs = lines[0].strip_prefix("EdgeHubConnectionString=").unwrap();
    let parsed = edgehub::model::identity::ConnectionString::parse(cs).unwrap();
    assert_eq!(parsed.module_id.as_deref(), Some("A"));
    assert_eq!(parsed.gateway_host_name.as_deref(), Some("localhost"));
    let ca = Path::new(
        lines[1]
            .strip_prefix("EdgeModuleCACertificateFile=")
            .unwrap(),
    );
    assert!(ca.is_absolute() && ca.exists());
    // The same key every time: the certificates and device key are reused.
    let again = Command::new(BIN)
        .args(["module-env", "--module", "A", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(again.stdout).unwrap(), text);
    let unknown = Command::new(BIN)
        .args(["module-env", "--module", "Z", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    let _ = std::fs::remove_dir_all(dir);
}

/// What `module-env` says on stderr about AMQP over WebSockets, certificates and the upstream
/// proxy follows the config being run (and the `https_proxy` the hub would take); stdout stays
/// the two values scripts read.
#[test]
fn module_env_tells_how_to_connect_over_websockets_and_with_certificates() {
    let dir = temp_dir();
    let thumb = "0123456789ABCDEF0123456789ABCDEF01234567";
    let cfg = write_config(
        &dir,
        &format!(
            r#"{{"deviceId": "edge1", "iothubHostname": "h.azure-devices.net", "gatewayHostname": "gw.example",
                "listen": {{"amqps": "127.0.0.1:0", "mqtts": null, "https": "127.0.0.1:8443", "metrics": null}},
                "dataDir": "{}", "modules": {{"A": {{}}}},
                "devices": {{"thumbDevice": {{"x509": {{"primaryThumbprint": "{thumb}"}}}},
                             "caDevice": {{"x509": {{"ca": true}}}}, "keyDevice": {{}}}},
                "tls": {{"clientCaCerts": "/etc/edgehub/device-cas.pem"}},
                "upstream": {{"hostname": "parent.example", "protocol": "amqpws"}},
                "$edgeHub": {{"schemaVersion": "1.1", "routes": {{}}, "storeAndForwardConfiguration": {{}}}}}}"#,
            dir.join("data").display()
        ),
    );
    let out = Command::new(BIN)
        .args(["module-env", "--module", "A", "--config"])
        .arg(&cfg)
        .env("https_proxy", "http://user:secret@proxy.example:3128")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    let ca = stdout
        .lines()
        .find_map(|l| l.strip_prefix("EdgeModuleCACertificateFile="))
        .expect("the CA line");
    assert!(
        stderr.lines().all(|l| l.starts_with("# ")),
        "guide lines start with '# ':\n{stderr}"
    );
    for want in [
        // The port the SDKs dial, and the forwarding an address on another port needs.
        "wss://gw.example:443/$iothub/websocket (listen.https 127.0.0.1:8443; the SDKs dial port 443, so forward 443 there)",
        "AmqpWs and MqttWs (AMQP or MQTT over WebSockets",
        "Mqtt: off",
        "by thumbprint (a self-signed certificate whose SHA-1 or SHA-256 is in devices.<id>.x509): thumbDevice",
        "issued by a CA in /etc/edgehub/device-cas.pem, subject CN = the device id): caDevice",
        "HostName=gw.example;DeviceId=<id>;x509=true",
        // The proxy comes from https_proxy, its password stays out.
        "wss://parent.example:443/$iothub/websocket (upstream.protocol \"amqpws\") through the HTTP proxy http://proxy.example:3128 (with basic authentication)",
    ] {
        assert!(stderr.contains(want), "{want:?} missing from:\n{stderr}");
    }
    assert!(stderr.contains(&format!("trusts {ca}")), "{stderr}");
    assert!(
        !stderr.contains("keyDevice") && !stderr.contains("secret"),
        "{stderr}"
    );

    // Without the HTTPS listener, devices with certificates or an upstream, it says so.
    let plain = write_config(&dir, &good_config(&dir));
    let out = Command::new(BIN)
        .args(["module-env", "--module", "A", "--config"])
        .arg(&plain)
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("AmqpWs and MqttWs: off (listen.https is null)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("no device has devices.<id>.x509"),
        "{stderr}"
    );
    assert!(!stderr.contains("Upstream"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn run_logs_ready_and_exits_cleanly_on_sigterm() {
    let dir = temp_dir();
    let cfg = write_config(&dir, &good_config(&dir));
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let ready = loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) if l.contains("edgehub ready") => break l,
            Ok(_) => continue,
            Err(e) => panic!("no ready line: {e}"),
        }
    };
    assert!(ready.contains("amqps="), "{ready}");
    // The container health check passes against the running hub.
    let metrics = ready
        .split("metrics=Some(")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .expect("metrics address in the ready line");
    let health = Command::new(BIN)
        .args(["health", "--metrics", metrics])
        .output()
        .unwrap();
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the hub did not exit after SIGTERM"
        );
        // Waiting on a child process has no async signal here; poll with a bound.
        std::thread::park_timeout(Duration::from_millis(20));
    };
    assert!(code.success(), "exit status {code:?}");
    // Nobody answers any more: unhealthy.
    let health = Command::new(BIN)
        .args(["health", "--metrics", metrics])
        .output()
        .unwrap();
    assert!(!health.status.success());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_reports_one_line_per_result_with_fixes() {
    let dir = temp_dir();
    let cfg = write_config(&dir, &good_config(&dir));
    // Certificates do not exist yet: warnings, not errors.
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines()
            .all(|l| l.starts_with("OK") || l.starts_with("WARNING")),
        "{text}"
    );
    assert!(text.contains("does not exist yet — fix:"), "{text}");
    // Create them, then make gatewayHostname disagree with the server certificate.
    let env = Command::new(BIN)
        .args(["module-env", "--module", "A", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(env.status.success());
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .env("EDGEHUB_GATEWAY_HOSTNAME", "elsewhere.example")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("ERROR"))
        .expect("an error line");
    assert!(
        line.contains("not for gatewayHostname \"elsewhere.example\"") && line.contains("fix:"),
        "{line}"
    );
    // A broken config is an error with the JSON path.
    let bad = write_config(&dir, r#"{"deviceId": 1}"#);
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("$.deviceId"));
    let _ = std::fs::remove_dir_all(dir);
}

/// A hub started with `edgehub run` (through `sh -c` when `shell` is given, with the command
/// after it), its log lines as they come, and its ready line.
struct RunningHub {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
    metrics: String,
}

impl RunningHub {
    fn start(cfg: &Path, shell_prefix: Option<&str>) -> Self {
        let mut cmd = match shell_prefix {
            Some(prefix) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("{prefix} exec \"$0\" run --config \"$1\""))
                    .arg(BIN)
                    .arg(cfg);
                c
            }
            None => {
                let mut c = Command::new(BIN);
                c.args(["run", "--config"]).arg(cfg);
                c
            }
        };
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("edgehub starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut hub = Self {
            child,
            lines,
            log: Vec::new(),
            metrics: String::new(),
        };
        let ready = hub.wait_for(|l| l.contains("edgehub ready"));
        hub.metrics = ready
            .split("metrics=Some(")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .expect("metrics address in the ready line")
            .to_owned();
        hub
    }

    /// The first log line (from now on, or already seen) for which `want` holds.
    fn wait_for(&mut self, want: impl Fn(&str) -> bool) -> String {
        if let Some(l) = self.log.iter().find(|l| want(l)) {
            return l.clone();
        }
        self.wait_for_next(want)
    }

    /// The first log line from now on for which `want` holds.
    fn wait_for_next(&mut self, want: impl Fn(&str) -> bool) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(20)) {
                Ok(l) => {
                    self.log.push(l.clone());
                    if want(&l) {
                        return l;
                    }
                }
                Err(e) => panic!(
                    "no such log line ({e}); log so far:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    fn scrape(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.metrics).expect("metrics listener");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("request sent");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("the scrape in time");
        out
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().expect("child status").is_none() {
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the hub did not exit after SIGTERM");
            }
            // Waiting on a child process has no async signal here; poll with a bound.
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }
}

impl Drop for RunningHub {
    /// A test that fails before `stop` leaves no hub running (it would hold the test's output
    /// open).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The value of the series `name` (any labels) in a scrape.
fn series(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn unlabelled_gauges_are_scraped_at_zero_from_the_start() {
    let dir = temp_dir();
    let cfg = write_config(&dir, &good_config(&dir));
    let hub = RunningHub::start(&cfg, None);
    let scrape = hub.scrape();
    for name in [
        "edgehub_connected_clients",
        "edgehub_open_connections",
        "edgehub_invalid_routes",
        "edgehub_store_bytes",
        "edgehub_store_held_bytes",
    ] {
        assert!(
            series(&scrape, name).is_some(),
            "{name} missing from:\n{scrape}"
        );
    }
    assert_eq!(series(&scrape, "edgehub_connected_clients"), Some(0.0));
    assert_eq!(series(&scrape, "edgehub_open_connections"), Some(0.0));
    hub.stop();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_hub_raises_its_open_files_limit_and_logs_it() {
    let dir = temp_dir();
    let cfg = write_config(&dir, &good_config(&dir));
    let hard = Command::new("sh")
        .args(["-c", "ulimit -H -n"])
        .output()
        .unwrap();
    let hard = String::from_utf8(hard.stdout).unwrap().trim().to_owned();
    let mut hub = RunningHub::start(&cfg, Some("ulimit -S -n 256 &&"));
    let line = hub.wait_for(|l| l.contains("open files limit"));
    if hard != "unlimited" {
        assert!(
            line.contains(&format!("limit={hard}")),
            "{line} (hard {hard})"
        );
        assert!(line.contains("was=256"), "{line}");
    }
    hub.stop();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_changed_config_file_is_reloaded_without_a_signal() {
    let dir = temp_dir();
    let cfg = write_config(&dir, &good_config(&dir));
    let mut hub = RunningHub::start(&cfg, None);
    assert_eq!(series(&hub.scrape(), "edgehub_invalid_routes"), Some(0.0));
    // Add a route that does not parse: the reload counts it as invalid.
    let changed = good_config(&dir).replace(
        r#""up": "FROM /messages/* INTO $upstream""#,
        r#""up": "FROM /messages/* INTO $upstream", "broken": "FROM nowhere""#,
    );
    assert_ne!(changed, good_config(&dir));
    std::fs::write(&cfg, changed).unwrap();
    let line = hub.wait_for(|l| l.contains("config reloaded"));
    assert!(line.contains("file change"), "{line}");
    assert_eq!(series(&hub.scrape(), "edgehub_invalid_routes"), Some(1.0));
    // A file put in place with the same modification time (`cp -p`, or a second write within
    // the file system's time granularity) is a change too.
    let same_time = std::fs::metadata(&cfg).unwrap().modified().unwrap();
    let staged = dir.join("staged.json");
    std::fs::write(&staged, good_config(&dir)).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&staged)
        .unwrap()
        .set_modified(same_time)
        .unwrap();
    std::fs::rename(&staged, &cfg).unwrap();
    let line = hub.wait_for_next(|l| l.contains("config reloaded"));
    assert!(line.contains("file change"), "{line}");
    assert_eq!(series(&hub.scrape(), "edgehub_invalid_routes"), Some(0.0));
    // A broken file is refused and the running config stays.
    std::fs::write(&cfg, "{").unwrap();
    let line = hub.wait_for(|l| l.contains("config not reloaded"));
    assert!(line.contains("file change"), "{line}");
    assert_eq!(series(&hub.scrape(), "edgehub_invalid_routes"), Some(0.0));
    hub.stop();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_looks_at_the_mqtt_port_too() {
    let dir = temp_dir();
    let cfg = write_config(&dir, &good_config(&dir));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .env("EDGEHUB_LISTEN_MQTTS", &addr)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains(&format!("listen.mqtts {addr} is in use")),
        "{text}"
    );
    drop(taken);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_applies_the_environment_overrides_of_run() {
    let dir = temp_dir();
    let cfg = write_config(&dir, &good_config(&dir));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let other = dir.join("elsewhere");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .env("EDGEHUB_LISTEN_METRICS", &addr)
        .env("EDGEHUB_DATA_DIR", &other)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains(&format!("listen.metrics {addr} is in use")),
        "{text}"
    );
    assert!(
        text.contains(&format!("dataDir {} is writable", other.display())),
        "{text}"
    );
    drop(taken);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_config_refuses_duplicate_keys_with_their_paths() {
    let dir = temp_dir();
    let text = good_config(&dir)
        .replacen(
            r#""deviceId": "edge1","#,
            r#""deviceId": "edge1", "deviceId": "edge2","#,
            1,
        )
        .replacen(
            r#""amqps": "127.0.0.1:0","#,
            r#""amqps": "127.0.0.1:0", "amqps": "127.0.0.1:1","#,
            1,
        );
    let cfg = write_config(&dir, &text);
    for command in ["check-config", "run"] {
        let out = Command::new(BIN)
            .args([command, "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{command}");
        let err = String::from_utf8_lossy(&out.stderr);
        for path in ["$.deviceId: ", "$.listen.amqps: "] {
            assert!(
                err.lines()
                    .any(|l| l.contains(path) && l.contains("more than once")),
                "{command}: {path} missing from:\n{err}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A workload API on a Unix socket that answers every request it gets (at most `n`): the trust
/// bundle (one certificate) for `GET /trust-bundle`, a digest for `sign`.
fn fake_workload(socket: &Path, n: usize) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    let listener = std::os::unix::net::UnixListener::bind(socket).expect("bind the socket");
    let ca = rcgen::generate_simple_self_signed(vec!["test root".to_owned()])
        .expect("a certificate")
        .cert
        .pem();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(n) {
            let Ok(mut stream) = stream else { return };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).to_string();
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            let mut body = vec![0u8; length];
            let _ = stream.read_exact(&mut body);
            let answer = if head.contains("/trust-bundle") {
                serde_json::json!({ "certificate": ca }).to_string()
            } else {
                serde_json::json!({ "digest": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=" })
                    .to_string()
            };
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    })
}

#[test]
fn check_in_runtime_mode_asks_the_workload_api_and_the_device_scope() {
    let dir = temp_dir();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let scope_port = closed.local_addr().unwrap().port();
    drop(closed);
    let cfg = write_config(
        &dir,
        &format!(
            r#"{{"listen": {{"amqps": "127.0.0.1:0", "mqtts": "127.0.0.1:0", "https": null, "metrics": "127.0.0.1:0"}},
                "upstream": {{"httpsPort": {scope_port}}}}}"#
        ),
    );
    let socket = dir.join("workload.sock");
    let check = || {
        let out = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&cfg)
            .env(
                "IOTEDGE_WORKLOADURI",
                format!("unix://{}", socket.display()),
            )
            .env("IOTEDGE_DEVICEID", "edge1")
            .env("IOTEDGE_MODULEID", "$edgeHub")
            .env("IOTEDGE_MODULEGENERATIONID", "gen1")
            .env("IOTEDGE_IOTHUBHOSTNAME", "h.azure-devices.net")
            .env("IOTEDGE_AUTHSCHEME", "sasToken")
            .env("EdgeDeviceHostName", "localhost")
            .env("IOTEDGE_GATEWAYHOSTNAME", "127.0.0.1")
            .env("EDGEHUB_DATA_DIR", dir.join("data"))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    // No socket: the workload API is named, not certificate files of the config.
    let (passed, text) = check();
    assert!(!passed, "{text}");
    assert!(
        text.contains(&format!("ERROR   workload API unix://{}", socket.display())),
        "{text}"
    );
    assert!(
        !text.contains("certificate "),
        "no certificate files in runtime mode: {text}"
    );
    // A workload API that answers, and a parent that does not.
    let served = fake_workload(&socket, 2);
    let (passed, text) = check();
    assert!(!passed, "{text}");
    assert!(text.contains("OK      workload API"), "{text}");
    assert!(text.contains("trust bundle of 1 certificate(s)"), "{text}");
    assert!(
        text.contains(&format!(
            "ERROR   device scope https://127.0.0.1:{scope_port}"
        )),
        "{text}"
    );
    // Its thread ends with the test process (it may wait for a request that never comes).
    drop(served);
    let _ = std::fs::remove_dir_all(dir);
}
