use super::*;

const GOOD: &str = r#"{
    "deviceId": "edge1",
    "iothubHostname": "hub.example.net",
    "gatewayHostname": "localhost",
    "listen": {"amqps": "127.0.0.1:5671", "https": "127.0.0.1:8443", "metrics": null},
    "dataDir": "data",
    "modules": {"a": {}, "b": {"primaryKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}},
    "$edgeHub": {
        "schemaVersion": "1.1",
        "routes": {
            "r1": "FROM /messages/modules/a/outputs/* INTO BrokeredEndpoint(\"/modules/b/inputs/in1\")",
            "r2": {"route": "FROM /messages/* INTO $upstream", "priority": 0, "timeToLiveSecs": 60}
        },
        "storeAndForwardConfiguration": {"timeToLiveSecs": -1}
    }
}"#;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn a_good_config_compiles() {
    let s = from_str(GOOD, &env(&[])).unwrap();
    assert_eq!(s.device_id.as_str(), "edge1");
    assert_eq!(s.listen.metrics, None);
    assert_eq!(s.routes.len(), 2);
    let r2 = s.routes.iter().find(|r| r.name == "r2").unwrap();
    assert_eq!((r2.priority, r2.time_to_live_secs), (0, 60));
    assert_eq!(s.time_to_live_secs, None);
    assert!(s.modules[&ModuleId::parse("a").unwrap()].keys.is_none());
    assert!(s.modules[&ModuleId::parse("b").unwrap()].keys.is_some());
}

#[test]
fn proxy_urls_parse_with_their_credentials() {
    let p = Proxy::parse("http://user:p%40ss@proxy.local:3128").unwrap();
    assert_eq!(
        (p.host.as_str(), p.port, p.basic_auth.as_deref()),
        ("proxy.local", 3128, Some("user:p@ss"))
    );
    let p = Proxy::parse("10.0.0.1:8080").unwrap();
    assert_eq!(
        (p.host.as_str(), p.port, p.basic_auth),
        ("10.0.0.1", 8080, None)
    );
    assert_eq!(Proxy::parse("http://proxy").unwrap().port, 80);
    assert!(Proxy::parse("https://proxy:443").is_err());
    assert!(Proxy::parse("http://").is_err());
    // The password never shows in a log line.
    assert!(!format!("{:?}", Proxy::parse("http://u:secret@h:1").unwrap()).contains("secret"));
}

#[test]
fn connection_limits_have_defaults_and_pending_follows_max_connections() {
    let s = from_str(GOOD, &env(&[])).unwrap();
    assert_eq!(s.limits.auth_timeout_secs, 10);
    assert_eq!(s.limits.shutdown_timeout_secs, 10);
    assert_eq!(s.limits.max_pending_connections, 500);
    let with = |limits: &str| {
        let text = GOOD.replacen(
            r#""dataDir": "data","#,
            &format!(r#""dataDir": "data", "limits": {limits},"#),
            1,
        );
        from_str(&text, &env(&[]))
    };
    let s = with(r#"{"maxConnections": 50}"#).unwrap();
    assert_eq!(s.limits.max_pending_connections, 25);
    let s = with(r#"{"maxConnections": 50, "maxPendingConnections": 5, "idleTimeoutSecs": 0, "maxLinksPerSession": 8}"#).unwrap();
    assert_eq!(
        (
            s.limits.max_pending_connections,
            s.limits.idle_timeout_secs,
            s.limits.max_links_per_session
        ),
        (5, 0, 8)
    );
    // Every key lands in its own field.
    let s = with(r#"{"authTimeoutSecs": 6, "maxPendingConnections": 9, "shutdownTimeoutSecs": 11, "httpsMaxConnections": 7, "metricsMaxConnections": 3, "httpHeaderTimeoutSecs": 4, "httpBodyTimeoutSecs": 5}"#).unwrap();
    let l = &s.limits;
    assert_eq!(
        (
            l.auth_timeout_secs,
            l.max_pending_connections,
            l.shutdown_timeout_secs,
            l.https_max_connections,
            l.metrics_max_connections,
            l.http_header_timeout_secs,
            l.http_body_timeout_secs
        ),
        (6, 9, 11, 7, 3, 4, 5)
    );
    assert_eq!(
        from_str(GOOD, &env(&[]))
            .unwrap()
            .limits
            .max_unsettled_bytes_per_link,
        8 * 1024 * 1024
    );
    let s = with(r#"{"maxUnsettledBytesPerLink": 65536}"#).unwrap();
    assert_eq!(s.limits.max_unsettled_bytes_per_link, 65536);
    assert!(with(r#"{"maxUnsettledBytesPerLink": 10}"#).is_err());
    let errs = with(r#"{"maxSessionsPerConnection": 0, "maxIncompleteBytesPerConnection": 10}"#)
        .unwrap_err();
    assert_eq!(errs.0.len(), 2, "{errs:?}");
}

#[test]
fn the_mqtt_listener_defaults_to_8883_and_can_be_moved_or_turned_off() {
    let s = from_str(GOOD, &HashMap::new()).unwrap();
    assert_eq!(s.listen.mqtts, Some("0.0.0.0:8883".parse().unwrap()));
    let moved = GOOD.replacen(r#""amqps": "#, r#""mqtts": "127.0.0.1:0", "amqps": "#, 1);
    let s = from_str(&moved, &HashMap::new()).unwrap();
    assert_eq!(s.listen.mqtts, Some("127.0.0.1:0".parse().unwrap()));
    let off = GOOD.replacen(r#""amqps": "#, r#""mqtts": null, "amqps": "#, 1);
    assert_eq!(from_str(&off, &HashMap::new()).unwrap().listen.mqtts, None);
    let bad = GOOD.replacen(r#""amqps": "#, r#""mqtts": "nowhere", "amqps": "#, 1);
    let errs = from_str(&bad, &HashMap::new()).unwrap_err();
    assert_eq!(errs.0[0].path, "$.listen.mqtts", "{errs:?}");
    let s = from_str(GOOD, &env(&[("EDGEHUB_LISTEN_MQTTS", "127.0.0.2:8883")])).unwrap();
    assert_eq!(s.listen.mqtts, Some("127.0.0.2:8883".parse().unwrap()));
}

#[test]
fn the_built_in_endpoint_is_on_in_standalone_mode_unless_null_and_off_with_an_upstream() {
    let s = from_str(GOOD, &HashMap::new()).unwrap();
    let b = s
        .built_in_endpoint
        .expect("on by default in standalone mode");
    assert_eq!(
        (b.name.as_str(), b.partition_count, b.retention_ms),
        ("hub", 4, 24 * 3_600_000)
    );
    assert_eq!(b.consumer_groups, ["$Default"]);
    let off = GOOD.replacen(
        r#""dataDir": "#,
        r#""builtInEndpoint": null, "dataDir": "#,
        1,
    );
    assert_eq!(
        from_str(&off, &HashMap::new()).unwrap().built_in_endpoint,
        None
    );
    let upstream = GOOD.replacen(
        r#""dataDir": "#,
        r#""upstream": {"hostname": "hub.example.net", "sharedAccessKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}, "dataDir": "#,
        1,
    );
    let s = from_str(&upstream, &HashMap::new()).unwrap();
    assert!(s.upstream.is_some());
    assert_eq!(s.built_in_endpoint, None);
    let both = upstream.replacen(r#""dataDir": "#, r#""builtInEndpoint": {}, "dataDir": "#, 1);
    let errs = from_str(&both, &HashMap::new()).unwrap_err();
    assert_eq!(errs.0[0].path, "$.builtInEndpoint", "{errs:?}");
}

#[test]
fn environment_overrides_keys() {
    let s = from_str(
        GOOD,
        &env(&[
            ("EDGEHUB_DEVICE_ID", "other"),
            ("EDGEHUB_LISTEN_AMQPS", "127.0.0.9:1234"),
        ]),
    )
    .unwrap();
    assert_eq!(s.device_id.as_str(), "other");
    assert_eq!(s.listen.amqps, "127.0.0.9:1234".parse().unwrap());
}

#[test]
fn every_error_is_reported_with_its_path() {
    let bad = r#"{
        "deviceId": "bad id",
        "iothubHostname": "",
        "listen": {"amqps": "nowhere", "extra": 1},
        "dataDir": 5,
        "deviceKey": "short",
        "colour": "blue",
        "modules": {"a/b": {}, "c": {"key": "x"}},
        "$edgeHub": {"schemaVersion": "2.0", "routes": {"bad": "FROM nowhere"}}
    }"#;
    let errs = from_str(bad, &env(&[])).unwrap_err().0;
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    for want in [
        "$.deviceId",
        "$.iothubHostname",
        "$.gatewayHostname",
        "$.listen.amqps",
        "$.listen.extra",
        "$.dataDir",
        "$.deviceKey",
        "$.colour",
        "$.modules[\"a/b\"]",
        "$.modules.c.key",
        "$[\"$edgeHub\"].schemaVersion",
        "$[\"$edgeHub\"].routes.bad",
    ] {
        assert!(paths.contains(&want), "missing {want} in {paths:?}");
    }
}

#[test]
fn a_bad_route_is_set_aside_and_the_rest_run() {
    let text = GOOD.replace(
        "\"r1\":",
        "\"broken\": \"FROM /messages INTO Nowhere()\", \"ghost\": \"FROM /messages INTO BrokeredEndpoint('/modules/zz/inputs/i')\", \"r1\":",
    );
    let s = from_str(&text, &env(&[])).unwrap();
    // A route into a module the config does not list stays: the registry may add it.
    assert_eq!(s.routes.len(), 3);
    let paths: Vec<&str> = s.route_errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["$[\"$edgeHub\"].routes.broken"]);
}

#[test]
fn storage_options() {
    let text = GOOD.replace(
        "\"dataDir\": \"data\",",
        "\"dataDir\": \"data\", \"storage\": {\"sync\": \"os\", \"commitIntervalMs\": 5, \"overflow\": \"dropOldest\", \"liveFirst\": [\"$upstream\", \"/modules/b/inputs/in1\"]},",
    );
    let s = from_str(&text, &env(&[])).unwrap();
    assert_eq!(s.storage.sync, crate::store::durable::SyncPolicy::Os);
    assert_eq!(s.storage.commit_interval_ms, 5);
    assert_eq!(
        from_str(GOOD, &env(&[]))
            .unwrap()
            .storage
            .commit_interval_ms,
        super::DEFAULT_COMMIT_INTERVAL_MS
    );
    assert_eq!(
        s.storage.overflow,
        crate::store::durable::Overflow::DropOldest
    );
    assert_eq!(s.storage.live_first.len(), 2);
    let bad = GOOD.replace("\"dataDir\": \"data\",", "\"dataDir\": \"data\", \"storage\": {\"liveFirst\": [\"nowhere\"], \"sync\": \"sometimes\", \"commitIntervalMs\": 101},");
    let errs = from_str(&bad, &env(&[])).unwrap_err().0;
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert!(
        paths.contains(&"$.storage.liveFirst[0]")
            && paths.contains(&"$.storage.sync")
            && paths.contains(&"$.storage.commitIntervalMs"),
        "{paths:?}"
    );
}

#[test]
fn device_certificates_and_the_client_ca_file() {
    let t = "A".repeat(40);
    let text = GOOD.replace(
        "\"modules\":",
        &format!(
            r#""devices": {{"thumb": {{"x509": {{"primaryThumbprint": "{t}"}}}}, "signed": {{"x509": {{"ca": true}}}}}},
               "tls": {{"clientCaCerts": "cas.pem"}},
               "modules":"#
        ),
    );
    let s = from_str(&text, &env(&[])).unwrap();
    assert_eq!(
        s.tls.client_ca_certs.as_deref(),
        Some(std::path::Path::new("cas.pem"))
    );
    let thumb = &s.devices[&DeviceId::parse("thumb").unwrap()];
    assert!(
        matches!(&thumb.x509, Some(crate::model::x509::X509Auth::Thumbprints(v)) if v.len() == 1)
    );
    let signed = &s.devices[&DeviceId::parse("signed").unwrap()];
    assert_eq!(signed.x509, Some(crate::model::x509::X509Auth::Ca));

    let bad = GOOD.replace(
        "\"modules\":",
        r#""devices": {"a": {"x509": {"ca": true}}, "b": {"x509": {}}, "c": {"x509": {"primaryThumbprint": "xyz"}},
                       "d": {"x509": {"ca": true, "primaryThumbprint": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}},
                       "e": {"x509": {"ca": "yes", "thumbprint": "x"}}},
           "modules":"#,
    );
    let errs = from_str(&bad, &env(&[])).unwrap_err().0;
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    for want in [
        "$.devices.a.x509.ca",
        "$.devices.b.x509",
        "$.devices.c.x509.primaryThumbprint",
        "$.devices.d.x509",
        "$.devices.e.x509.ca",
        "$.devices.e.x509.thumbprint",
    ] {
        assert!(paths.contains(&want), "missing {want} in {paths:?}");
    }
}

#[test]
fn downstream_devices_and_service_policies() {
    let k = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let text = GOOD.replace(
        "\"modules\":",
        &format!(
            r#""devices": {{"leaf": {{}}, "child": {{"edge": true, "primaryKey": "{k}"}}}},
               "servicePolicies": {{"service": {{"primaryKey": "{k}"}}, "owner": {{"primaryKey": "{k}", "secondaryKey": "{k}"}}}},
               "modules":"#
        ),
    );
    let s = from_str(&text, &env(&[])).unwrap();
    let leaf = &s.devices[&DeviceId::parse("leaf").unwrap()];
    assert!(!leaf.edge && leaf.keys.is_none());
    let child = &s.devices[&DeviceId::parse("child").unwrap()];
    assert!(child.edge && child.keys.is_some());
    assert_eq!(
        s.service_policies.keys().collect::<Vec<_>>(),
        ["owner", "service"]
    );
    let p = &s.service_policies["service"];
    assert_eq!(
        p.primary, p.secondary,
        "the secondary defaults to the primary"
    );
    // Neither is required.
    let s = from_str(GOOD, &env(&[])).unwrap();
    assert!(s.devices.is_empty() && s.service_policies.is_empty());

    let bad = GOOD.replace(
        "\"modules\":",
        r#""devices": {"edge1": {}, "a b": {}, "x": {"edge": "yes", "key": 1}, "y": {"secondaryKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}},
           "servicePolicies": {"no keys": {}, "p": {"secondaryKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}, "q": {"primaryKey": "short"}, "r": 5},
           "modules":"#,
    );
    let errs = from_str(&bad, &env(&[])).unwrap_err().0;
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    for want in [
        "$.devices.edge1",
        "$.devices[\"a b\"]",
        "$.devices.x.edge",
        "$.devices.x.key",
        "$.devices.y.primaryKey",
        "$.servicePolicies[\"no keys\"]",
        "$.servicePolicies[\"no keys\"].primaryKey",
        "$.servicePolicies.p.primaryKey",
        "$.servicePolicies.q.primaryKey",
        "$.servicePolicies.r",
    ] {
        assert!(paths.contains(&want), "missing {want} in {paths:?}");
    }
}

#[test]
fn duplicate_keys_are_refused_with_their_paths() {
    let text = GOOD
        .replacen(
            "\"dataDir\": \"data\",",
            "\"dataDir\": \"data\", \"dataDir\": \"other\",",
            1,
        )
        .replacen(
            "\"r1\":",
            "\"r2\": \"FROM /messages/* INTO $upstream\", \"r1\":",
            1,
        )
        .replacen("\"b\": {", "\"b\": {\"primaryKey\": \"x\", ", 1);
    let errs = from_str(&text, &env(&[])).unwrap_err().0;
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    for want in [
        "$.dataDir",
        "$[\"$edgeHub\"].routes.r2",
        "$.modules.b.primaryKey",
    ] {
        assert!(paths.contains(&want), "missing {want} in {paths:?}");
    }
    // The same key in different objects, or in objects inside a list, is no duplicate.
    let fine = r#"{"a": {"k": 1}, "b": {"k": 1}, "l": [{"k": 1}, {"k": 2}]}"#;
    assert!(duplicate_keys(fine).is_empty());
    let in_list = duplicate_keys(r#"{"l": [{"k": 1, "k": 2}]}"#);
    assert_eq!(in_list.len(), 1);
    assert_eq!(in_list[0].path, "$.l[0].k");
}

#[test]
fn not_json_is_one_clear_error() {
    let e = from_str("{", &env(&[])).unwrap_err().0;
    assert_eq!(e.len(), 1);
    assert!(e[0].message.contains("not valid JSON"));
}
