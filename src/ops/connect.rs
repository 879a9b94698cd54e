//! How clients reach this hub, in the words `edgehub module-env` prints after the module's two
//! environment values: the ports the SDKs dial for each transport, AMQP over WebSockets on the
//! HTTPS listener, the devices that authenticate with certificates, and how this hub itself
//! reaches its parent. Every line is derived from the settings being run (an address that is
//! not the port the SDKs dial, a listener turned off, a proxy from `https_proxy`), so the text
//! stays true for the hub it describes. Pure: the settings and the CA path in, lines out.

use std::{fmt::Write as _, net::SocketAddr, path::Path};

use crate::{
    config::{Settings, UpstreamProtocol},
    model::x509::X509Auth,
};

/// The port the SDKs' `Amqp` transports dial.
const AMQPS_PORT: u16 = 5671;
/// The port the SDKs' WebSocket transports (`AmqpWs`, `MqttWs`) and `invokeMethod` dial.
const HTTPS_PORT: u16 = 443;
/// Devices named one by one at most; the rest are counted.
const DEVICES_NAMED: usize = 5;

/// The listener address, and where the SDKs' fixed port must be forwarded when it differs.
fn listener(addr: SocketAddr, key: &str, sdk_port: u16) -> String {
    if addr.port() == sdk_port {
        format!("{key} {addr}")
    } else {
        format!("{key} {addr}; the SDKs dial port {sdk_port}, so forward {sdk_port} there")
    }
}

/// Lines (each starting with `# `) on connecting over each transport and with certificates.
/// `edge_ca` is the CA clients trust (`EdgeModuleCACertificateFile`).
pub fn guide(settings: &Settings, edge_ca: &Path) -> Vec<String> {
    let gw = &settings.gateway_hostname;
    let mut lines = Vec::new();
    lines.push(format!(
        "# Amqp: the SDK dials {gw}:{AMQPS_PORT} ({}).",
        listener(settings.listen.amqps, "listen.amqps", AMQPS_PORT)
    ));
    lines.push(match settings.listen.mqtts {
        Some(addr) => format!(
            "# Mqtt: the SDK dials {gw}:{} (listen.mqtts {addr}).",
            crate::config::DEFAULT_MQTTS_PORT
        ),
        None => "# Mqtt: off (listen.mqtts is null).".to_owned(),
    });
    lines.push(match settings.listen.https {
        Some(addr) => format!(
            "# AmqpWs and MqttWs (AMQP or MQTT over WebSockets, where only 443 is open): the \
             SDK dials wss://{gw}:{HTTPS_PORT}/$iothub/websocket ({}); the same SAS key and CA. \
             A client behind an HTTP proxy uses AmqpWs or MqttWs (the SDKs' proxy settings \
             apply to WebSocket transports).",
            listener(addr, "listen.https", HTTPS_PORT)
        ),
        None => "# AmqpWs and MqttWs: off (listen.https is null); set listen.https (port 443) \
                 to serve AMQP and MQTT over WebSockets."
            .to_owned(),
    });
    lines.push(x509_line(settings, edge_ca));
    if let Some(up) = &settings.upstream {
        let mut line = match up.protocol {
            UpstreamProtocol::Amqp => format!(
                "# Upstream: this hub reaches {}:{} over AMQP (upstream.protocol \"amqp\").",
                up.hostname, up.port
            ),
            UpstreamProtocol::AmqpWs => format!(
                "# Upstream: this hub reaches wss://{}:{}/$iothub/websocket (upstream.protocol \
                 \"amqpws\")",
                up.hostname, up.port
            ),
        };
        match (&up.proxy, up.protocol) {
            (Some(p), _) => {
                let _ = write!(line, " through the HTTP proxy {p:?}.");
            }
            (None, UpstreamProtocol::AmqpWs) => {
                line.push_str(" directly (no upstream.proxy, no https_proxy).")
            }
            (None, UpstreamProtocol::Amqp) => {}
        }
        lines.push(line);
    }
    lines
}

/// Which devices authenticate with certificates, and how they connect.
fn x509_line(settings: &Settings, edge_ca: &Path) -> String {
    let mut thumb = Vec::new();
    let mut ca = Vec::new();
    for (id, d) in &settings.devices {
        match d.x509 {
            Some(X509Auth::Thumbprints(_)) => thumb.push(id.as_str()),
            Some(X509Auth::Ca) => ca.push(id.as_str()),
            None => {}
        }
    }
    if thumb.is_empty() && ca.is_empty() {
        return "# X.509: no device has devices.<id>.x509, so the listeners ask for no client \
                certificate; modules always authenticate with their SAS key."
            .to_owned();
    }
    let names = |ids: &[&str]| {
        let mut s = ids
            .iter()
            .take(DEVICES_NAMED)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        if ids.len() > DEVICES_NAMED {
            let _ = write!(s, " and {} more", ids.len() - DEVICES_NAMED);
        }
        s
    };
    let mut kinds = Vec::new();
    if !thumb.is_empty() {
        kinds.push(format!(
            "by thumbprint (a self-signed certificate whose SHA-1 or SHA-256 is in \
             devices.<id>.x509): {}",
            names(&thumb)
        ));
    }
    if !ca.is_empty() {
        let cas = settings.tls.client_ca_certs.as_deref().map_or_else(
            || "tls.clientCaCerts".to_owned(),
            |p| p.display().to_string(),
        );
        kinds.push(format!(
            "by CA (a certificate issued by a CA in {cas}, subject CN = the device id): {}",
            names(&ca)
        ));
    }
    format!(
        "# X.509: devices with a client certificate, {}. Such a device uses the connection \
         string HostName={gw};DeviceId=<id>;x509=true with its certificate and key (Node: \
         client.setOptions({{cert, key, ca}})) over Amqp or AmqpWs, no SAS token, and trusts \
         {ca_file}; modules always authenticate with their SAS key.",
        kinds.join("; "),
        gw = settings.gateway_hostname,
        ca_file = edge_ca.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(extra: &str) -> Settings {
        let text = format!(
            r#"{{"deviceId": "edge1", "iothubHostname": "h.azure-devices.net", "gatewayHostname": "gw.local",
                "listen": {{"amqps": "0.0.0.0:5671", "https": "0.0.0.0:8443", "mqtts": null, "metrics": null}},
                "dataDir": "/tmp/unused", {extra}
                "$edgeHub": {{"schemaVersion": "1.1", "routes": {{}}, "storeAndForwardConfiguration": {{}}}}}}"#
        );
        crate::config::from_str(&text, &HashMap::new()).unwrap()
    }

    #[test]
    fn ports_that_differ_from_the_sdks_are_named_with_the_forwarding_they_need() {
        let lines = guide(&settings(""), Path::new("/ca.pem"));
        let text = lines.join("\n");
        assert!(lines.iter().all(|l| l.starts_with("# ")), "{text}");
        assert!(
            text.contains("gw.local:5671 (listen.amqps 0.0.0.0:5671)"),
            "{text}"
        );
        assert!(text.contains("wss://gw.local:443/$iothub/websocket (listen.https 0.0.0.0:8443; the SDKs dial port 443, so forward 443 there)"), "{text}");
        assert!(text.contains("Mqtt: off"), "{text}");
        assert!(text.contains("no device has devices.<id>.x509"), "{text}");
        assert!(!text.contains("Upstream"), "{text}");
    }

    #[test]
    fn certificate_devices_are_named_by_kind_and_counted_past_five() {
        let t = "A".repeat(40);
        let devices: Vec<String> = (0..7)
            .map(|i| format!(r#""t{i}": {{"x509": {{"primaryThumbprint": "{t}"}}}}"#))
            .chain([
                r#""signed": {"x509": {"ca": true}}"#.to_owned(),
                r#""keyed": {}"#.to_owned(),
            ])
            .collect();
        let s = settings(&format!(
            r#""devices": {{{}}}, "tls": {{"clientCaCerts": "/etc/cas.pem"}},"#,
            devices.join(",")
        ));
        let text = guide(&s, Path::new("/ca.pem")).join("\n");
        assert!(text.contains("t0, t1, t2, t3, t4 and 2 more"), "{text}");
        assert!(
            text.contains("issued by a CA in /etc/cas.pem, subject CN = the device id): signed"),
            "{text}"
        );
        assert!(!text.contains("keyed"), "{text}");
        assert!(
            text.contains("HostName=gw.local;DeviceId=<id>;x509=true"),
            "{text}"
        );
        assert!(text.contains("trusts /ca.pem"), "{text}");
    }

    #[test]
    fn the_upstream_line_says_protocol_and_proxy_without_the_password() {
        let s = settings(
            r#""upstream": {"hostname": "parent.local", "protocol": "amqpws", "proxy": "http://u:secret@proxy.local:3128"},"#,
        );
        let text = guide(&s, Path::new("/ca.pem")).join("\n");
        assert!(text.contains("wss://parent.local:443/$iothub/websocket (upstream.protocol \"amqpws\") through the HTTP proxy http://proxy.local:3128 (with basic authentication)."), "{text}");
        assert!(!text.contains("secret"), "{text}");
        let s = settings(r#""upstream": {"hostname": "parent.local"},"#);
        let text = guide(&s, Path::new("/ca.pem")).join("\n");
        assert!(
            text.contains("reaches parent.local:5671 over AMQP"),
            "{text}"
        );
    }
}
