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
    if let Some(rt) = &settings.runtime {
        // Runtime mode: the certificate, the trust bundle and the identities come from the
        // workload API and the parent's device scope, not from config keys.
        out.extend(ports(&settings));
        out.extend(data_dir(&settings));
        out.extend(runtime(&settings, rt));
        return out;
    }
    out.extend(certificates(&settings));
    out.extend(client_cas(&settings, now_secs()));
    out.extend(ports(&settings));
    out.extend(data_dir(&settings));
    out.push(upstream(&settings));
    out
}

/// Runtime mode: the workload API answers (its trust bundle) on `IOTEDGE_WORKLOADURI`, and the
/// parent's device-scope API answers this hub's `$edgeHub` (a workload-signed token, the
/// parent's certificate checked against the trust bundle) with a page of its scope.
fn runtime(s: &Settings, rt: &crate::config::RuntimeSettings) -> Vec<Outcome> {
    let (s, rt) = (s.clone(), rt.clone());
    std::thread::spawn(move || {
        let tokio_rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                return vec![error(
                    format!("runtime checks: {e}"),
                    "report this as a bug",
                )]
            }
        };
        tokio_rt.block_on(runtime_checks(&s, &rt))
    })
    .join()
    .unwrap_or_else(|_| vec![error("runtime checks failed", "report this as a bug")])
}

async fn runtime_checks(s: &Settings, rt: &crate::config::RuntimeSettings) -> Vec<Outcome> {
    let limit = std::time::Duration::from_secs(10);
    let uri = &rt.workload_uri;
    let workload = match crate::ops::workload::WorkloadClient::new(
        uri,
        rt.module_id.clone(),
        &rt.generation_id,
    ) {
        Ok(w) => std::sync::Arc::new(w),
        Err(e) => {
            return vec![error(
                format!("workload API {uri}: {e}"),
                "set IOTEDGE_WORKLOADURI to unix:///path of the workload socket",
            )]
        }
    };
    let bundle = match tokio::time::timeout(limit, workload.trust_bundle()).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            return vec![error(
                format!("workload API {uri}: {e}"),
                "the IoT Edge runtime mounts the workload socket into the container edgeAgent creates; check IOTEDGE_WORKLOADURI and that aziot-edged runs (`iotedge system status`)",
            )]
        }
        Err(_) => {
            return vec![error(
                format!("workload API {uri}: no answer within 10 s"),
                "check that aziot-edged runs (`iotedge system status`)",
            )]
        }
    };
    let mut out = vec![ok(format!(
        "workload API {uri}: reachable, trust bundle of {} certificate(s)",
        bundle.matches("BEGIN CERTIFICATE").count()
    ))];
    let Some(up) = &s.upstream else {
        return out;
    };
    let target = format!("https://{}:{}", up.hostname, up.scope_port);
    let client = match crate::ops::device_scope::DeviceScopeClient::new(
        &up.hostname,
        up.scope_port,
        s.device_id.clone(),
        &s.iothub_hostname,
        workload,
        &bundle,
    ) {
        Ok(c) => c.with_proxy(up.proxy.clone()),
        Err(e) => {
            out.push(error(
                format!("device scope {target}: {e}"),
                "the trust bundle must hold the CA of the parent's certificate",
            ));
            return out;
        }
    };
    out.push(match tokio::time::timeout(limit, client.probe()).await {
        Ok(Ok(n)) => ok(format!(
            "device scope {target}: reachable, {n} identities on the first page of this hub's scope"
        )),
        Ok(Err(e)) => error(
            format!("device scope {target}: {e}"),
            "check that the parent (IOTEDGE_GATEWAYHOSTNAME, else IoT Hub) is reachable on that port, trusts this device's $edgeHub, and that the trust bundle holds its CA",
        ),
        Err(_) => error(
            format!("device scope {target}: no answer within 10 s"),
            "check the network path to the parent",
        ),
    });
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
    if let (Some(proxy), crate::config::UpstreamProtocol::AmqpWs) = (&up.proxy, up.protocol) {
        // The hub reaches the parent only through the proxy: that is what is checked.
        return match through_proxy(proxy, &up.hostname, up.port) {
            Ok(()) => ok(what(&format!("reachable through the proxy {proxy:?}"))),
            Err(e) => error(
                what(&e),
                "check upstream.proxy (or https_proxy): its address, credentials, and that it allows CONNECT to the parent's port",
            ),
        };
    }
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

/// Opens a tunnel to `host:port` through `proxy` (on a thread of its own with its own
/// runtime: the check runs outside the hub, and may be called from within a runtime).
fn through_proxy(proxy: &crate::config::Proxy, host: &str, port: u16) -> Result<(), String> {
    let (proxy, host) = (proxy.clone(), host.to_owned());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let tunnel = crate::ops::proxy::tunnel(&proxy, &host, port);
            match tokio::time::timeout(std::time::Duration::from_secs(5), tunnel).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("the proxy {proxy:?} did not answer within 5 s")),
            }
        })
    })
    .join()
    .unwrap_or_else(|_| Err("the proxy check failed".to_owned()))
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

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `tls.clientCaCerts` (the CAs of devices with `"x509": {"ca": true}`): every certificate in
/// it is a usable trust anchor and in its validity period; a CA that ends within 30 days is a
/// warning. Nothing to check without the file.
fn client_cas(s: &Settings, now: i64) -> Vec<Outcome> {
    let Some(path) = &s.tls.client_ca_certs else {
        return Vec::new();
    };
    let label = format!("client CA certificates {}", path.display());
    if let Err(e) = crate::ops::x509::read_cas(path) {
        return vec![error(
            format!("{label}: {e}"),
            "point tls.clientCaCerts at a PEM file of the CA certificates that sign your devices' certificates",
        )];
    }
    let pem = std::fs::read(path).unwrap_or_default();
    let mut out = Vec::new();
    for (i, der) in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
        .filter_map(|c: Result<rustls::pki_types::CertificateDer<'static>, _>| c.ok())
        .enumerate()
    {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
            out.push(error(
                format!("{label}: certificate {} cannot be parsed", i + 1),
                "replace it with a valid X.509 certificate",
            ));
            continue;
        };
        let subject = cert.subject().to_string();
        let validity = cert.validity();
        let (from, to) = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        if to < now {
            out.push(error(
                format!("{label}: {subject} expired"),
                "replace it: devices signed by it can no longer authenticate",
            ));
        } else if from > now {
            out.push(error(
                format!(
                    "{label}: {subject} is not valid before {}",
                    validity.not_before
                ),
                "check the system clock, or use a CA that is valid now",
            ));
        } else if (to - now) / 86_400 < EXPIRY_WARNING_DAYS {
            out.push(warn(
                format!("{label}: {subject} expires in {} days", (to - now) / 86_400),
                "renew the CA and re-issue the devices' certificates",
            ));
        } else {
            out.push(ok(format!(
                "{label}: {subject} valid until {}",
                validity.not_after
            )));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_ca_file_is_checked() {
        let dir = std::env::temp_dir().join(format!("edgehub-check-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cas.pem");
        let ca = |from: (i32, u8, u8), to: (i32, u8, u8)| {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "devices CA");
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
            p.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
            p.self_signed(&rcgen::KeyPair::generate().unwrap())
                .unwrap()
                .pem()
        };
        let config = |extra: &str| {
            crate::config::from_str(
                &format!(
                    r#"{{"deviceId": "edge1", "iothubHostname": "h.azure-devices.net", "gatewayHostname": "localhost",
                        "listen": {{"amqps": "127.0.0.1:0"}}, "dataDir": "{}", {extra}
                        "$edgeHub": {{"schemaVersion": "1.1", "routes": {{}}, "storeAndForwardConfiguration": {{}}}}}}"#,
                    dir.display()
                ),
                &HashMap::new(),
            )
            .unwrap()
        };
        let s = config(&format!(
            r#""tls": {{"clientCaCerts": "{}"}},"#,
            path.display()
        ));
        let now = 1_800_000_000; // 2027-01-15
        let verdicts = |s: &Settings| {
            client_cas(s, now)
                .into_iter()
                .map(|o| o.verdict)
                .collect::<Vec<_>>()
        };
        // Missing file, then a good CA, an expired one, one ending soon, not a certificate.
        assert_eq!(verdicts(&s), [Verdict::Error]);
        std::fs::write(&path, ca((2024, 1, 1), (2040, 1, 1))).unwrap();
        assert_eq!(verdicts(&s), [Verdict::Ok]);
        std::fs::write(
            &path,
            ca((2024, 1, 1), (2040, 1, 1)) + &ca((2020, 1, 1), (2021, 1, 1)),
        )
        .unwrap();
        assert_eq!(verdicts(&s), [Verdict::Ok, Verdict::Error]);
        std::fs::write(&path, ca((2024, 1, 1), (2027, 1, 30))).unwrap();
        assert_eq!(verdicts(&s), [Verdict::Warning]);
        std::fs::write(&path, "not a certificate").unwrap();
        assert_eq!(verdicts(&s), [Verdict::Error]);
        // Nothing to check without the file.
        assert!(client_cas(&config(""), now).is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
