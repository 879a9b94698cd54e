//! `edgehub check`: the operator's self-check, like `iotedge check`. Each check gives one line:
//! a verdict, what was checked, and for anything not OK a hint on how to fix it.

use std::{
    collections::HashMap,
    fmt,
    net::TcpListener,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use crate::config::{self, Settings};

/// Certificates closer than this to their end are a warning.
const EXPIRY_WARNING_DAYS: i64 = 30;
/// Less free space than this under `dataDir` is a warning.
const MIN_FREE_BYTES: u64 = 512 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warning,
    Error,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub verdict: Verdict,
    pub what: String,
    pub fix: Option<String>,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.verdict {
            Verdict::Ok => "OK     ",
            Verdict::Warning => "WARNING",
            Verdict::Error => "ERROR  ",
        };
        write!(f, "{tag} {}", self.what)?;
        if let Some(fix) = &self.fix {
            write!(f, " — fix: {fix}")?;
        }
        Ok(())
    }
}

fn ok(what: impl Into<String>) -> Outcome {
    Outcome {
        verdict: Verdict::Ok,
        what: what.into(),
        fix: None,
    }
}
fn warn(what: impl Into<String>, fix: impl Into<String>) -> Outcome {
    Outcome {
        verdict: Verdict::Warning,
        what: what.into(),
        fix: Some(fix.into()),
    }
}
fn error(what: impl Into<String>, fix: impl Into<String>) -> Outcome {
    Outcome {
        verdict: Verdict::Error,
        what: what.into(),
        fix: Some(fix.into()),
    }
}

/// Runs every check against the config at `path`.
pub fn run(path: &Path, env: &HashMap<String, String>) -> Vec<Outcome> {
    let settings = match config::load(path, env) {
        Ok(s) => s,
        Err(errs) => {
            return errs
                .0
                .iter()
                .map(|e| {
                    error(
                        format!("config {}: {e}", path.display()),
                        "correct the key at that JSON path (see README, Configuration)",
                    )
                })
                .collect();
        }
    };
    let mut out = vec![ok(format!("config {} is valid", path.display()))];
    for e in &settings.route_errors {
        out.push(warn(
            format!("route {}: {}", e.path, e.message),
            "correct or remove the route; the others run without it",
        ));
    }
    out.extend(certificates(&settings));
    out.extend(ports(&settings));
    out.extend(data_dir(&settings));
    out.push(upstream(&settings));
    out
}

/// Connects to the configured upstream and completes a TLS handshake with the CA it is
/// configured to trust (so a wrong CA or host name shows here, not only in the hub's log).
fn upstream(s: &Settings) -> Outcome {
    let Some(up) = &s.upstream else {
        return ok("upstream: none configured (standalone mode), nothing to reach");
    };
    let target = format!("{}:{}", up.hostname, up.port);
    let what = |m: &str| format!("upstream {target}: {m}");
    let roots = match crate::ops::tls::upstream_roots(up) {
        Ok(r) => r,
        Err(e) => {
            return error(
                what(&e.to_string()),
                "set upstream.caCert to the PEM of the CA that signed the parent's certificate",
            )
        }
    };
    let addrs: Vec<std::net::SocketAddr> =
        match std::net::ToSocketAddrs::to_socket_addrs(&target.as_str()) {
            Ok(a) => a.collect(),
            Err(e) => {
                return error(
                    what(&format!("cannot resolve: {e}")),
                    "check upstream.hostname and DNS",
                )
            }
        };
    let timeout = std::time::Duration::from_secs(5);
    let Some(tcp) = addrs
        .iter()
        .find_map(|a| std::net::TcpStream::connect_timeout(a, timeout).ok())
    else {
        return error(
            what("no TCP connection"),
            "check that the parent runs and that a firewall allows outbound port 5671",
        );
    };
    let _ = tcp.set_read_timeout(Some(timeout));
    let _ = tcp.set_write_timeout(Some(timeout));
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    let Ok(config) = config else {
        return error(what("no TLS configuration"), "report this as a bug");
    };
    let Ok(name) = rustls::pki_types::ServerName::try_from(up.hostname.clone()) else {
        return error(
            what("not a valid TLS server name"),
            "check upstream.hostname",
        );
    };
    let handshake = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
        .map_err(|e| e.to_string())
        .and_then(|mut conn| {
            let mut tcp = tcp;
            while conn.is_handshaking() {
                conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
            }
            Ok(())
        });
    match handshake {
        Ok(()) => ok(what("reachable, TLS certificate trusted")),
        Err(e) => error(
            what(&format!("TLS handshake failed: {e}")),
            "the parent's certificate must be issued for upstream.hostname by a CA in upstream.caCert",
        ),
    }
}

fn certificates(s: &Settings) -> Vec<Outcome> {
    let (ca, cert) = match (&s.tls.ca_cert, &s.tls.server_cert) {
        (Some(ca), Some(cert)) => (ca.clone(), cert.clone()),
        _ => {
            let dir = s.data_dir.join("certs");
            (dir.join("edge-ca.pem"), dir.join("server.pem"))
        }
    };
    let mut out = Vec::new();
    for (label, p) in [("edge CA certificate", &ca), ("server certificate", &cert)] {
        match std::fs::read(p) {
            Err(_) if s.tls.server_cert.is_none() => out.push(warn(
                format!("{label} {} does not exist yet", p.display()),
                "it is created on the first start (or run `edgehub module-env`)",
            )),
            Err(e) => out.push(error(
                format!("{label} {}: {e}", p.display()),
                "point tls.* at readable PEM files",
            )),
            Ok(pem) => out.push(inspect(
                label,
                p,
                &pem,
                (label == "server certificate").then_some(s.gateway_hostname.as_str()),
            )),
        }
    }
    out
}

fn inspect(label: &str, path: &Path, pem: &[u8], host: Option<&str>) -> Outcome {
    let parsed = x509_parser::pem::parse_x509_pem(pem);
    let Ok((_, pem)) = parsed else {
        return error(
            format!("{label} {} is not a PEM certificate", path.display()),
            "replace it with a PEM file",
        );
    };
    let Ok(cert) = pem.parse_x509() else {
        return error(
            format!("{label} {} cannot be parsed", path.display()),
            "replace it with a valid X.509 certificate",
        );
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let not_after = cert.validity().not_after.timestamp();
    let days_left = (not_after - now) / 86_400;
    if not_after < now {
        return error(
            format!("{label} {} expired", path.display()),
            "issue a new certificate (delete the generated ones to have them re-created)",
        );
    }
    if let Some(host) = host {
        let names: Vec<String> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                        x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                            4 => Some(
                                std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).to_string(),
                            ),
                            16 => <[u8; 16]>::try_from(*ip)
                                .ok()
                                .map(|b| std::net::Ipv6Addr::from(b).to_string()),
                            _ => None,
                        },
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !names.iter().any(|n| n.eq_ignore_ascii_case(host)) {
            return error(
                format!("{label} {} is for {names:?}, not for gatewayHostname {host:?}", path.display()),
                "issue the certificate for gatewayHostname (generated certificates are re-issued at the next start)",
            );
        }
    }
    if days_left < EXPIRY_WARNING_DAYS {
        return warn(
            format!("{label} {} expires in {days_left} days", path.display()),
            "renew it soon",
        );
    }
    ok(format!(
        "{label} {} is valid for {days_left} more days{}",
        path.display(),
        host.map(|h| format!(" and names {h}")).unwrap_or_default()
    ))
}

fn ports(s: &Settings) -> Vec<Outcome> {
    let mut out = Vec::new();
    let listeners = [
        ("amqps", Some(s.listen.amqps)),
        ("mqtts", s.listen.mqtts),
        ("https", s.listen.https),
        ("metrics", s.listen.metrics),
    ];
    for (name, addr) in listeners {
        let Some(addr) = addr else { continue };
        match TcpListener::bind(addr) {
            Ok(_) => out.push(ok(format!("listen.{name} {addr} is free"))),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => out.push(warn(
                format!("listen.{name} {addr} is in use"),
                "expected if edgehub is running; otherwise stop what holds the port or change listen.*",
            )),
            Err(e) => out.push(error(
                format!("listen.{name} {addr} cannot be bound: {e}"),
                "ports below 1024 need root or CAP_NET_BIND_SERVICE (the container image's binary \
                 carries it as a file capability, which no-new-privileges or dropping every \
                 capability takes away); or change listen.*",
            )),
        }
    }
    out
}

fn data_dir(s: &Settings) -> Vec<Outcome> {
    let dir = &s.data_dir;
    if let Err(e) = std::fs::create_dir_all(dir) {
        return vec![error(
            format!("dataDir {} cannot be created: {e}", dir.display()),
            "create it and give the hub's user write access",
        )];
    }
    let probe = dir.join(format!(".check-{}", std::process::id()));
    let writable = std::fs::write(&probe, b"x").and_then(|_| std::fs::remove_file(&probe));
    if let Err(e) = writable {
        return vec![error(
            format!("dataDir {} is not writable: {e}", dir.display()),
            "give the hub's user write access",
        )];
    }
    let mut out = vec![ok(format!("dataDir {} is writable", dir.display()))];
    match free_bytes(dir) {
        Some(free) if free < MIN_FREE_BYTES => out.push(warn(
            format!("dataDir has {} MiB free", free / (1024 * 1024)),
            "free space or move dataDir: twins and queued messages live there",
        )),
        Some(free) => out.push(ok(format!("dataDir has {} MiB free", free / (1024 * 1024)))),
        None => out.push(warn(
            "free space under dataDir could not be read",
            "check it with df",
        )),
    }
    out
}

/// Free bytes on the file system holding `dir`, from `df -Pk` (POSIX output).
fn free_bytes(dir: &Path) -> Option<u64> {
    let out = std::process::Command::new("df")
        .arg("-Pk")
        .arg(dir)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let line = text.lines().nth(1)?;
    let kib: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    Some(kib * 1024)
}

/// `edgehub health`: GET /metrics on the metrics listener; healthy on HTTP 200.
pub fn health(addr: std::net::SocketAddr) -> Result<(), String> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(3);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)
        .map_err(|e| format!("reading the answer: {e}"))?;
    if head.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!(
            "unexpected answer {:?}",
            String::from_utf8_lossy(&head)
        ))
    }
}
